"""Lock and read everything one ledger batch needs, in a single statement.

The statement locks the batch's grants, then its sub-allocations, then its holds, each in id
order (``SELECT ... FOR UPDATE``), the same order as every other writer, so batches never
deadlock. Locked rows come back in their latest committed version even when the statement
waited for another transaction. The stored entries of the batch's idempotency keys are read
without a lock, so a key committed by a transaction this one waited for can be missed; the
UNIQUE constraint on the key then rolls the batch back and it runs again.

Rows travel as JSON so that four tables fit one result; numbers are parsed as Decimal and
keys ending in ``_at`` as timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.grant.ledger_ops import HoldRequest, LedgerRequest

LOCK_AND_READ = """
WITH named_holds AS (
    SELECT grant_id, allocation_id FROM holds WHERE id = ANY($1)
),
locked_grants AS (
    SELECT * FROM grants
    WHERE id = ANY($2)
       OR id IN (SELECT grant_id FROM named_holds)
       OR (project_id = ANY($3) AND NOT expired)
    ORDER BY id
    FOR UPDATE
),
locked_allocations AS (
    SELECT * FROM allocations
    WHERE id = ANY($4) OR id IN (SELECT allocation_id FROM named_holds)
    ORDER BY id
    FOR UPDATE
),
locked_holds AS (
    SELECT * FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE
)
SELECT 'grant' AS kind, row_to_json(g)::text AS row FROM locked_grants AS g
UNION ALL
SELECT 'allocation', row_to_json(a)::text FROM locked_allocations AS a
UNION ALL
SELECT 'hold', row_to_json(h)::text FROM locked_holds AS h
UNION ALL
SELECT 'entry', row_to_json(e)::text FROM ledger_entries AS e WHERE idempotency_key = ANY($5)
"""


@dataclass
class BatchRows:
    """The rows :data:`LOCK_AND_READ` returned, by table."""

    grants: list[dict[str, Any]] = field(default_factory=list)
    allocations: list[dict[str, Any]] = field(default_factory=list)
    holds: list[dict[str, Any]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)


def _row(text: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(text, parse_float=Decimal)
    for key, value in row.items():
        if key.endswith("_at") and isinstance(value, str):
            row[key] = datetime.fromisoformat(value)
    return row


async def lock_and_read(conn: asyncpg.Connection, requests: Sequence[LedgerRequest]) -> BatchRows:
    """Lock the rows the requests touch and read them with the stored entries of their keys."""
    hold_ids: set[str] = set()
    grant_ids: set[str] = set()
    project_ids: set[str] = set()
    allocation_ids: set[str] = set()
    for request in requests:
        if not isinstance(request, HoldRequest):
            hold_ids.add(request.hold_id)
            continue
        if request.grant_id:
            grant_ids.add(request.grant_id)
        elif request.project_id:
            project_ids.add(request.project_id)
        if request.allocation_id:
            allocation_ids.add(request.allocation_id)
    records = await conn.fetch(
        LOCK_AND_READ,
        sorted(hold_ids),
        sorted(grant_ids),
        sorted(project_ids),
        sorted(allocation_ids),
        [r.key for r in requests],
    )
    rows = BatchRows()
    tables = {
        "grant": rows.grants,
        "allocation": rows.allocations,
        "hold": rows.holds,
        "entry": rows.entries,
    }
    for record in records:
        tables[record["kind"]].append(_row(record["row"]))
    return rows
