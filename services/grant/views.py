"""Read-side queries: grants with rolled-up balances, sub-allocations, holds, ledger history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.grant import access
from services.grant import ledger_rules as rules
from services.grant.errors import NotFound
from services.grant.ledger_rules import RolledBalance
from services.grant.ledger_state import allocation_pot_name, grant_pot_name, pot_from_row


@dataclass(frozen=True, slots=True)
class GrantView:
    row: asyncpg.Record
    institution_id: str
    balance: RolledBalance


async def _allocations(conn: asyncpg.Connection, grant_id: str) -> Sequence[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM allocations WHERE grant_id = $1", grant_id)


def _roll(
    name: str, row: asyncpg.Record, root: str | None, allocations: Sequence[asyncpg.Record]
) -> RolledBalance:
    parents = {a["id"]: a["parent_id"] for a in allocations}
    by_id = {a["id"]: a for a in allocations}
    below = rules.subtree(root, parents)
    children = [i for i in below if parents[i] == root]
    deeper = [i for i in below if parents[i] != root]
    return rules.roll_up(
        pot_from_row(name, row),
        (pot_from_row(allocation_pot_name(i), by_id[i]) for i in children),
        (pot_from_row(allocation_pot_name(i), by_id[i]) for i in deeper),
    )


async def grant_view(conn: asyncpg.Connection, grant_id: str) -> GrantView:
    row = await conn.fetchrow(
        "SELECT g.*, p.institution_id FROM grants g JOIN projects p ON p.id = g.project_id "
        "WHERE g.id = $1",
        grant_id,
    )
    if row is None:
        raise NotFound("grant", grant_id)
    allocations = await _allocations(conn, grant_id)
    balance = _roll(grant_pot_name(grant_id), row, None, allocations)
    return GrantView(row, row["institution_id"], balance)


async def allocation_balance(
    conn: asyncpg.Connection, grant_id: str, allocation_id: str
) -> RolledBalance:
    allocations = await _allocations(conn, grant_id)
    row = next((a for a in allocations if a["id"] == allocation_id), None)
    if row is None:
        raise NotFound("sub-allocation", allocation_id)
    return _roll(allocation_pot_name(allocation_id), row, allocation_id, allocations)


@dataclass(frozen=True, slots=True)
class AllocationFilter:
    """The filters of one ListSubAllocations call, and the caller they apply to."""

    subject: str
    """The caller."""
    see_all: bool
    """Whether the caller may read every listed grant's sub-allocations. Otherwise only those
    of grants whose project the caller may read, and those held by sub-projects they draw
    for."""
    grant_id: str = ""
    """Only this grant's, if set."""
    holder: str = ""
    """Only this holder's, if set."""
    caller_may_draw: bool = False
    """Only those that the caller's project roles let them draw on, of grants whose window
    has not ended."""


async def list_allocations(
    conn: asyncpg.Connection, listed: AllocationFilter, after: str, limit: int
) -> list[tuple[asyncpg.Record, RolledBalance]]:
    """Return a page of the sub-allocations that ``listed`` selects, ordered by id."""
    readable = access.allocation_readable_sql("$4")
    drawable = access.allocation_drawable_sql("$4")
    # The grant service places no hold on a grant whose window has ended, so with
    # caller_may_draw its sub-allocations are left out.
    rows = await conn.fetch(
        "SELECT a.* FROM allocations a JOIN grants g ON g.id = a.grant_id "
        "JOIN projects own ON own.id = g.project_id "
        "WHERE a.id > $1 AND ($2 = '' OR a.grant_id = $2) AND ($3 = '' OR a.holder = $3) "
        f"AND ($5 OR {readable}) "
        f"AND (NOT $6 OR ({drawable} AND NOT g.expired AND g.ends_at > now())) "
        "ORDER BY a.id LIMIT $7",
        after,
        listed.grant_id,
        listed.holder,
        listed.subject,
        listed.see_all,
        listed.caller_may_draw,
        limit,
    )
    # A balance sums the sub-allocations below, so it needs each listed grant's whole tree.
    grant_ids = sorted({row["grant_id"] for row in rows})
    trees: dict[str, list[asyncpg.Record]] = {grant_id: [] for grant_id in grant_ids}
    for allocation in await conn.fetch(
        "SELECT * FROM allocations WHERE grant_id = ANY($1::text[])", grant_ids
    ):
        trees[allocation["grant_id"]].append(allocation)
    return [
        (row, _roll(allocation_pot_name(row["id"]), row, row["id"], trees[row["grant_id"]]))
        for row in rows
    ]


async def list_grants(
    conn: asyncpg.Connection,
    subject: str,
    see_all: bool,
    project_id: str,
    institution_id: str,
    state: str,
    now: datetime,
    after: str,
    limit: int,
) -> list[GrantView]:
    """Return a page of the grants the caller may see, filtered by state if ``state`` is set."""
    rows = await conn.fetch(
        """
        SELECT g.id FROM grants g JOIN projects p ON p.id = g.project_id
        WHERE g.id > $1
          AND ($2 = '' OR g.project_id = $2)
          AND ($3 = '' OR p.institution_id = $3)
          AND ($4 OR EXISTS (SELECT 1 FROM project_members m
                             WHERE m.project_id = g.project_id AND m.member = $5))
          AND ($6 = ''
               OR ($6 = 'expired' AND g.expired)
               OR ($6 = 'pending' AND NOT g.expired AND g.starts_at > $7)
               OR ($6 = 'active' AND NOT g.expired AND g.starts_at <= $7))
        ORDER BY g.id LIMIT $8
        """,
        after,
        project_id,
        institution_id,
        see_all,
        subject,
        state,
        now,
        limit,
    )
    return [await grant_view(conn, r["id"]) for r in rows]


async def hold_row(conn: asyncpg.Connection, hold_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM holds WHERE id = $1", hold_id)
    if row is None:
        raise NotFound("hold", hold_id)
    return row


async def entry_with_postings(
    conn: asyncpg.Connection, entry_id: int
) -> tuple[asyncpg.Record, Sequence[asyncpg.Record]]:
    row = await conn.fetchrow("SELECT * FROM ledger_entries WHERE id = $1", entry_id)
    if row is None:
        raise NotFound("ledger entry", str(entry_id))
    postings = await conn.fetch(
        "SELECT account, amount FROM postings WHERE entry_id = $1 ORDER BY amount", entry_id
    )
    return row, postings


async def list_entries(
    conn: asyncpg.Connection, grant_id: str, kind: str, after_id: int, limit: int
) -> list[tuple[asyncpg.Record, list[asyncpg.Record]]]:
    """Return a page of a grant's entries, oldest first, each with its postings."""
    rows = await conn.fetch(
        "SELECT * FROM ledger_entries WHERE grant_id = $1 AND id > $2 "
        "AND ($3 = '' OR kind = $3) ORDER BY id LIMIT $4",
        grant_id,
        after_id,
        kind,
        limit,
    )
    postings = await conn.fetch(
        "SELECT entry_id, account, amount FROM postings WHERE entry_id = ANY($1) "
        "ORDER BY entry_id, amount",
        [r["id"] for r in rows],
    )
    grouped: dict[int, list[asyncpg.Record]] = {r["id"]: [] for r in rows}
    for posting in postings:
        grouped[posting["entry_id"]].append(posting)
    return [(r, grouped[r["id"]]) for r in rows]


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    postings_sum: Decimal
    entry_count: int
    negative_grant_ids: list[str]
    program_pool: Decimal


async def ledger_summary(conn: asyncpg.Connection) -> LedgerSummary:
    """Check the whole ledger: postings sum, negative balances, and the program pool."""
    total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM postings")
    count = await conn.fetchval("SELECT count(*) FROM ledger_entries")
    negative = await conn.fetch(
        """
        SELECT split_part(account, ':', 2) AS grant_id FROM postings
        WHERE account LIKE 'grant:%:available'
        GROUP BY account HAVING sum(amount) < 0
        """
    )
    pool = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM postings WHERE account = 'program:pool'"
    )
    return LedgerSummary(total, count, [r["grant_id"] for r in negative], pool)
