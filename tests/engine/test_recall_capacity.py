"""Recalls take accelerators from what a pool can use, even when pledges exceed its hardware."""

from __future__ import annotations

from scheduler.engine import (
    Cause,
    Engine,
    Pledge,
    Preempt,
    PriorityClass,
    RecallAnnounced,
    ScheduleResult,
)
from scheduler.engine.capacity import peak_overlap, recalled_cap_millis
from scheduler.engine.fleet import Pool
from tests.engine.helpers import job, make_engine, node

A100 = "A100-SXM4-80GB"
DAY = 86_400.0


def preempted(result: ScheduleResult) -> list[Preempt]:
    return [d for d in result.decisions if isinstance(d, Preempt)]


def test_recall_over_pledges_above_fleet() -> None:
    # Two overlapping pledges add up to 30 accelerators in a pool of 16 (pledges stored
    # before the scheduler rejected overlaps).
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.add_pledge(Pledge("pl-a", "p1", "r1", A100, 0, 15, 0.0, 1e9))
    engine.add_pledge(Pledge("pl-b", "p1", "r1", A100, 0, 15, 0.0, 1e9))
    for i in range(16):
        engine.submit(job(f"j{i}", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(0.0)
    assert len(engine.running()) == 16

    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 6, effective_at=5.0))
    result = engine.schedule(1.0)

    decisions = preempted(result)
    assert len(decisions) == 6
    assert {d.cause for d in decisions} == {Cause.PROVIDER_RECALL}
    assert {d.cause_id for d in decisions} == {"rc"}


def test_recall_over_pledge_above_fleet() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 2, 1_000, 0.0, 1e9))
    for i in range(8):
        engine.submit(job(f"j{i}", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(0.0)

    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 3, effective_at=5.0))

    assert len(preempted(engine.schedule(1.0))) == 3


def test_recalled_cap_table() -> None:
    cases = [
        # protected, recallable, recalled, registered accelerators, expected cap
        (10, 4, 0, 16, 14),
        (10, 4, 4, 16, 10),
        (0, 30, 6, 16, 10),
        (2, 1_000, 3, 8, 5),
        (20, 4, 4, 16, 16),
        (2, 20, 20, 16, 2),
        (10, 4, 9, 16, 10),
        (5, 5, 5, 0, 0),
    ]
    for protected, recallable, recalled, registered, expected in cases:
        cap = recalled_cap_millis(protected, recallable, recalled, registered * 1000)
        assert cap == expected * 1000, (protected, recallable, recalled, registered)


def test_peak_overlap_table() -> None:
    cases = [
        # windows, expected peak and its first instant
        ([], (0, float("-inf"))),
        ([(0.0, 10.0, 3)], (3, 0.0)),
        ([(0.0, 10.0, 3), (10.0, 20.0, 5)], (5, 10.0)),
        ([(0.0, 10.0, 3), (5.0, 20.0, 5)], (8, 5.0)),
        ([(0.0, 10.0, 3), (2.0, 4.0, 1), (6.0, 8.0, 1)], (4, 2.0)),
        ([(5.0, 5.0, 9), (0.0, 1.0, 2)], (2, 0.0)),
    ]
    for windows, expected in cases:
        assert peak_overlap(windows) == expected, windows


def test_freed_by_new_recall() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 6, 4, 0.0, 1e9))
    pool = engine.fleet.pools[("p1", "r1", A100)]

    assert engine.capacity.freed_millis(pool, 1.0, None, 4) == 2000
    assert engine.capacity.freed_millis(pool, 2e9, None, 4) == 0


def test_recalled_millis_of_pool() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 10, 6, 0.0, 1e9))
    pool = engine.fleet.pools[("p1", "r1", A100)]
    assert engine.capacity.recalled_millis(pool, 1.0) == 0

    # Counted from the announcement, before the recall takes effect.
    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 4, effective_at=5.0))
    assert engine.capacity.recalled_millis(pool, 1.0) == 4000

    # No recall takes protected accelerators.
    engine.apply(RecallAnnounced("rc2", "p1", "r1", A100, 4, effective_at=5.0))
    assert engine.capacity.recalled_millis(pool, 1.0) == 6000
    # Pledges end at 1e9, and the recall with them.
    assert engine.capacity.recalled_millis(pool, 2e9) == 0


def test_recall_ends_with_its_pledge() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_pledge(Pledge("pl-a", "p1", "r1", A100, 2, 6, 0.0, 100.0))
    engine.add_pledge(Pledge("pl-b", "p1", "r1", A100, 2, 6, 100.0, 1e9))
    pool = engine.fleet.pools[("p1", "r1", A100)]
    # An open-ended recall of pl-a, as stored before recalls ended with their pledge.
    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 4, 5.0, pledge_id="pl-a"))

    assert engine.capacity.cap(pool, 50.0).pledge_millis == 4000
    assert engine.capacity.recalled_millis(pool, 50.0) == 4000
    assert engine.capacity.cap(pool, 150.0).pledge_millis == 8000
    assert engine.capacity.cap(pool, 150.0).recall_id == ""
    assert engine.capacity.recalled_millis(pool, 150.0) == 0
    assert engine.capacity.freed_millis(pool, 150.0, None, 4) == 4000


def test_above_cap_of_pool() -> None:
    engine = make_engine()
    for name in ("n1", "n2"):
        engine.add_node(node(name, 4, model="P100", provider="openb", region="region-1"))
    pool = next(iter(engine.fleet.pools.values()))
    assert engine.capacity.above_cap_millis(pool, 1.0) == 0

    # A pledge of 4 protected and 2 recallable P100s leaves two of the eight above it.
    engine.add_pledge(Pledge("pl", "openb", "region-1", "P100", 4, 2, 0.0, 1e9))
    assert engine.capacity.above_cap_millis(pool, 1.0) == 2000

    # A recall of the two recallable ones counts as recalled, not above the cap.
    engine.apply(RecallAnnounced("rc", "openb", "region-1", "P100", 2, effective_at=5.0))
    assert engine.capacity.recalled_millis(pool, 1.0) == 2000
    assert engine.capacity.above_cap_millis(pool, 1.0) == 2000


def test_recall_spares_unneeded_small_victim() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 0, 16, 0.0, 1e9))
    engine.submit(job("large", accelerators=8, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(0.0)
    engine.submit(job("small", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(1.0)
    assert set(engine.running()) == {"large", "small"}

    # Nine recalled leave a cap of 7, so 2 accelerators must go. The small job started last,
    # so it is picked first, but it frees too little, and the large job alone frees enough.
    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 9, effective_at=5.0))
    decisions = preempted(engine.schedule(2.0))

    assert [d.job_id for d in decisions] == ["large"]


def recall_engine() -> tuple[Engine, Pool]:
    """Return an engine with one pool of 8 accelerators, all pledged as recallable."""
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 0, 8, 0.0, 1e9))
    return engine, engine.fleet.pools[("p1", "r1", A100)]


def recall(recall_id: str, count: int, start: float, end: float) -> RecallAnnounced:
    return RecallAnnounced(recall_id, "p1", "r1", A100, count, start, end, "pl")


def test_recalls_apart_in_time_do_not_add_up() -> None:
    engine, pool = recall_engine()
    engine.apply(recall("rc-now", 4, 60.0, 660.0))
    engine.apply(recall("rc-later", 4, DAY, DAY + 7200.0))

    # At most 4 are recalled at any instant, so 4 stay usable.
    assert engine.capacity.cap(pool, 1.0).pledge_millis == 4000
    assert engine.capacity.recalled_millis(pool, 1.0) == 4000
    # A third recall that overlaps only the first can take the other 4, and one that
    # overlaps neither can take up to 8.
    assert engine.capacity.freed_millis(pool, 300.0, 900.0, 6) == 4000
    assert engine.capacity.freed_millis(pool, 900.0, 1200.0, 6) == 6000


def test_overlapping_recalls_add_up() -> None:
    engine, pool = recall_engine()
    engine.apply(recall("rc-a", 4, DAY, DAY + 7200.0))
    engine.apply(recall("rc-b", 3, DAY + 3600.0, DAY + 9000.0))

    cap = engine.capacity.cap(pool, 1.0)
    assert cap.pledge_millis == 1000
    assert cap.recall_id == "rc-a"
    assert engine.capacity.freed_millis(pool, DAY + 7000.0, DAY + 8000.0, 1) == 1000
    assert engine.capacity.freed_millis(pool, DAY + 7000.0, DAY + 8000.0, 2) == 1000


def test_booked_recall_keeps_its_notice() -> None:
    engine, _ = recall_engine()
    for i in range(8):
        engine.submit(job(f"j{i}", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(0.0)
    # An urgent recall of 1 now and a booked one of all 8 tomorrow: the urgent one's short
    # notice applies to one job only.
    engine.apply(recall("rc-a", 1, 60.0, 660.0))
    engine.apply(recall("rc-b", 8, DAY, DAY + 7200.0))

    decisions = preempted(engine.schedule(1.0))

    urgent = [d for d in decisions if d.cause_id == "rc-a"]
    booked = [d for d in decisions if d.cause_id == "rc-b"]
    assert len(urgent) == 1
    assert urgent[0].deadline == 60.0
    assert len(booked) == 7
    assert {d.deadline for d in booked} == {DAY}
