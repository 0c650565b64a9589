"""One failed accelerator: kept out of placement, its jobs requeued whole, back on recovery."""

from __future__ import annotations

import pytest

from scheduler.engine import (
    AcceleratorFailed,
    AcceleratorRecovered,
    Cause,
    InvalidInputError,
    JobEnded,
    JobOutcome,
    NodeDrain,
    NodeUndrain,
    Requeue,
    TaskPlacement,
    TasksStopped,
    Topology,
)
from tests.engine.helpers import job, make_engine, node, placed


def requeues(result: object) -> dict[str, Requeue]:
    return {d.job_id: d for d in result.decisions if isinstance(d, Requeue)}  # type: ignore[attr-defined]


def used_ids(engine: object, job_id: str) -> set[str]:
    place = engine.jobs[job_id]  # type: ignore[attr-defined]
    return {
        allocation.node.spec.accelerator_ids[i]
        for allocation in place.tasks.values()
        for i in allocation.indices
    }


def test_gang_on_failed_accelerator_is_requeued_whole() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.submit(job("gang", accelerators=1, tasks=8, topology=Topology.SAME_NODE))
    assert "gang" in placed(engine.schedule(0.0))

    engine.apply(AcceleratorFailed("n1", "n1-gpu3", "n1/boot/7", "XID 79: fallen off the bus"))
    result = engine.schedule(10.0)

    requeue = requeues(result)["gang"]
    assert requeue.cause is Cause.ACCELERATOR_FAILURE
    assert requeue.cause_id == "n1/boot/7"
    assert "n1-gpu3" in requeue.message
    assert "health event n1/boot/7" in requeue.message
    assert engine.pending() == ["gang"]
    # Its tasks may run until n1 confirms their stops, so every share stays until then.
    n1 = engine.fleet.by_id["n1"]
    assert n1.fenced == {"gang#1"}
    assert n1.used == [1000] * 8
    assert n1.free_whole == 0

    engine.apply(TasksStopped("n1", "gang"))

    assert n1.used == [0] * 8
    assert n1.free_whole == 7
    assert n1.jobs == {}


def test_requeued_gang_waits_instead_of_looping() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.submit(job("gang", accelerators=1, tasks=8, topology=Topology.SAME_NODE))
    engine.schedule(0.0)
    engine.apply(AcceleratorFailed("n1", "n1-gpu3", "e1"))
    engine.schedule(10.0)

    for now in (20.0, 30.0):
        result = engine.schedule(now)
        assert placed(result) == {}
        assert requeues(result) == {}
    assert engine.pending() == ["gang"]


def test_later_job_never_gets_failed_accelerator() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.apply(AcceleratorFailed("n1", "n1-gpu3", "e1"))
    for index in range(7):
        engine.submit(job(f"j{index}", accelerators=1, submit=float(index)))
    engine.submit(job("last", accelerators=1, submit=9.0))

    result = engine.schedule(10.0)

    got = {
        acc for place in placed(result).values() for t in place.tasks for acc in t.accelerator_ids
    }
    assert len(got) == 7
    assert "n1-gpu3" not in got
    assert "last" not in placed(result)
    assert engine.fleet.by_id["n1"].free_whole == 0


def test_recovered_accelerator_is_placeable_again() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.apply(AcceleratorFailed("n1", "n1-gpu3", "e1"))
    engine.submit(job("big", accelerators=8))
    assert placed(engine.schedule(0.0)) == {}

    engine.apply(AcceleratorRecovered("n1", "n1-gpu3"))
    result = engine.schedule(10.0)

    assert "big" in placed(result)
    assert "n1-gpu3" in used_ids(engine, "big")


def test_fractional_jobs_sharing_failed_accelerator() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.submit(job("a", accelerators=0.25, submit=0.0))
    engine.submit(job("b", accelerators=0.25, submit=1.0))
    engine.submit(job("c", accelerators=1, submit=2.0))
    engine.schedule(5.0)
    shared = used_ids(engine, "a")
    assert shared == used_ids(engine, "b")
    (failed,) = shared
    healthy = used_ids(engine, "c")

    engine.apply(AcceleratorFailed("n1", failed, "e2"))
    result = engine.schedule(10.0)

    assert set(requeues(result)) == {"a", "b"}
    assert engine.running() == ["c"]
    n1 = engine.fleet.by_id["n1"]
    assert list(n1.pool.shared) == []
    assert engine.pending() == ["a", "b"]

    engine.apply(JobEnded("c", JobOutcome.COMPLETED))
    result = engine.schedule(20.0)
    for job_id in ("a", "b"):
        assert used_ids(engine, job_id) == healthy


def test_share_on_failed_accelerator_is_not_offered() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.submit(job("a", accelerators=0.5))
    engine.schedule(0.0)
    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e3"))
    engine.submit(job("b", accelerators=0.25, submit=1.0))

    result = engine.schedule(10.0)

    assert "b" not in placed(result)
    assert set(requeues(result)) == {"a"}
    assert engine.pending() == ["a", "b"]


def test_repeated_failure_event_changes_nothing() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=2))
    engine.schedule(0.0)
    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e1"))
    first = engine.schedule(10.0)
    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e1-again"))
    second = engine.schedule(20.0)

    assert set(requeues(first)) == {"a"}
    assert "a" in placed(first)
    assert requeues(second) == {}
    assert engine.fleet.by_id["n1"].failed == {0: "e1"}
    assert "n1-gpu0" not in used_ids(engine, "a")


def test_failed_accelerator_stays_out_across_drain() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.apply(AcceleratorFailed("n1", "n1-gpu1", "e1"))
    engine.apply(NodeDrain("n1"))
    engine.apply(NodeUndrain("n1"))
    engine.submit(job("a", accelerators=2))
    engine.submit(job("b", accelerators=1, submit=1.0))

    result = engine.schedule(10.0)

    assert set(placed(result)) == {"b"}
    assert used_ids(engine, "b") == {"n1-gpu0"}
    assert engine.fleet.by_id["n1"].pool.up_accelerators == 1


def test_adopted_job_on_failed_accelerator_is_requeued() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e9"))
    engine.adopt(job("a", accelerators=1), [TaskPlacement(0, "n1", ("n1-gpu0",), 1000)], 0.0)

    result = engine.schedule(10.0)

    assert requeues(result)["a"].cause_id == "e9"
    assert used_ids(engine, "a") == {"n1-gpu1"}


def test_unknown_accelerator_is_rejected() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    with pytest.raises(InvalidInputError, match="accelerator_id: n1-gpu9 is not on node n1"):
        engine.apply(AcceleratorFailed("n1", "n1-gpu9", "e1"))
    with pytest.raises(InvalidInputError, match="event_id"):
        engine.apply(AcceleratorFailed("n1", "n1-gpu0", ""))
    assert engine.fleet.by_id["n1"].failed == {}
