"""Which jobs and nodes priority preemption chooses: as few victims as needed, cheapest first."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.engine import (
    AcceleratorFailed,
    Engine,
    JobEnded,
    JobOutcome,
    Preempt,
    PriorityClass,
    ScheduleResult,
    TasksStopped,
)
from tests.engine.helpers import job, make_engine, node, nodes_of, placed

LOW = PriorityClass.PREEMPTIBLE
HIGH = PriorityClass.INTERACTIVE


def preempted(result: ScheduleResult) -> list[str]:
    return sorted(d.job_id for d in result.decisions if isinstance(d, Preempt))


def start(
    engine: Engine, now: float, *job_ids: str, accelerators: float = 2, **extra: object
) -> None:
    """Submit preemptible jobs at ``now`` and check that the pass at ``now`` starts them all."""
    for job_id in job_ids:
        engine.submit(job(job_id, accelerators=accelerators, priority=LOW, submit=now, **extra))
    assert sorted(placed(engine.schedule(now))) == sorted(job_ids)


def test_one_victim_frees_enough_on_one_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    start(engine, 0.0, "p1", "p2", "p3", "p4")
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    victims = preempted(result)
    assert len(victims) == 1
    assert set(engine.running()) == {"p1", "p2", "p3", "p4"}
    engine.apply(JobEnded(victims[0], JobOutcome.PREEMPTED))
    assert "high" in placed(engine.schedule(20.0))


def test_victims_cover_the_shortfall_only() -> None:
    # Three accelerators are missing: two 2-accelerator jobs, not all four.
    engine = make_engine()
    engine.add_node(node("n1", 9))
    start(engine, 0.0, "p1", "p2", "p3", "p4")
    engine.submit(job("high", accelerators=4, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    assert len(preempted(result)) == 2


def test_checkpointable_victim_goes_first() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    start(engine, 0.0, "plain")
    start(engine, 50.0, "saver", checkpointable=True)
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=55.0))

    result = engine.schedule(60.0)

    assert preempted(result) == ["saver"]


def test_youngest_victim_goes_first() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    start(engine, 0.0, "old")
    start(engine, 50.0, "young")
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=55.0))

    result = engine.schedule(60.0)

    assert preempted(result) == ["young"]


def test_smaller_victim_goes_first() -> None:
    # Both started together, so the 1-accelerator job has run fewer accelerator-seconds.
    engine = make_engine()
    engine.add_node(node("n1", 3))
    engine.submit(job("wide", accelerators=2, priority=LOW))
    engine.submit(job("narrow", accelerators=1, priority=LOW))
    assert sorted(placed(engine.schedule(0.0))) == ["narrow", "wide"]
    engine.submit(job("high", accelerators=1, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    assert preempted(result) == ["narrow"]


def test_one_large_victim_beats_two_small_ones() -> None:
    # Stopping "big" loses as many accelerator-seconds as stopping both small jobs, so the
    # single victim wins.
    engine = make_engine()
    engine.add_node(node("n1", 8))
    start(engine, 0.0, "big", accelerators=4)
    start(engine, 0.0, "s1", "s2")
    engine.submit(job("high", accelerators=4, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    assert preempted(result) == ["big"]


def test_node_with_cheaper_victims_is_chosen() -> None:
    # n1 comes first in every node order, but its job has run longer than the one on n2.
    engine = make_engine()
    engine.add_node(node("n1", 2))
    start(engine, 0.0, "old")
    engine.add_node(node("n2", 2))
    start(engine, 50.0, "young")
    assert _place_of(engine, "young") == {"n2"}
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=55.0))

    result = engine.schedule(60.0)

    assert preempted(result) == ["young"]
    engine.apply(JobEnded("young", JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(70.0))["high"]) == {"n2"}


def _place_of(engine: Engine, job_id: str) -> set[str]:
    record = engine.jobs[job_id]
    assert record.tasks is not None
    return {allocation.node.spec.node_id for allocation in record.tasks.values()}


def test_spread_gang_preempts_minimal_set_per_node() -> None:
    # n2 has room for one task. n1 must supply the other: stopping "big" frees four
    # accelerators, as stopping s1 and s2 does, with one job instead of two.
    engine = make_engine()
    engine.add_node(node("n1", 8))
    start(engine, 0.0, "big", accelerators=4)
    start(engine, 0.0, "s1", "s2")
    engine.add_node(node("n2", 8))
    start(engine, 0.0, "s3", "s4")
    assert _place_of(engine, "s3") == {"n2"}
    engine.submit(job("gang", accelerators=4, tasks=2, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    assert preempted(result) == ["big"]
    engine.apply(JobEnded("big", JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(20.0))["gang"]) == {"n1", "n2"}


def test_spread_gang_takes_part_of_a_node() -> None:
    # n2 has room for one task of 4 and the gang needs two more: the whole of n1 (four
    # victims) or one slot on each node (two jobs on n1 and b1 on n2), which stops three.
    engine = make_engine()
    engine.add_node(node("n1", 8))
    start(engine, 0.0, "a1", "a2", "a3", "a4")
    engine.add_node(node("n2", 8))
    start(engine, 0.0, "b1", accelerators=4)
    engine.submit(job("gang", accelerators=4, tasks=3, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    victims = preempted(result)
    assert len(victims) == 3
    assert "b1" in victims
    for victim in victims:
        engine.apply(JobEnded(victim, JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(20.0))["gang"]) == {"n1", "n2"}


def test_full_node_preempts_one_job_for_its_slot() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=2))
    start(engine, 0.0, "p1", "p2", accelerators=1)
    # Two accelerators are free, but both job slots are taken.
    engine.submit(job("high", accelerators=1, priority=HIGH, submit=5.0))

    result = engine.schedule(10.0)

    victims = preempted(result)
    assert len(victims) == 1
    engine.apply(JobEnded(victims[0], JobOutcome.PREEMPTED))
    assert "high" in placed(engine.schedule(20.0))


def test_minimal_preemption_settles() -> None:
    # Once the preemptor runs, no pass preempts again, and the victim waits for room.
    engine = make_engine()
    engine.add_node(node("n1", 8))
    start(engine, 0.0, "p1", "p2", "p3", "p4")
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=5.0))

    causes: list[tuple[str, str]] = []
    now = 10.0
    for _ in range(6):
        result = engine.schedule(now)
        for decision in result.decisions:
            if isinstance(decision, Preempt):
                causes.append((decision.job_id, decision.cause_id))
                engine.apply(JobEnded(decision.job_id, JobOutcome.PREEMPTED))
        now += 10.0

    assert len(causes) == 1
    victim, cause_id = causes[0]
    assert cause_id == "high"
    assert "high" in engine.running()
    assert engine.pending() == [victim]


def test_fenced_share_of_requeued_job_is_not_preempted() -> None:
    # The gang is requeued after a failure, and its share on b stays fenced until its stop
    # is confirmed. Preempting the pending gang would free nothing there.
    engine = make_engine()
    engine.add_node(node("b", 2))
    start(engine, 0.0, "other", accelerators=1)
    engine.add_node(node("a", 1))
    engine.submit(job("gang", tasks=2, priority=LOW))
    assert nodes_of(placed(engine.schedule(0.0))["gang"]) == {"a", "b"}
    engine.apply(AcceleratorFailed("a", "a-gpu0", "e1", "XID 79"))
    engine.schedule(5.0)
    assert engine.pending() == ["gang"]
    engine.submit(job("high", accelerators=2, priority=HIGH, submit=6.0))

    result = engine.schedule(10.0)

    assert preempted(result) == []
    engine.apply(TasksStopped("b", "gang"))
    assert preempted(engine.schedule(20.0)) == ["other"]
    engine.apply(JobEnded("other", JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(30.0))["high"]) == {"b"}


@pytest.mark.parametrize(("wall_time_s", "victim"), [(None, "dear"), (60.0, "cheap")])
def test_victims_respect_advance_reservation(wall_time_s: float | None, victim: str) -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    # "cheap" ends before the advance job's start, so only n1 can be reserved for it.
    start(engine, 0.0, "cheap", accelerators=4, checkpointable=True, wall_time_s=600.0)
    start(engine, 0.0, "dear", accelerators=4)
    engine.submit(job("booked", accelerators=4, start_at=1000.0, wall_time_s=60.0, submit=5.0))
    engine.schedule(5.0)
    # Without a wall-time limit the interactive job must avoid every reservation. With one
    # that ends before the reservation starts, it may take the cheaper victim on n1.
    engine.submit(job("high", accelerators=4, priority=HIGH, submit=10.0, wall_time_s=wall_time_s))

    result = engine.schedule(10.0)

    assert preempted(result) == [victim]


def test_gang_counts_no_free_room_of_reserved_node() -> None:
    engine = make_engine()
    for index in (1, 2, 3):
        engine.add_node(node(f"n{index}", 4))
    engine.submit(job("booked", accelerators=4, start_at=1000.0, wall_time_s=60.0))
    engine.schedule(0.0)
    start(engine, 1.0, "p2", "p3", accelerators=4)
    engine.submit(job("gang", accelerators=4, tasks=2, priority=HIGH, submit=5.0))

    result = engine.schedule(5.0)

    # The free n1 is reserved for "booked", so the gang needs both running nodes.
    assert preempted(result) == ["p2", "p3"]
