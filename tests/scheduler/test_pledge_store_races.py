"""Concurrent SetPledge writes in PostgreSQL: two creations that race for one pool take turns,
so a request id reused with other values is rejected even when both calls arrive together."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from scheduler.service.pledges import (
    PledgeOverlap,
    PledgeRecord,
    PledgeStore,
    RequestReused,
    new_pledge_id,
)

pytestmark = pytest.mark.timeout(60)

DAY = 86_400.0


def pledge(pledge_id: str, protected: int, start: float) -> PledgeRecord:
    return PledgeRecord(
        pledge_id, "prov", "reg", "A100-SXM4-80GB", protected, 4, start, start + DAY
    )


async def upsert_racing(
    pool: asyncpg.Pool, store: PledgeStore, pledges: list[PledgeRecord]
) -> list[object]:
    """Run one creating upsert per pledge while the pool's lock is held elsewhere, release it
    once every upsert waits, and return each outcome (True or the exception raised)."""
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "SELECT pg_advisory_xact_lock(hashtext('scheduler.pledges'), hashtext($1))",
            "prov/reg/A100-SXM4-80GB",
        )
        calls = [
            asyncio.create_task(store.upsert(p, f"test:{i}", created=True))
            for i, p in enumerate(pledges)
        ]
        deadline = time.monotonic() + 20
        waiting = 0
        while waiting < len(pledges):
            assert time.monotonic() < deadline, f"{waiting} upserts wait for the pool lock"
            done = [call for call in calls if call.done()]
            assert not done, f"an upsert finished without the pool lock: {done[0].result()!r}"
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            await asyncio.sleep(0.02)
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_reused_request_id_racing(pool: asyncpg.Pool) -> None:
    store = PledgeStore(pool)
    pledge_id = new_pledge_id("prov", "same-request")
    now = time.time()
    outcomes = await upsert_racing(
        pool, store, [pledge(pledge_id, 1, now), pledge(pledge_id, 2, now)]
    )
    assert outcomes.count(True) == 1
    rejected = [o for o in outcomes if o is not True]
    assert len(rejected) == 1
    assert isinstance(rejected[0], RequestReused)
    stored = await store.pledges("prov")
    assert len(stored) == 1
    winner = outcomes.index(True) + 1
    assert stored[0].protected == winner


async def test_overlapping_creations_racing(pool: asyncpg.Pool) -> None:
    store = PledgeStore(pool)
    now = time.time()
    outcomes = await upsert_racing(
        pool, store, [pledge("pl-one", 1, now), pledge("pl-two", 2, now + 3600)]
    )
    assert outcomes.count(True) == 1
    rejected = [o for o in outcomes if o is not True]
    assert len(rejected) == 1
    assert isinstance(rejected[0], PledgeOverlap)
    assert len(await store.pledges("prov")) == 1
