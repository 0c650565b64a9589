"""Nodes that run a limited number of jobs at once (an agent's pool of task users)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.engine import (
    InvalidInputError,
    JobEnded,
    JobOutcome,
    Preempt,
    PriorityClass,
    Reserve,
)
from scheduler.engine.fleet import NodeRecord
from tests.engine.helpers import job, make_engine, node, placed


def _index_holds(record: NodeRecord) -> bool:
    """Return whether the pool's free-capacity index lists ``record``."""
    return record.ordinal in record.pool.buckets[record.free_whole]


def test_node_takes_at_most_max_jobs() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=2))
    for i in range(4):
        engine.submit(job(f"j{i}", accelerators=1, submit=float(i)))

    result = engine.schedule(0.0)

    assert sorted(placed(result)) == ["j0", "j1"]
    limited = engine.fleet.by_id["limited"]
    assert limited.free_whole == 2
    assert not _index_holds(limited)
    # The node is still up: its free accelerators count as capacity that exists.
    assert limited.pool.up_accelerators == 4


def test_ended_job_frees_slot() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=1))
    engine.submit(job("first", accelerators=1))
    engine.submit(job("second", accelerators=1, submit=1.0))
    assert list(placed(engine.schedule(0.0))) == ["first"]

    engine.apply(JobEnded("first", JobOutcome.COMPLETED), now=10.0)
    result = engine.schedule(10.0)

    assert list(placed(result)) == ["second"]


def test_full_node_sends_jobs_elsewhere() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 8), max_jobs=1))
    engine.add_node(node("open", 2))
    for i in range(3):
        engine.submit(job(f"j{i}", accelerators=1, submit=float(i)))

    result = engine.schedule(0.0)

    nodes = sorted(p.tasks[0].node_id for p in placed(result).values())
    assert nodes == ["limited", "open", "open"]


def test_fractional_jobs_count_per_job() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 1), max_jobs=2))
    for i in range(4):
        engine.submit(job(f"q{i}", accelerators=0.25, submit=float(i)))

    result = engine.schedule(0.0)

    assert len(placed(result)) == 2
    assert engine.fleet.by_id["limited"].used == [500]


def test_raised_limit_takes_more_jobs() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=1))
    engine.submit(job("a", accelerators=1))
    engine.submit(job("b", accelerators=1, submit=1.0))
    assert list(placed(engine.schedule(0.0))) == ["a"]

    engine.set_max_jobs("limited", 0)
    result = engine.schedule(1.0)

    assert list(placed(result)) == ["b"]
    assert _index_holds(engine.fleet.by_id["limited"])


def test_lowered_limit_keeps_running_jobs() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=1))
    engine.submit(job("b", accelerators=1, submit=1.0))
    assert sorted(placed(engine.schedule(0.0))) == ["a", "b"]

    engine.set_max_jobs("n1", 1)
    engine.submit(job("c", accelerators=1, submit=2.0))
    assert placed(engine.schedule(1.0)) == {}
    engine.apply(JobEnded("a", JobOutcome.COMPLETED), now=2.0)
    # One job still runs, which is the limit.
    assert placed(engine.schedule(2.0)) == {}
    engine.apply(JobEnded("b", JobOutcome.COMPLETED), now=3.0)

    assert list(placed(engine.schedule(3.0))) == ["c"]


def test_negative_limit_rejected() -> None:
    engine = make_engine()
    with pytest.raises(InvalidInputError, match="max_jobs must be >= 0"):
        engine.add_node(replace(node("n1", 1), max_jobs=-1))
    engine.add_node(node("n2", 1))
    with pytest.raises(InvalidInputError, match="max_jobs must be >= 0"):
        engine.set_max_jobs("n2", -1)


def test_busy_node_takes_no_jobs_until_cleared() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.set_busy("n1", True)
    engine.submit(job("a", accelerators=1))
    assert placed(engine.schedule(0.0)) == {}

    engine.set_busy("n1", False)

    assert list(placed(engine.schedule(1.0))) == ["a"]


def test_busy_mark_outlives_released_job() -> None:
    engine = make_engine()
    engine.add_node(replace(node("n1", 2), max_jobs=2))
    engine.submit(job("a", accelerators=1))
    assert list(placed(engine.schedule(0.0))) == ["a"]
    engine.set_busy("n1", True)
    engine.apply(JobEnded("a", JobOutcome.COMPLETED), now=1.0)
    engine.submit(job("b", accelerators=1, submit=1.0))

    assert placed(engine.schedule(1.0)) == {}
    assert not _index_holds(engine.fleet.by_id["n1"])


def test_reservation_counts_full_node() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=1))
    engine.submit(job("small", accelerators=1, wall_time_s=100.0))
    assert list(placed(engine.schedule(0.0))) == ["small"]
    engine.submit(job("big", accelerators=4, wall_time_s=100.0, submit=1.0))

    result = engine.schedule(1.0)

    [reserve] = [d for d in result.decisions if isinstance(d, Reserve)]
    assert reserve.job_id == "big"
    assert reserve.start_time == 100.0
    assert reserve.node_ids == ("limited",)


def test_full_node_preempted_for_higher_class() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=1))
    engine.submit(job("low", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    assert list(placed(engine.schedule(0.0))) == ["low"]
    # The node has 3 free accelerators, but its one job slot is taken by "low".
    engine.submit(job("high", accelerators=1, priority=PriorityClass.INTERACTIVE, submit=1.0))

    result = engine.schedule(1.0)

    preempted = [d.job_id for d in result.decisions if isinstance(d, Preempt)]
    assert preempted == ["low"]
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), now=2.0)
    assert list(placed(engine.schedule(2.0))) == ["high"]


def test_full_node_preempted_for_spread_gang() -> None:
    engine = make_engine()
    engine.add_node(replace(node("limited", 4), max_jobs=1))
    engine.submit(job("low", accelerators=1, priority=PriorityClass.PREEMPTIBLE))
    assert list(placed(engine.schedule(0.0))) == ["low"]
    engine.submit(
        job("gang", accelerators=1, tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0)
    )

    result = engine.schedule(1.0)

    preempted = [d.job_id for d in result.decisions if isinstance(d, Preempt)]
    assert preempted == ["low"]
