"""Grant expiry: the scan that expires grants whose window ended, the expiring-soon notices,
and the stored ExpireGrants requests that make a retry return its first result."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, localcontext

import asyncpg

from services.grant import budget
from services.grant.amounts import EXACT, ZERO, format_amount
from services.grant.app import GrantApp
from services.grant.errors import FailedPrecondition
from services.grant.ledger_ops import Cause

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExpiryRequest:
    """One ExpireGrants call, stored under its idempotency key."""

    key: str
    """The caller-scoped key, from :func:`services.grant.app.scoped_key`."""
    requested_as_of: datetime | None
    """The ``as_of_time`` the caller sent, or None when the request left it unset."""
    as_of: datetime
    """The cut-off of a new request: ``requested_as_of``, or the current time."""
    actor: str


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    """The grants one ExpireGrants request expired, and what went back to the program pool."""

    grant_ids: tuple[str, ...]
    returned: Decimal


async def expire_requested(app: GrantApp, request: ExpiryRequest, cause: Cause) -> ExpiryResult:
    """Expire the grants due by the request's cut-off, once per request key.

    A retry of a completed request returns the stored result and expires nothing more. A retry
    of a request that stopped part way (a crash, a cancelled call) resumes with the cut-off that
    the first attempt stored. The same key with another ``as_of_time`` raises
    FailedPrecondition naming ``request_id``.
    """
    db = app.database()
    async with db.transaction() as conn:
        stored = await _claim(conn, request)
    if not stored["completed"]:
        await expire_due(app, stored["as_of"], cause, request_key=request.key)
        async with db.transaction() as conn:
            stored = await conn.fetchrow(
                "UPDATE expiry_requests SET completed = true WHERE request_key = $1 RETURNING *",
                request.key,
            )
    return ExpiryResult(grant_ids=tuple(stored["grant_ids"]), returned=stored["returned"])


async def _claim(conn: asyncpg.Connection, request: ExpiryRequest) -> asyncpg.Record:
    """Store a new request, or return the stored one after checking that it is the same."""
    row = await conn.fetchrow(
        "INSERT INTO expiry_requests (request_key, requested_as_of, as_of, actor) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (request_key) DO NOTHING RETURNING *",
        request.key,
        request.requested_as_of,
        request.as_of,
        request.actor,
    )
    if row is not None:
        return row
    # The conflict waited for the first request's insert to commit, so its row is visible.
    row = await conn.fetchrow("SELECT * FROM expiry_requests WHERE request_key = $1", request.key)
    assert row is not None, "expiry requests are never deleted"
    if row["requested_as_of"] != request.requested_as_of:
        raise FailedPrecondition(
            f"this request id was already used for ExpireGrants with as_of_time "
            f"{_describe_time(row['requested_as_of'])}, and this request has as_of_time "
            f"{_describe_time(request.requested_as_of)}; use a new request id for a new request",
            field="request_id",
        )
    return row


def _describe_time(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "unset"


async def expire_due(
    app: GrantApp, as_of: datetime, cause: Cause, *, request_key: str | None = None
) -> tuple[list[str], Decimal]:
    """Expire every grant whose window ended by ``as_of``, one transaction per grant.

    With ``request_key``, each expired grant is added to that stored ExpireGrants request in
    the transaction that expires it.
    """
    db = app.database()
    async with db.acquire() as conn:
        due = await budget.grants_to_expire(conn, as_of)
    expired: list[str] = []
    total = ZERO
    for grant_id in due:
        async with db.transaction() as conn:
            returned = await budget.expire_grant(conn, grant_id, cause, as_of)
            if returned is not None and request_key is not None:
                await conn.execute(
                    "UPDATE expiry_requests SET grant_ids = array_append(grant_ids, $2), "
                    "returned = returned + $3 WHERE request_key = $1",
                    request_key,
                    grant_id,
                    returned,
                )
        if returned is not None:
            expired.append(grant_id)
            with localcontext(EXACT):
                total += returned
            log.info(
                "grant expired",
                extra={"grant_id": grant_id, "returned_pf_days": format_amount(returned)},
            )
    return expired, total


async def notify_expiring(app: GrantApp, now: datetime, cause: Cause) -> list[str]:
    horizon = now + timedelta(days=app.settings.expiring_soon_days)
    async with app.database().transaction() as conn:
        return await budget.mark_expiring_soon(conn, horizon, cause, now)
