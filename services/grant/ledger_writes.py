"""Write one ledger batch in a single statement: new holds, entries, postings and balances.

Data-modifying CTEs put every insert and update of a batch into one round trip. The foreign
keys between them (a posting's entry, an entry's hold) hold because PostgreSQL checks them at
the end of the statement.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from services.grant.events import write_events
from services.grant.ledger_state import BatchState

WRITE_BATCH = """
WITH new_holds AS (
    INSERT INTO holds (id, grant_id, allocation_id, job_id, amount, remaining)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                         $5::numeric[])
),
entries AS (
    INSERT INTO ledger_entries (idempotency_key, request_digest, kind, grant_id, hold_id,
                                allocation_id, job_id, amount, from_held, actor, trigger,
                                reason, created_at)
    SELECT * FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::text[], $13::numeric[], $14::numeric[],
                         $15::text[], $16::text[], $17::text[], $18::timestamptz[])
    RETURNING *
),
new_postings AS (
    INSERT INTO postings (entry_id, account, amount)
    SELECT e.id, p.account, p.amount
    FROM unnest($19::text[], $20::text[], $21::numeric[]) AS p(key, account, amount)
    JOIN entries AS e ON e.idempotency_key = p.key
),
grant_updates AS (
    UPDATE grants AS t
    SET credited = v.credited, available = v.available, held = v.held,
        consumed = v.consumed, refunded = v.refunded, low_notified = v.low_notified
    FROM unnest($22::text[], $23::numeric[], $24::numeric[], $25::numeric[], $26::numeric[],
                $27::numeric[], $28::boolean[])
         AS v(id, credited, available, held, consumed, refunded, low_notified)
    WHERE t.id = v.id
),
allocation_updates AS (
    UPDATE allocations AS t
    SET credited = v.credited, available = v.available, held = v.held,
        consumed = v.consumed, refunded = v.refunded, low_notified = v.low_notified,
        low_crossings = v.low_crossings
    FROM unnest($29::text[], $30::numeric[], $31::numeric[], $32::numeric[], $33::numeric[],
                $34::numeric[], $35::boolean[], $36::integer[])
         AS v(id, credited, available, held, consumed, refunded, low_notified, low_crossings)
    WHERE t.id = v.id
),
hold_updates AS (
    UPDATE holds AS h
    SET remaining = v.remaining, charged = v.charged, refunded = v.refunded,
        released = v.released, settled = v.settled
    FROM unnest($37::text[], $38::numeric[], $39::numeric[], $40::numeric[], $41::numeric[],
                $42::boolean[]) AS v(id, remaining, charged, refunded, released, settled)
    WHERE h.id = v.id
)
SELECT * FROM entries
"""


async def write_batch(conn: asyncpg.Connection, batch: BatchState) -> dict[str, asyncpg.Record]:
    """Write the batch's changes and its events; return the new entry rows by key."""
    rows = await conn.fetch(
        WRITE_BATCH,
        *_new_hold_columns(batch),
        *_entry_columns(batch),
        *_posting_columns(batch),
        *_pot_columns(batch, "grant:", batch.grant_meta),
        *_allocation_columns(batch),
        *_hold_columns(batch),
    )
    await write_events(conn, batch.events)
    return {r["idempotency_key"]: r for r in rows}


def _new_hold_columns(batch: BatchState) -> list[list[Any]]:
    holds = [batch.holds[h] for h in sorted(batch.new_holds)]
    rows = [batch.hold_rows[h.hold_id] for h in holds]
    return [
        [h.hold_id for h in holds],
        [r["grant_id"] for r in rows],
        [r["allocation_id"] for r in rows],
        [r["job_id"] for r in rows],
        [h.amount for h in holds],
    ]


def _entry_columns(batch: BatchState) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(13)]
    for entry in batch.entries:
        request, movement = entry.request, entry.movement
        values = (
            request.key,
            request.digest(),
            movement.kind.value,
            entry.grant_id,
            entry.hold_id,
            entry.allocation_id,
            entry.job_id,
            movement.amount,
            movement.from_held,
            request.cause.actor,
            request.cause.trigger,
            request.cause.reason,
            batch.now,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _posting_columns(batch: BatchState) -> list[list[Any]]:
    keys: list[str] = []
    accounts: list[str] = []
    amounts: list[Decimal] = []
    for entry in batch.entries:
        for posting in entry.movement.postings:
            keys.append(entry.request.key)
            accounts.append(posting.account)
            amounts.append(posting.amount)
    return [keys, accounts, amounts]


def _pot_columns(
    batch: BatchState, prefix: str, metas: dict[str, dict[str, Any]]
) -> list[list[Any]]:
    pots = [batch.pots[name] for name in sorted(batch.changed_pots) if name.startswith(prefix)]
    ids = [p.name.removeprefix(prefix) for p in pots]
    return [
        ids,
        [p.credited for p in pots],
        [p.available for p in pots],
        [p.held for p in pots],
        [p.consumed for p in pots],
        [p.refunded for p in pots],
        [bool(metas.get(i, {}).get("low_notified")) for i in ids],
    ]


def _allocation_columns(batch: BatchState) -> list[list[Any]]:
    columns = _pot_columns(batch, "sub_allocation:", batch.allocation_meta)
    metas = batch.allocation_meta
    return [*columns, [int(metas.get(i, {}).get("low_crossings") or 0) for i in columns[0]]]


def _hold_columns(batch: BatchState) -> list[list[Any]]:
    # A hold created in this batch is inserted with its final state. The same statement could
    # not update it anyway, because its updates read the table as it was before it began.
    holds = [batch.holds[h] for h in sorted(batch.changed_holds - batch.new_holds)]
    return [
        [h.hold_id for h in holds],
        [h.remaining for h in holds],
        [h.charged for h in holds],
        [h.refunded for h in holds],
        [h.released for h in holds],
        [h.settled for h in holds],
    ]
