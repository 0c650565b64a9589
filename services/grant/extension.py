"""Moving a grant's end later, once per request id."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from services.grant import budget
from services.grant.errors import FailedPrecondition, InvalidArgument
from services.grant.review_rules import check_validity

REQUEST_KEY_INDEX = "grant_changes_request_key"
"""The unique index on ``grant_changes.request_key``."""


def _reused() -> FailedPrecondition:
    return FailedPrecondition(
        "this request id was already used for another extension; use a new request id for a "
        "new extension",
        field="request_id",
    )


async def extend_grant(
    conn: asyncpg.Connection,
    grant_id: str,
    new_end: datetime,
    key: str,
    actor: str,
    reason: str,
    *,
    now: datetime,
    max_validity_days: int,
) -> bool:
    """Move a grant's end to ``new_end`` in the caller's transaction; return whether it moved.

    A retry of a stored request (same ``key``, grant and end) moves nothing and returns False,
    even after later extensions. The same key for another grant or end raises
    FailedPrecondition naming ``request_id``. Raises InvalidArgument naming ``new_end_time``
    for an end before the current one or outside the allowed window.
    """
    row = await budget.lock_grant(conn, grant_id)
    # Read after the lock, so that a retry racing the first request waits for it to commit.
    stored = await conn.fetchrow(
        "SELECT grant_id, new_end FROM grant_changes WHERE request_key = $1", key
    )
    if stored is not None:
        if (stored["grant_id"], stored["new_end"]) != (grant_id, new_end):
            raise _reused()
        return False
    if row["expired"]:
        raise FailedPrecondition(f"grant {grant_id} has expired", field="grant_id")
    if new_end < row["ends_at"]:
        raise InvalidArgument(
            "new_end_time",
            f"{new_end.isoformat()} is before the current end {row['ends_at'].isoformat()}",
            "an extension moves the end later",
        )
    check_validity(row["starts_at"], new_end, now, max_validity_days, "new_end_time")
    await conn.execute(
        "UPDATE grants SET ends_at = $2, expiring_notified = false WHERE id = $1",
        grant_id,
        new_end,
    )
    detail = f"end moved from {row['ends_at'].isoformat()} to {new_end.isoformat()}: {reason}"
    try:
        await conn.execute(
            "INSERT INTO grant_changes (grant_id, action, actor, detail, request_key, new_end) "
            "VALUES ($1, 'extended', $2, $3, $4, $5)",
            grant_id,
            actor,
            detail,
            key,
            new_end,
        )
    except asyncpg.UniqueViolationError as error:
        # Only the same key used at once on another grant gets here: the lock orders the rest.
        if error.constraint_name != REQUEST_KEY_INDEX:
            raise
        raise _reused() from None
    return True
