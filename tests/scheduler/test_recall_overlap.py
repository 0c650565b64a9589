"""Recalls of one pledge add up only where their windows overlap in time."""

from __future__ import annotations

import time
from dataclasses import replace

import asyncpg
import pytest

from scheduler.service.pledges import PledgeRecord, PledgeStore, RecallRecord

pytestmark = pytest.mark.timeout(60)

DAY = 86_400.0
HOUR = 3_600.0


def recall(recall_id: str, count: int, start: float, end: float) -> RecallRecord:
    return RecallRecord(recall_id, "pl-peaks", count, start, end, "commercial peak")


async def rejection(store: PledgeStore, rejected: RecallRecord) -> str:
    with pytest.raises(LookupError) as caught:
        await store.add_recall(rejected, None)
    return str(caught.value)


async def test_recalls_add_up_only_when_overlapping(pool: asyncpg.Pool) -> None:
    store = PledgeStore(pool)
    now = time.time()
    pledge = PledgeRecord("pl-peaks", "prov", "reg", "P100", 8, 8, now - 60, now + 30 * DAY)
    assert await store.upsert(pledge, "test", created=True)
    peak = now + DAY

    # A booked peak of all 8 recallable accelerators tomorrow leaves a recall now possible.
    await store.add_recall(recall("rc-peak", 8, peak, peak + 2 * HOUR), None)
    await store.add_recall(recall("rc-now", 1, now + 60, now + 660), None)

    # One more during the booked peak is over the recallable count, and the error names the
    # recall it overlaps with its window.
    over_peak = await rejection(store, recall("rc-x", 1, peak + HOUR, peak + 3 * HOUR))
    assert "0 recallable accelerators left" in over_peak
    assert "rc-peak (8 from " in over_peak

    # A recall that starts where the peak ends does not overlap it.
    await store.add_recall(recall("rc-after", 4, peak + 2 * HOUR, peak + 4 * HOUR), None)
    await store.add_recall(recall("rc-late", 4, peak + 3 * HOUR, peak + 5 * HOUR), None)

    # From peak + 3 h, rc-after and rc-late together take all 8.
    both = await rejection(store, recall("rc-y", 1, peak + 2.5 * HOUR, peak + 3.5 * HOUR))
    assert "0 recallable accelerators left" in both
    assert "rc-after (4 from " in both
    assert "rc-late (4 from " in both
    assert "rc-peak" not in both

    # A recall that overlaps only rc-late may take the other 4.
    await store.add_recall(recall("rc-z", 4, peak + 4 * HOUR, peak + 6 * HOUR), None)
    stored = {r.recall_id for r in await store.recalls("prov")}
    assert stored == {"rc-peak", "rc-now", "rc-after", "rc-late", "rc-z"}

    # At most 8 are recalled at one instant, so the pledge may keep 8 recallable, not 7.
    assert await store.upsert(pledge, "test")
    with pytest.raises(LookupError) as caught:
        await store.upsert(replace(pledge, recallable=7), "test")
    assert "8 accelerators of pledge pl-peaks are recalled at " in str(caught.value)


async def test_recall_touching_below_microsecond(pool: asyncpg.Pool) -> None:
    store = PledgeStore(pool)
    now = float(int(time.time()))
    pledge = PledgeRecord("pl-peaks", "prov", "reg", "P100", 8, 8, now - 60, now + 30 * DAY)
    assert await store.upsert(pledge, "test", created=True)
    # 0.7 us past a whole microsecond: the table stores the end rounded up to the next one.
    edge = now + DAY + 0.4999997

    await store.add_recall(recall("rc-first", 8, now + HOUR, edge), None)
    second, _, _ = await store.add_recall(recall("rc-second", 8, edge, edge + HOUR), None)
    [first] = [r for r in await store.recalls("prov") if r.recall_id == "rc-first"]

    assert second.effective_at == first.end
