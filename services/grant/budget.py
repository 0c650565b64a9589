"""Budget movements that the program office and PIs make: award, supplement, sub-allocation
and expiry. Each runs in one transaction that locks the grant row first, as the ledger does.

The hot path (holds and charges) is in :mod:`services.grant.ledger`; these are rare and write
one entry at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.grant import directory
from services.grant import ledger_rules as rules
from services.grant.amounts import ZERO, format_amount
from services.grant.errors import FailedPrecondition, NotFound
from services.grant.events import EventKind, OutboxEvent, write_events
from services.grant.ledger_ops import Cause
from services.grant.ledger_rules import GrantState, Movement, Pot
from services.grant.ledger_state import allocation_pot_name, grant_pot_name, pot_from_row
from services.grant.review_rules import RatePolicy, Tier


@dataclass(frozen=True, slots=True)
class NewGrant:
    """The grant an award creates."""

    project_id: str
    application_id: str | None
    tier: Tier
    amount: Decimal
    starts_at: datetime
    ends_at: datetime
    providers: tuple[str, ...]
    regions: tuple[str, ...]
    accelerator_models: tuple[str, ...]
    rate_policy: RatePolicy
    rate_card_version: int | None


async def record_change(
    conn: asyncpg.Connection, grant_id: str, action: str, actor: str, detail: str
) -> None:
    """Record who changed a grant and why, in the caller's transaction."""
    await conn.execute(
        "INSERT INTO grant_changes (grant_id, action, actor, detail) VALUES ($1, $2, $3, $4)",
        grant_id,
        action,
        actor,
        detail,
    )


async def lock_grant(conn: asyncpg.Connection, grant_id: str) -> asyncpg.Record:
    """Lock a grant row for the rest of the transaction; raise NotFound if there is none."""
    row = await conn.fetchrow("SELECT * FROM grants WHERE id = $1 FOR UPDATE", grant_id)
    if row is None:
        raise NotFound("grant", grant_id)
    return row


def grant_state(row: asyncpg.Record) -> GrantState:
    return GrantState(row["id"], row["starts_at"], row["ends_at"], row["expired"])


async def existing_entry(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM ledger_entries WHERE idempotency_key = $1", key)


IDEMPOTENCY_KEY_CONSTRAINT = "ledger_entries_idempotency_key_key"
"""PostgreSQL's name for the UNIQUE constraint on ``ledger_entries.idempotency_key``."""


def check_same_entry(stored: asyncpg.Record, grant_id: str, amount: Decimal) -> None:
    """Raise FailedPrecondition unless a stored entry moved ``amount`` on ``grant_id``."""
    if stored["grant_id"] != grant_id or stored["amount"] != amount:
        raise _reused()


def _reused() -> FailedPrecondition:
    return FailedPrecondition(
        "this request id was already used for another request; use a new request id for a "
        "new request",
        field="request_id",
    )


async def insert_entry(
    conn: asyncpg.Connection,
    key: str,
    movement: Movement,
    grant_id: str,
    cause: Cause,
    now: datetime,
    *,
    allocation_id: str | None = None,
    digest: str = "",
) -> int:
    """Write one entry with its postings; return its id.

    Raises FailedPrecondition naming ``request_id`` when another transaction committed an entry
    with ``key`` first. Supplements and sub-allocations lock their grant before they look the key
    up, so a concurrent retry on the same grant waits and finds the stored entry instead, and
    only the same key used on another grant gets here.
    """
    try:
        entry_id: int = await conn.fetchval(
            """
            INSERT INTO ledger_entries (idempotency_key, request_digest, kind, grant_id,
                                        allocation_id, amount, actor, trigger, reason, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            RETURNING id
            """,
            key,
            digest,
            movement.kind.value,
            grant_id,
            allocation_id,
            movement.amount,
            cause.actor,
            cause.trigger,
            cause.reason,
            now,
        )
    except asyncpg.UniqueViolationError as error:
        if error.constraint_name != IDEMPOTENCY_KEY_CONSTRAINT:
            raise
        raise _reused() from None
    if movement.postings:
        await conn.executemany(
            "INSERT INTO postings (entry_id, account, amount) VALUES ($1, $2, $3)",
            [(entry_id, p.account, p.amount) for p in movement.postings],
        )
    return entry_id


async def write_pot(conn: asyncpg.Connection, pot: Pot) -> None:
    """Store a pot's balances in its grant or sub-allocation row."""
    if pot.name.startswith("grant:"):
        table, identifier = "grants", pot.name.removeprefix("grant:")
    else:
        table, identifier = "allocations", pot.name.removeprefix("sub_allocation:")
    await conn.execute(
        f"UPDATE {table} SET credited = $2, available = $3, held = $4, consumed = $5, "
        "refunded = $6 WHERE id = $1",
        identifier,
        pot.credited,
        pot.available,
        pot.held,
        pot.consumed,
        pot.refunded,
    )


async def award_grant(
    conn: asyncpg.Connection, new: NewGrant, key: str, cause: Cause, now: datetime
) -> str:
    """Create a grant and credit it from the program pool; return its id.

    Runs inside the caller's transaction, so a decision and its award commit together. A
    repeated key returns the grant the first award created.
    """
    stored = await existing_entry(conn, key)
    if stored is not None:
        return str(stored["grant_id"])
    grant_id = f"grant-{uuid.uuid4().hex[:16]}"
    row = await conn.fetchrow(
        """
        INSERT INTO grants (id, project_id, application_id, tier, starts_at, ends_at, providers,
                            regions, accelerator_models, rate_policy, rate_card_version,
                            created_by, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        RETURNING *
        """,
        grant_id,
        new.project_id,
        new.application_id,
        new.tier.value,
        new.starts_at,
        new.ends_at,
        list(new.providers),
        list(new.regions),
        list(new.accelerator_models),
        new.rate_policy.value,
        new.rate_card_version,
        cause.actor,
        now,
    )
    movement = rules.award(
        grant_state(row), pot_from_row(grant_pot_name(grant_id), row), new.amount
    )
    await insert_entry(conn, key, movement, grant_id, cause, now)
    await write_pot(conn, movement.pots[0])
    await write_events(
        conn,
        [_event(EventKind.AWARDED, row, movement.pots[0].available, cause, key, now, "awarded")],
    )
    return grant_id


async def supplement_grant(
    conn: asyncpg.Connection, grant_id: str, amount: Decimal, key: str, cause: Cause, now: datetime
) -> None:
    """Credit a grant's one supplement; the caller checks the tier rule on the locked row.

    The caller has locked the grant and found no entry with ``key``.
    """
    row = await lock_grant(conn, grant_id)
    movement = rules.award(
        grant_state(row), pot_from_row(grant_pot_name(grant_id), row), amount, supplement=True
    )
    await insert_entry(conn, key, movement, grant_id, cause, now)
    await write_pot(conn, movement.pots[0])
    await conn.execute("UPDATE grants SET supplemented = true WHERE id = $1", grant_id)
    detail = f"{format_amount(amount)} PF-days: {cause.reason}"
    await record_change(conn, grant_id, "supplemented", cause.actor, detail)


async def create_sub_allocation(
    conn: asyncpg.Connection,
    grant_id: str,
    parent_id: str | None,
    holder: str,
    amount: Decimal,
    key: str,
    cause: Cause,
    now: datetime,
) -> str:
    """Fund a new sub-allocation from its parent's available budget; return its id.

    A repeated key returns the sub-allocation the first request created, when the request
    names the same grant, parent, holder and amount, and raises FailedPrecondition
    otherwise.
    """
    row = await lock_grant(conn, grant_id)
    # Read after the lock, so that a retry racing the first request waits for it to commit and
    # then returns its sub-allocation.
    stored = await existing_entry(conn, key)
    if stored is not None:
        check_same_entry(stored, grant_id, amount)
        allocation = await conn.fetchrow(
            "SELECT parent_id, holder FROM allocations WHERE id = $1", stored["allocation_id"]
        )
        if allocation is None or (allocation["parent_id"], allocation["holder"]) != (
            parent_id,
            holder,
        ):
            raise _reused()
        return str(stored["allocation_id"])
    grant = grant_state(row)
    await directory.check_holder(conn, row["project_id"], holder)
    if parent_id:
        parent_row = await conn.fetchrow(
            "SELECT * FROM allocations WHERE id = $1 AND grant_id = $2 FOR UPDATE",
            parent_id,
            grant_id,
        )
        if parent_row is None:
            raise NotFound("sub-allocation", parent_id)
        parent = pot_from_row(allocation_pot_name(parent_id), parent_row)
    else:
        parent = pot_from_row(grant_pot_name(grant_id), row)
    allocation_id = f"sub-{uuid.uuid4().hex[:16]}"
    child = Pot(allocation_pot_name(allocation_id), ZERO, ZERO, ZERO, ZERO, ZERO)
    movement = rules.transfer(grant, parent, child, amount, now)
    await conn.execute(
        "INSERT INTO allocations (id, grant_id, parent_id, holder, created_by, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        allocation_id,
        grant_id,
        parent_id,
        holder,
        cause.actor,
        now,
    )
    await insert_entry(conn, key, movement, grant_id, cause, now, allocation_id=allocation_id)
    for pot in movement.pots:
        await write_pot(conn, pot)
    return allocation_id


async def expire_grant(
    conn: asyncpg.Connection, grant_id: str, cause: Cause, now: datetime
) -> Decimal | None:
    """Expire one grant whose window ended; return what went back to the pool, None if skipped."""
    row = await lock_grant(conn, grant_id)
    if row["expired"] or row["ends_at"] > now:
        return None
    allocation_rows = await conn.fetch(
        "SELECT * FROM allocations WHERE grant_id = $1 ORDER BY id FOR UPDATE", grant_id
    )
    pots = [pot_from_row(grant_pot_name(grant_id), row)]
    pots.extend(pot_from_row(allocation_pot_name(a["id"]), a) for a in allocation_rows)
    movement = rules.expire(grant_state(row), pots)
    await insert_entry(conn, f"expiry:{grant_id}", movement, grant_id, cause, now)
    for pot in movement.pots:
        await write_pot(conn, pot)
    await conn.execute("UPDATE grants SET expired = true WHERE id = $1", grant_id)
    detail = f"{format_amount(movement.amount)} PF-days returned to the program pool"
    await record_change(conn, grant_id, "expired", cause.actor, detail)
    await write_events(
        conn,
        [_event(EventKind.EXPIRED, row, ZERO, cause, f"expiry:{grant_id}", now, "window ended")],
    )
    return movement.amount


async def grants_to_expire(conn: asyncpg.Connection, as_of: datetime) -> Sequence[str]:
    rows = await conn.fetch(
        "SELECT id FROM grants WHERE NOT expired AND ends_at <= $1 ORDER BY ends_at, id", as_of
    )
    return [r["id"] for r in rows]


async def mark_expiring_soon(
    conn: asyncpg.Connection, horizon_end: datetime, cause: Cause, now: datetime
) -> list[str]:
    """Queue one expiring-soon event for each open grant whose window ends before the horizon."""
    rows = await conn.fetch(
        """
        UPDATE grants SET expiring_notified = true
        WHERE NOT expired AND NOT expiring_notified AND ends_at <= $1 AND ends_at > $2
        RETURNING *
        """,
        horizon_end,
        now,
    )
    await write_events(
        conn,
        [
            _event(
                EventKind.EXPIRING_SOON,
                r,
                r["available"],
                cause,
                f"expiring:{r['id']}",
                now,
                f"window ends at {r['ends_at'].isoformat()}",
            )
            for r in rows
        ],
    )
    return [r["id"] for r in rows]


def _event(
    kind: EventKind,
    row: asyncpg.Record,
    available: Decimal,
    cause: Cause,
    reference: str,
    now: datetime,
    reason: str,
) -> OutboxEvent:
    return OutboxEvent(
        kind=kind,
        grant_id=row["id"],
        project_id=row["project_id"],
        available=available,
        at=now,
        actor=cause.actor,
        trigger=cause.trigger,
        reference_id=reference,
        reason=reason,
    )
