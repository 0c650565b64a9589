"""Settlements count pledged hours from the pledge's creation up to the time they are built, and
call a pledge kept only when its protected accelerators were registered and healthy whenever
metering counted them."""

from __future__ import annotations

from datetime import datetime, timedelta

from acsp.time_range import LATEST_TIME
from acsp.v1 import scheduler_pb2
from services.metering.pledges import (
    PledgeRecord,
    RecallRecord,
    pledge_from_proto,
    recall_from_proto,
    store_pledges,
)
from services.metering.settlement import build_settlement
from services.runtime.db import Database
from tests.metering.helpers import T0

HOUR = timedelta(hours=1)


def pledge(
    pledge_id: str = "pl-1",
    model: str = "H800",
    healthy: int | None = None,
    registered: int | None = None,
    created_at: datetime = T0 - HOUR,
) -> PledgeRecord:
    return PledgeRecord(
        pledge_id, "prov-a", "r1", model, 8, 4, T0, T0 + 10 * HOUR, created_at, registered, healthy
    )


async def test_pledged_hours_stop_at_now(db: Database) -> None:
    recall = RecallRecord("rc-1", "pl-1", 2, T0 + HOUR, LATEST_TIME)
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge()], [recall], now=T0)
        settlement = await build_settlement(
            conn, "prov-a", T0, T0 + timedelta(days=3650), now=T0 + 4 * HOUR
        )
        future = await build_settlement(
            conn, "prov-a", T0 + 5 * HOUR, T0 + 6 * HOUR, now=T0 + 4 * HOUR
        )
    (line,) = settlement.lines
    assert line.pledged_accelerator_hours == 12 * 4
    assert line.recalled_accelerator_hours == 2 * 3
    assert future.lines == ()
    assert future.recall_count == 0


async def test_recall_hours_stop_with_pledge(db: Database) -> None:
    open_ended = RecallRecord("rc-1", "pl-1", 2, T0 + HOUR, LATEST_TIME)
    after_pledge = RecallRecord("rc-2", "pl-1", 1, T0 + 11 * HOUR, T0 + 12 * HOUR)
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge()], [open_ended, after_pledge], now=T0)
        settlement = await build_settlement(conn, "prov-a", T0, T0 + 20 * HOUR, now=T0 + 20 * HOUR)
    (line,) = settlement.lines
    assert line.recalled_accelerator_hours == 2 * 9
    assert settlement.recall_count == 1


async def test_pledge_kept_needs_healthy_protected(db: Database) -> None:
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge(healthy=16, registered=16)], [], now=T0 + HOUR)
        # The same counts again add no row.
        await store_pledges(conn, [pledge(healthy=16, registered=16)], [], now=T0 + 2 * HOUR)
        await store_pledges(conn, [pledge(healthy=5, registered=16)], [], now=T0 + 3 * HOUR)
        await store_pledges(conn, [pledge(healthy=16, registered=16)], [], now=T0 + 4 * HOUR)
        rows = await conn.fetchval("SELECT count(*) FROM metering.pledge_capacity")
        before = await build_settlement(conn, "prov-a", T0, T0 + 2 * HOUR, now=T0 + 5 * HOUR)
        short = await build_settlement(conn, "prov-a", T0, T0 + 5 * HOUR, now=T0 + 5 * HOUR)
        after = await build_settlement(
            conn, "prov-a", T0 + 4 * HOUR, T0 + 5 * HOUR, now=T0 + 5 * HOUR
        )
    assert rows == 3
    assert before.pledge_kept
    assert before.short_pledges == ()
    assert not short.pledge_kept
    assert short.short_pledges == ("pl-1",)
    assert after.pledge_kept
    assert after.uncounted_pledges == ()


async def test_pledge_without_hardware_broken(db: Database) -> None:
    ahead = pledge("pl-h100", "H100-SXM5-80GB", healthy=0, registered=0)
    async with db.acquire() as conn:
        await store_pledges(conn, [ahead], [], now=T0 + HOUR)
        settlement = await build_settlement(conn, "prov-a", T0, T0 + 2 * HOUR, now=T0 + 2 * HOUR)
    assert not settlement.pledge_kept
    assert settlement.short_pledges == ("pl-h100",)


async def test_uncounted_pledge_reported(db: Database) -> None:
    async with db.acquire() as conn:
        # Counts outside the window, or from a standby listing, are not stored.
        await store_pledges(conn, [pledge(healthy=0, registered=0)], [], now=T0 - HOUR)
        await store_pledges(conn, [pledge()], [], now=T0 + HOUR)
        settlement = await build_settlement(conn, "prov-a", T0, T0 + 2 * HOUR, now=T0 + 2 * HOUR)
    assert settlement.pledge_kept
    assert settlement.uncounted_pledges == ("pl-1",)


async def test_backdated_pledge_counts_from_creation(db: Database) -> None:
    # Made at T0 + 4 h for a window that started at T0: nothing measured the hours before.
    creation = T0 + 4 * HOUR
    backdated = pledge(healthy=16, registered=16, created_at=creation)
    recall = RecallRecord("rc-1", "pl-1", 2, T0 + HOUR, T0 + 5 * HOUR)
    async with db.acquire() as conn:
        await store_pledges(conn, [backdated], [recall], now=creation + timedelta(minutes=1))
        whole = await build_settlement(conn, "prov-a", T0, T0 + 10 * HOUR, now=T0 + 6 * HOUR)
        before = await build_settlement(conn, "prov-a", T0, creation, now=T0 + 6 * HOUR)
    (line,) = whole.lines
    assert line.pledged_accelerator_hours == 12 * 2
    assert line.recalled_accelerator_hours == 2 * 1
    assert whole.recall_count == 1
    assert whole.pledge_kept
    assert whole.uncounted_pledges == ()
    # Before its creation the pledge was not in effect: no hours, no recall, nothing uncounted.
    assert before.lines == ()
    assert before.recall_count == 0
    assert before.uncounted_pledges == ()
    assert before.pledge_kept


async def test_pledge_made_after_window_counts_nothing(db: Database) -> None:
    late = pledge(created_at=T0 + 11 * HOUR)
    async with db.acquire() as conn:
        await store_pledges(conn, [late], [], now=T0 + 11 * HOUR)
        settlement = await build_settlement(conn, "prov-a", T0, T0 + 20 * HOUR, now=T0 + 20 * HOUR)
    assert settlement.lines == ()
    assert settlement.uncounted_pledges == ()


async def test_stored_creation_time_only_lowers(db: Database) -> None:
    async with db.acquire() as conn:
        for created_at in (T0 + 2 * HOUR, T0 + HOUR, T0 + 3 * HOUR):
            await store_pledges(conn, [pledge(created_at=created_at)], [], now=T0)
        stored = await conn.fetchval(
            "SELECT created_at FROM metering.pledges WHERE pledge_id = 'pl-1'"
        )
    assert stored == T0 + HOUR


async def test_settlement_latest_copy_time(db: Database) -> None:
    async with db.acquire() as conn:
        never = await build_settlement(conn, "prov-a", T0, T0 + HOUR, now=T0 + HOUR)
        await conn.executemany(
            "INSERT INTO metering.pledge_copies (provider, copied_at) VALUES ($1, $2)",
            [("", T0 + HOUR), ("prov-a", T0 + 2 * HOUR), ("prov-b", T0 + 3 * HOUR)],
        )
        own = await build_settlement(conn, "prov-a", T0, T0 + HOUR, now=T0 + HOUR)
        periodic = await build_settlement(conn, "prov-c", T0, T0 + HOUR, now=T0 + HOUR)
    assert never.pledges_copied_at is None
    # The later of the provider's own copy and the periodic copy of every provider.
    assert own.pledges_copied_at == T0 + 2 * HOUR
    assert periodic.pledges_copied_at == T0 + HOUR


def test_listed_creation_time() -> None:
    listed = scheduler_pb2.Pledge(pledge_id="pl-1", provider_id="prov-a", region_id="r1")
    listed.window.start_time.FromDatetime(T0)
    listed.window.end_time.FromDatetime(T0 + 10 * HOUR)
    # A scheduler older than create_time sends none; the listing time is the earliest known.
    assert pledge_from_proto(listed, listed_at=T0 + 5 * HOUR).created_at == T0 + 5 * HOUR
    listed.create_time.FromDatetime(T0 + 2 * HOUR)
    assert pledge_from_proto(listed, listed_at=T0 + 5 * HOUR).created_at == T0 + 2 * HOUR


def test_listed_counts_and_open_recall() -> None:
    listed = scheduler_pb2.Pledge(
        pledge_id="pl-1",
        provider_id="prov-a",
        region_id="r1",
        model="H800",
        registered_count=16,
        healthy_count=15,
    )
    listed.window.start_time.FromDatetime(T0)
    listed.window.end_time.FromDatetime(T0 + HOUR)
    recall = scheduler_pb2.Recall(recall_id="rc-1", pledge_id="pl-1", count=1)
    recall.effective_time.FromDatetime(T0)

    counted = pledge_from_proto(listed, counted=True)
    standby = pledge_from_proto(listed, counted=False)

    assert counted.registered_count == 16
    assert counted.healthy_count == 15
    assert standby.registered_count is None
    assert standby.healthy_count is None
    assert recall_from_proto(recall).end_time == LATEST_TIME
