"""Gangs: all or nothing, topology, repair after node loss."""

from __future__ import annotations

from scheduler.engine import (
    NodeDrain,
    ReplaceTask,
    Requeue,
    TasksStopped,
    Topology,
)
from tests.engine.helpers import accelerator_count, job, make_engine, node, placed, reasons


def test_two_gangs_on_eight_free_admit_exactly_one() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("g1", accelerators=1, tasks=6, topology=Topology.SAME_REGION))
    engine.submit(job("g2", accelerators=1, tasks=6, topology=Topology.SAME_REGION, submit=1))

    result = engine.schedule(10.0)

    assert list(placed(result)) == ["g1"]
    assert accelerator_count(placed(result)["g1"]) == 6
    assert engine.running() == ["g1"]
    assert reasons(result)["g2"] in {"no_capacity", "fair_share", "topology"}
    free = sum(n.free_whole for n in engine.fleet.nodes)
    assert free == 2


def test_waiting_gang_allocates_nothing() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("big", accelerators=1, tasks=6, topology=Topology.SAME_REGION))

    result = engine.schedule(0.0)

    assert placed(result) == {}
    assert engine.fleet.nodes[0].free_whole == 4
    assert engine.fleet.nodes[0].jobs == {}


def test_same_node_gang_never_spans_nodes() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("g", accelerators=1, tasks=6, topology=Topology.SAME_NODE))

    result = engine.schedule(0.0)

    assert placed(result) == {}
    assert reasons(result)["g"] == "topology"


def test_interconnect_domain_gang_stays_in_one_domain() -> None:
    engine = make_engine()
    engine.add_node(node("a1", 4, domain="nvl-a"))
    engine.add_node(node("b1", 4, domain="nvl-b"))
    engine.add_node(node("b2", 4, domain="nvl-b"))
    engine.submit(job("g", accelerators=2, tasks=4, topology=Topology.SAME_INTERCONNECT_DOMAIN))

    place = placed(engine.schedule(0.0))["g"]

    assert {t.node_id for t in place.tasks} == {"b1", "b2"}


def test_gang_never_spans_providers_unless_allowed() -> None:
    engine = make_engine()
    engine.add_node(node("x1", 4, provider="px"))
    engine.add_node(node("y1", 4, provider="py"))
    engine.submit(job("strict", accelerators=1, tasks=6))
    engine.submit(job("loose", accelerators=1, tasks=6, allow_cross_provider=True, submit=1))

    result = engine.schedule(0.0)

    assert "strict" not in placed(result)
    assert {t.node_id for t in placed(result)["loose"].tasks} == {"x1", "y1"}


def test_drained_gang_task_replaced_first() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.add_node(node("n3", 4))
    engine.submit(job("gang", accelerators=2, tasks=4, topology=Topology.SAME_REGION))
    first = placed(engine.schedule(0.0))["gang"]
    lost_node = next(t.node_id for t in first.tasks if t.node_id != "n1")

    engine.apply(NodeDrain(lost_node, evict=True))
    engine.submit(job("small", accelerators=2, submit=5.0))
    result = engine.schedule(10.0)

    replaced = [d for d in result.decisions if isinstance(d, ReplaceTask)]
    assert len(replaced) == 2
    assert {d.task.node_id for d in replaced} == {"n1", "n2", "n3"} - {"n1", lost_node}
    assert all(d.lost_node_id == lost_node for d in replaced)
    assert "small" not in placed(result)
    assert engine.running() == ["gang"]


def test_gang_without_room_requeued_whole() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("gang", accelerators=4, tasks=2, topology=Topology.SAME_REGION))
    engine.schedule(0.0)

    engine.apply(NodeDrain("n2", evict=True))
    result = engine.schedule(10.0)

    requeued = [d for d in result.decisions if isinstance(d, Requeue)]
    assert [d.job_id for d in requeued] == ["gang"]
    assert engine.pending() == ["gang"]
    assert reasons(result)["gang"] in {"no_capacity", "topology"}
    # Its task on n1 may run until n1 confirms the stop.
    n1 = engine.fleet.by_id["n1"]
    assert n1.fenced == {"gang#1"}
    assert n1.free_whole == 0

    engine.apply(TasksStopped("n1", "gang"))

    assert n1.free_whole == 4
    assert n1.jobs == {}
