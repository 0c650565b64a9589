"""The pledge copy that a provider settlement is built from.

A settlement copies the provider's pledges from the scheduler again first, because the
periodic copy may be a sync interval old and miss a pledge made since. That copy waits at most
``ACSP_METERING_PLEDGE_COPY_WAIT_S``. When it fails or times out, the settlement may use the
stored copy. It does so only if that copy was made at least COPY_DELAY after the end of what
the settlement counts (the period's end, or now for a period still running). Such a copy
contains every pledge and recall that counts in the period, because hours before a pledge's
creation are not counted and a recall takes effect at most that long before the scheduler
stores it. Otherwise the settlement fails with UNAVAILABLE, because its pledged hours and
``pledge_kept`` would rest on pledges that metering may not have.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Final

import grpc

from services.metering.pledges import PledgeSync
from services.runtime.db import Database
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

RECALL_LEEWAY: Final = timedelta(seconds=300)
"""How long before RecallCapacity checks a recall the recall may take effect. The scheduler's
RecallCapacity accepts an effective time up to 300 s in the past (RECALL_PAST_LEEWAY_S in
scheduler/service/pledge_api.py)."""

STORE_MARGIN: Final = timedelta(seconds=300)
"""Time allowed between RecallCapacity's check of the effective time and the commit of the
recall, and for the difference between the scheduler's and metering's clocks."""

COPY_DELAY: Final = RECALL_LEEWAY + STORE_MARGIN
"""How long after the end of what a settlement counts a stored copy must have been made to
contain every recall that takes effect before that end."""


def copy_covers(copied_at: datetime | None, end: datetime, now: datetime) -> bool:
    """Return whether a copy made at ``copied_at`` contains every pledge and recall that
    counts in a settlement period ending at ``end`` and built at ``now``."""
    if copied_at is None:
        return False
    # NOTE: a pledge changed in the scheduler after ``copied_at`` is settled as it was then.
    # NOTE: STORE_MARGIN is an estimate. After its check, RecallCapacity makes seven pool
    # acquires and statements of up to 10 s each (PledgeStore's timeout) and then commits,
    # which nothing bounds.
    return copied_at >= min(end, now) + COPY_DELAY


async def copy_for_settlement(
    sync: PledgeSync, db: Database, provider: str, end: datetime, wait_s: float
) -> datetime | None:
    """Copy ``provider``'s pledges, waiting at most ``wait_s`` seconds.

    Returns the stored copy's time when the copy failed but the stored copy covers the period
    ending at ``end``, and None after a fresh copy. Raises Unavailable when neither holds.
    """
    try:
        async with asyncio.timeout(wait_s):
            await sync.sync_once(provider)
    except TimeoutError:
        failure = f"the scheduler did not list them within {wait_s:g} s"
    except grpc.aio.AioRpcError as error:
        failure = f"the scheduler could not list them: {error.code().name}: {error.details()}"
    else:
        return None
    now = datetime.now(UTC)
    async with db.acquire() as conn:
        copied_at = await conn.fetchval(
            "SELECT max(copied_at) FROM metering.pledge_copies WHERE provider IN ('', $1)",
            provider,
        )
    if copy_covers(copied_at, end, now):
        logger.warning(
            "settlement of %s uses the pledges copied at %s, which cover the period, because %s",
            provider,
            copied_at.isoformat(),
            failure,
        )
        return copied_at
    stored = (
        f"the stored copy is from {copied_at.isoformat()}"
        if copied_at
        else "they were never copied"
    )
    if end > now:
        needed = "a fresh copy of its pledges, because the period has not ended"
    else:
        needed = f"a copy of its pledges made after {(end + COPY_DELAY).isoformat()}"
    raise Unavailable(
        f"settlement of provider {provider} needs {needed}, but {failure} and {stored}; retry "
        "when a scheduler replica responds to ListPledges, and check that "
        "ACSP_SCHEDULER_ADDRESS names every scheduler replica"
    )
