"""Removing a node from the fleet: only an empty one, and nothing that names it breaks."""

from __future__ import annotations

import pytest

from scheduler.engine import (
    Engine,
    InvalidInputError,
    JobEnded,
    JobOutcome,
    NodeDown,
    NodeDrain,
    NodeMissedHeartbeats,
    Preempt,
    PriorityClass,
    Reserve,
    Topology,
)
from tests.engine.helpers import job, make_engine, node, nodes_of, placed


def test_removed_node_leaves_pool_and_id() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 8))
    old = engine.fleet.by_id["n2"]
    pool = old.pool
    engine.apply(NodeDrain("n2"))

    engine.remove_node("n2")

    assert "n2" not in engine.fleet.by_id
    assert [n.spec.node_id for n in pool.nodes] == ["n1"]
    assert pool.total_millis == 4000
    assert pool.max_accelerators == 4
    engine.submit(job("eight", accelerators=8))
    result = engine.schedule(0.0)
    assert placed(result) == {}
    [waiting] = result.waiting
    assert "the largest node of models A100-SXM4-80GB in p1/r1 has 4" in waiting.message

    engine.add_node(node("n2", 8))

    result = engine.schedule(1.0)
    assert nodes_of(placed(result)["eight"]) == {"n2"}
    assert engine.fleet.by_id["n2"] is not old
    assert engine.fleet.by_id["n2"].ordinal != old.ordinal


def test_removing_last_node_leaves_no_model() -> None:
    engine = make_engine()
    engine.add_node(node("t1", 2, model="T4"))
    engine.add_node(node("a1", 2))
    engine.submit(job("t4-pair", accelerators=2, models=frozenset({"T4"})))
    engine.submit(job("t4-four", accelerators=4, models=frozenset({"T4"})))
    engine.submit(job("anywhere", accelerators=4, regions=frozenset({"p1/r1"})))
    engine.apply(NodeDrain("t1"))
    engine.apply(NodeDrain("a1"))

    engine.remove_node("t1")
    engine.remove_node("a1")
    result = engine.schedule(0.0)

    by_job = {w.job_id: w for w in result.waiting}
    for job_id in ("t4-pair", "t4-four"):
        assert by_job[job_id].reason == "no_matching_model"
        assert by_job[job_id].message == "no node in the fleet has an accepted accelerator model"
    assert by_job["anywhere"].reason == "no_matching_model"
    assert by_job["anywhere"].message == "no node in the allowed regions (p1/r1)"
    assert all("has 0" not in w.message for w in result.waiting)

    engine.add_node(node("t2", 2, model="T4"))
    result = engine.schedule(1.0)

    assert nodes_of(placed(result)["t4-pair"]) == {"t2"}
    by_job = {w.job_id: w for w in result.waiting}
    assert by_job["t4-four"].reason == "task_too_large"
    assert "the largest node of models T4 in p1/r1 has 2" in by_job["t4-four"].message


def test_up_node_without_jobs_is_removed() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.add_node(node("n2", 2))

    engine.remove_node("n1")

    engine.submit(job("pair", accelerators=2))
    engine.submit(job("other", accelerators=2))
    result = engine.schedule(0.0)
    assert nodes_of(placed(result)["pair"]) == {"n2"}
    assert "other" not in placed(result)
    assert engine.fleet.by_id["n2"].pool.up_accelerators == 2


def test_node_running_a_job_is_not_removed() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=2))
    engine.schedule(0.0)
    engine.apply(NodeDrain("n1"))

    with pytest.raises(InvalidInputError, match="n1: accelerators are still allocated to a#1"):
        engine.remove_node("n1")

    assert "n1" in engine.fleet.by_id
    assert engine.running() == ["a"]
    assert engine.fleet.by_id["n1"].pool.total_millis == 4000


def test_unconfirmed_copy_blocks_removal() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("a", accelerators=4))
    first = placed(engine.schedule(0.0))["a"]
    lost = next(iter(nodes_of(first)))

    engine.apply(NodeMissedHeartbeats(lost), 5.0)
    engine.schedule(10.0)

    # The lost node's copy of a may still run, so its accelerators stay allocated.
    with pytest.raises(InvalidInputError, match="still allocated"):
        engine.remove_node(lost)

    engine.apply(NodeDown(lost), 20.0)
    engine.remove_node(lost)

    assert lost not in engine.fleet.by_id
    assert engine.running() == ["a"]


def test_unknown_node_id_is_rejected() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.remove_node("n1")

    with pytest.raises(InvalidInputError, match="n1: not in the fleet"):
        engine.remove_node("n1")
    with pytest.raises(InvalidInputError, match="n9: not in the fleet"):
        engine.remove_node("n9")


def test_reservation_on_removed_node_is_dropped() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.add_node(node("n3", 4))
    engine.submit(job("long", accelerators=4, wall_time_s=1000.0))
    engine.submit(job("other", accelerators=4, wall_time_s=2000.0, submit=0.5))
    engine.schedule(0.0)
    engine.submit(
        job(
            "gang",
            accelerators=4,
            tasks=2,
            topology=Topology.SAME_REGION,
            wall_time_s=500.0,
            submit=1.0,
        )
    )
    [reserve] = [d for d in engine.schedule(2.0).decisions if isinstance(d, Reserve)]
    busy = nodes_of_job(engine, "long") | nodes_of_job(engine, "other")
    (idle,) = {"n1", "n2", "n3"} - busy
    assert idle in reserve.node_ids

    engine.apply(NodeDrain(idle), 3.0)
    engine.remove_node(idle)
    result = engine.schedule(4.0)

    [reserve] = [d for d in result.decisions if isinstance(d, Reserve)]
    assert set(reserve.node_ids) == busy
    assert reserve.start_time == 2000.0
    [waiting] = result.waiting
    assert waiting.message.endswith("0 accelerators free; reserved from t=2000 s")
    engine.apply(JobEnded("long", JobOutcome.COMPLETED), 1000.0)
    engine.apply(JobEnded("other", JobOutcome.COMPLETED), 2000.0)
    result = engine.schedule(2000.0)
    assert nodes_of(placed(result)["gang"]) == busy


def test_preemptor_room_on_removed_node() -> None:
    engine = make_engine()
    engine.add_node(node("n0", 1))
    engine.add_node(node("n1", 1))
    for index in range(2):
        engine.submit(job(f"low{index}", priority=PriorityClass.PREEMPTIBLE, wall_time_s=600.0))
    engine.schedule(0.0)
    engine.submit(job("high", priority=PriorityClass.INTERACTIVE, submit=1.0))
    [victim] = [d for d in engine.schedule(1.0).decisions if isinstance(d, Preempt)]
    victim_node = next(iter(nodes_of_job(engine, victim.job_id)))

    # The preemptor's room is the victim's node. That node is drained and removed once the
    # victim stopped, so the next pass finds the room it kept gone.
    engine.apply(NodeDrain(victim_node), 2.0)
    engine.apply(JobEnded(victim.job_id, JobOutcome.PREEMPTED), 2.0)
    engine.remove_node(victim_node)

    now = 3.0
    for _ in range(5):
        result = engine.schedule(now)
        for decision in result.decisions:
            if isinstance(decision, Preempt):
                engine.apply(JobEnded(decision.job_id, JobOutcome.PREEMPTED), now)
        if "high" in placed(result):
            break
        now += 1.0
    assert nodes_of(placed(result)["high"]) == {"n0", "n1"} - {victim_node}


def nodes_of_job(engine: Engine, job_id: str) -> set[str]:
    tasks = engine.jobs[job_id].tasks
    assert tasks is not None
    return {allocation.node.spec.node_id for allocation in tasks.values()}
