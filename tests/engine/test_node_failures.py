"""Unknown, down and draining nodes, and adopting running jobs."""

from __future__ import annotations

import pytest

from scheduler.engine import (
    AcceleratorFailed,
    Cause,
    Engine,
    Event,
    InvalidInputError,
    JobEnded,
    JobOutcome,
    JobRequeued,
    NodeDown,
    NodeDrain,
    NodeHeartbeat,
    NodeMissedHeartbeats,
    NodeState,
    NodeUndrain,
    Preempt,
    PriorityClass,
    ReplaceTask,
    Requeue,
    TaskPlacement,
    TasksStopped,
    Topology,
)
from tests.engine.helpers import job, make_engine, node, nodes_of, placed


def test_late_heartbeat_does_not_free_accelerators() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=4))
    engine.schedule(0.0)

    engine.apply(NodeMissedHeartbeats("n1"))
    result = engine.schedule(10.0)
    assert [d.job_id for d in result.decisions if isinstance(d, Requeue)] == ["a"]

    engine.apply(NodeHeartbeat("n1"))
    engine.submit(job("b", accelerators=1, submit=11.0))
    result = engine.schedule(20.0)

    n1 = engine.fleet.by_id["n1"]
    assert n1.state is NodeState.UP
    assert n1.free_whole == 0
    assert placed(result) == {}


def test_confirmed_stop_frees_unknown_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=4))
    engine.schedule(0.0)
    engine.apply(NodeMissedHeartbeats("n1"))
    engine.schedule(10.0)
    engine.apply(NodeHeartbeat("n1"))

    engine.apply(TasksStopped("n1", "a"))
    result = engine.schedule(20.0)

    assert "a" in placed(result)
    assert engine.fleet.by_id["n1"].free_whole == 0
    engine.apply(JobEnded("a", JobOutcome.COMPLETED))
    assert engine.fleet.by_id["n1"].free_whole == 4


def test_unknown_node_job_restarts_elsewhere() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("a", accelerators=4))
    first = placed(engine.schedule(0.0))["a"].tasks[0].node_id

    engine.apply(NodeMissedHeartbeats(first))
    result = engine.schedule(5.0)

    second = placed(result)["a"].tasks[0].node_id
    assert second != first
    assert engine.fleet.by_id[first].free_whole == 0


def test_down_node_releases_everything() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=2))
    engine.schedule(0.0)

    engine.apply(NodeDown("n1"))
    engine.schedule(1.0)

    n1 = engine.fleet.by_id["n1"]
    assert n1.used == [0, 0, 0, 0]
    assert engine.pending() == ["a"]


def test_draining_node_takes_no_new_tasks() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=1))
    engine.schedule(0.0)

    engine.apply(NodeDrain("n1"))
    engine.submit(job("b", accelerators=1, submit=1.0))
    result = engine.schedule(1.0)

    assert placed(result) == {}
    assert engine.running() == ["a"]


def test_undrain_takes_work_again() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.apply(NodeDrain("n1"))
    engine.submit(job("a", accelerators=1))
    assert placed(engine.schedule(0.0)) == {}

    engine.apply(NodeUndrain("n1"))

    assert "a" in placed(engine.schedule(1.0))


@pytest.mark.parametrize(
    "lost",
    [
        [NodeMissedHeartbeats("n1")],
        [NodeDown("n1")],
        [NodeMissedHeartbeats("n1"), NodeDown("n1")],
    ],
    ids=["unknown", "down", "unknown-then-down"],
)
def test_drain_survives_lost_node(lost: list[Event]) -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.apply(NodeDrain("n1"))
    for event in lost:
        engine.apply(event)

    engine.apply(NodeHeartbeat("n1"))
    engine.submit(job("a", accelerators=1))
    result = engine.schedule(1.0)

    assert engine.fleet.by_id["n1"].state is NodeState.DRAINING
    assert placed(result) == {}


def test_drain_while_unknown_applies_on_return() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.apply(NodeMissedHeartbeats("n1"))
    engine.apply(NodeDrain("n1"))
    assert engine.fleet.by_id["n1"].state is NodeState.UNKNOWN

    engine.apply(NodeHeartbeat("n1"))

    assert engine.fleet.by_id["n1"].state is NodeState.DRAINING


def test_undrain_while_unknown_returns_up() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.apply(NodeDrain("n1"))
    engine.apply(NodeMissedHeartbeats("n1"))
    engine.apply(NodeUndrain("n1"))

    engine.apply(NodeHeartbeat("n1"))
    engine.submit(job("a", accelerators=1))

    assert engine.fleet.by_id["n1"].state is NodeState.UP
    assert "a" in placed(engine.schedule(1.0))


def test_adopt_allocates_running_job() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    running = TaskPlacement(0, "n1", ("n1-gpu0", "n1-gpu1"), 1000)

    engine.adopt(job("old", accelerators=2), [running], start=0.0)
    engine.submit(job("new", accelerators=3, submit=1.0))
    result = engine.schedule(5.0)

    assert engine.running() == ["old"]
    assert engine.fleet.by_id["n1"].free_whole == 2
    assert placed(result) == {}


def test_adopt_rejects_taken_accelerator() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    first = TaskPlacement(0, "n1", ("n1-gpu0",), 1000)
    engine.adopt(job("a"), [first], start=0.0)

    with pytest.raises(InvalidInputError, match="no room"):
        engine.adopt(job("b"), [first], start=0.0)
    assert engine.running() == ["a"]
    assert "b" not in engine.jobs


def test_adopted_fence_holds_until_stop_confirmed() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    # A copy of an ended attempt held half of gpu0 and half of gpu1.
    assert engine.adopt_fence("n1", "old#1", ("n1-gpu0", "n1-gpu1"), 500)
    engine.submit(job("whole", accelerators=1))
    engine.submit(job("half", accelerators=0.5))

    result = engine.schedule(0.0)

    assert list(placed(result)) == ["half"]
    engine.apply(TasksStopped("n1", "old"))
    assert "whole" in placed(engine.schedule(1.0))


def test_adopt_fence_rejects_taken_accelerators() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.submit(job("a", accelerators=1))
    ((gpu,),) = [p.tasks[0].accelerator_ids for p in placed(engine.schedule(0.0)).values()]
    free = next(a for a in ("n1-gpu0", "n1-gpu1") if a != gpu)

    assert not engine.adopt_fence("n1", "old#1", (gpu,), 1000)
    assert not engine.adopt_fence("n1", "old#1", (free, "n1-gpu9"), 1000)
    assert not engine.adopt_fence("n9", "old#1", (free,), 1000)
    assert not engine.adopt_fence("n1", "a#1", (free,), 1000)
    assert engine.fleet.by_id["n1"].free_whole == 1
    assert not engine.fleet.by_id["n1"].fenced


def stopping_gang(engine: Engine) -> None:
    """Run gang ``g`` on n1 and n2, one accelerator each, and mark it stopping."""
    for name in ("n1", "n2", "n3"):
        engine.add_node(node(name, 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    assert nodes_of(placed(engine.schedule(0.0))["g"]) == {"n1", "n2"}
    engine.mark_stopping("g")


def test_stopping_gang_keeps_shares_on_lost_node() -> None:
    engine = make_engine()
    stopping_gang(engine)
    engine.submit(job("next", submit=1.0))

    engine.apply(NodeMissedHeartbeats("n1"))
    result = engine.schedule(10.0)

    # Not repaired in place: requeued whole, with its share on n2 fenced, not freed.
    requeues = [d for d in result.decisions if isinstance(d, Requeue)]
    assert [(d.job_id, d.message) for d in requeues] == [
        ("g", "lost task(s) on node n1 while it stopped")
    ]
    assert not any(isinstance(d, ReplaceTask) for d in result.decisions)
    assert nodes_of(placed(result)["next"]) == {"n3"}
    n2 = engine.fleet.by_id["n2"]
    assert n2.free_whole == 0
    assert n2.fenced == {"g#1"}

    engine.apply(TasksStopped("n2", "g"))
    assert n2.free_whole == 1
    assert engine.fleet.by_id["n1"].free_whole == 0


def test_release_fences_keeps_running_attempt() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.add_node(node("n2", 1))
    engine.add_node(node("n3", 1))
    assert engine.adopt_fence("n1", "a#old", ("n1-gpu0",), 1000)
    tasks = [TaskPlacement(0, "n2", ("n2-gpu0",), 1000), TaskPlacement(1, "n1", ("n1-gpu1",), 1000)]
    engine.adopt(job("a", tasks=2), tasks, 0.0)
    # n1 is lost: task 1 moves to n3, and the running attempt's share on n1 stays fenced.
    engine.apply(NodeMissedHeartbeats("n1"))
    result = engine.schedule(1.0)
    assert [d.task.node_id for d in result.decisions if isinstance(d, ReplaceTask)] == ["n3"]
    engine.apply(NodeHeartbeat("n1"))
    n1 = engine.fleet.by_id["n1"]
    assert n1.fenced == {"a#old", "a#1"}

    engine.release_fences("n1", "a", keep_running=True)

    assert n1.fenced == {"a#1"}
    assert n1.used == [0, 1000]
    engine.release_fences("n1", "a", keep_running=False)
    assert not n1.fenced
    assert n1.used == [0, 0]


def test_requeued_gang_keeps_survivor_fenced() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.add_node(node("n2", 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    first = placed(engine.schedule(0.0))["g"]
    assert nodes_of(first) == {"n1", "n2"}
    survivor, lost = (task.node_id for task in sorted(first.tasks, key=lambda t: t.task_index))
    engine.submit(job("next", submit=1.0))

    engine.apply(NodeMissedHeartbeats(lost))
    result = engine.schedule(10.0)

    requeues = [d for d in result.decisions if isinstance(d, Requeue)]
    assert [(d.job_id, d.message) for d in requeues] == [
        ("g", f"lost task(s) on node {lost} and found no replacement")
    ]
    # Its task 0 gets a stop command but may still run, so nothing is placed there.
    assert placed(result) == {}
    survivor_node = engine.fleet.by_id[survivor]
    assert survivor_node.fenced == {"g#1"}
    assert survivor_node.free_whole == 0

    engine.apply(TasksStopped(survivor, "g"))

    assert not survivor_node.fenced
    assert survivor_node.free_whole == 1
    assert engine.fleet.by_id[lost].fenced == {"g#1"}


def test_gang_losing_task_zero_requeued_whole() -> None:
    engine = make_engine()
    for name in ("n1", "n2", "n3"):
        engine.add_node(node(name, 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    first = placed(engine.schedule(0.0))["g"]
    rendezvous_node, survivor = (t.node_id for t in sorted(first.tasks, key=lambda t: t.task_index))

    # n3 has room for task 0, but task 1 connects to task 0's node, so the gang restarts.
    engine.apply(NodeMissedHeartbeats(rendezvous_node))
    result = engine.schedule(10.0)

    assert not any(isinstance(d, ReplaceTask) for d in result.decisions)
    requeues = [d for d in result.decisions if isinstance(d, Requeue)]
    assert [(d.job_id, d.message) for d in requeues] == [
        ("g", f"lost task 0, the rendezvous host, on node {rendezvous_node}")
    ]
    assert engine.fleet.by_id[survivor].fenced == {"g#1"}


@pytest.mark.parametrize("stopping", [False, True], ids=["running", "stopping"])
def test_failed_accelerator_keeps_gang_fenced(stopping: bool) -> None:
    engine = make_engine()
    for name in ("n1", "n2"):
        engine.add_node(node(name, 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    assert nodes_of(placed(engine.schedule(0.0))["g"]) == {"n1", "n2"}
    if stopping:
        engine.mark_stopping("g")
    engine.submit(job("next", submit=1.0))

    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e1", "XID 48"))
    result = engine.schedule(10.0)

    requeues = [d for d in result.decisions if isinstance(d, Requeue)]
    assert [(d.job_id, d.cause) for d in requeues] == [("g", Cause.ACCELERATOR_FAILURE)]
    # Its task on n2 gets a stop command but may still run, so nothing is placed there.
    assert placed(result) == {}
    n1 = engine.fleet.by_id["n1"]
    n2 = engine.fleet.by_id["n2"]
    assert n1.fenced == {"g#1"}
    assert n2.fenced == {"g#1"}
    assert n2.free_whole == 0
    assert "next" not in placed(engine.schedule(20.0))

    engine.apply(TasksStopped("n2", "g"))
    result = engine.schedule(30.0)

    assert not n2.fenced
    assert nodes_of(placed(result)["next"]) == {"n2"}
    # The failed accelerator stays out of service once its share is released too.
    engine.apply(TasksStopped("n1", "g"))
    assert not n1.fenced
    assert n1.used == [0]
    assert n1.free_whole == 0
    assert engine.pending() == ["g"]
    assert placed(engine.schedule(40.0)) == {}


def test_failed_accelerator_fence_waits_for_unknown_node() -> None:
    engine = make_engine()
    for name in ("n1", "n2"):
        engine.add_node(node(name, 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    engine.schedule(0.0)
    engine.submit(job("next", submit=1.0))
    engine.apply(AcceleratorFailed("n1", "n1-gpu0", "e1"))
    engine.schedule(10.0)
    n2 = engine.fleet.by_id["n2"]

    # n2 goes silent before it confirms the stop, and its heartbeat later frees nothing.
    engine.apply(NodeMissedHeartbeats("n2"))
    engine.apply(NodeHeartbeat("n2"))
    result = engine.schedule(20.0)

    assert placed(result) == {}
    assert n2.state is NodeState.UP
    assert n2.fenced == {"g#1"}
    # Only a confirmed stop or a node marked down frees it.
    engine.apply(NodeDown("n2"))
    engine.apply(NodeHeartbeat("n2"))
    assert not n2.fenced
    assert nodes_of(placed(engine.schedule(30.0))["next"]) == {"n2"}


def test_preempted_checkpointable_gang_on_failed_accelerator() -> None:
    engine = make_engine(preemption_grace_s=120.0)
    for name in ("n1", "n2"):
        engine.add_node(node(name, 1))
    engine.submit(
        job(
            "g",
            tasks=2,
            priority=PriorityClass.PREEMPTIBLE,
            topology=Topology.SAME_PROVIDER,
            checkpointable=True,
        )
    )
    engine.schedule(0.0)
    engine.submit(job("high", priority=PriorityClass.INTERACTIVE, submit=5.0))
    preempts = [d for d in engine.schedule(10.0).decisions if isinstance(d, Preempt)]
    assert [(d.job_id, d.deadline) for d in preempts] == [("g", 130.0)]

    # An accelerator fails during the grace period. The gang is requeued at once, but its
    # tasks may still be writing their checkpoint, so the preemptor waits for the stops.
    engine.apply(AcceleratorFailed("n2", "n2-gpu0", "e1"))
    result = engine.schedule(20.0)

    assert [d.job_id for d in result.decisions if isinstance(d, Requeue)] == ["g"]
    assert placed(result) == {}
    assert engine.fleet.by_id["n1"].fenced == {"g#1"}
    engine.apply(TasksStopped("n1", "g"))
    assert nodes_of(placed(engine.schedule(30.0))["high"]) == {"n1"}


def test_requeued_gang_placed_elsewhere_at_once() -> None:
    engine = make_engine()
    for name, domain in (("a1", "nvl-a"), ("a2", "nvl-a"), ("b1", "nvl-b"), ("b2", "nvl-b")):
        engine.add_node(node(name, 1, domain=domain))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_INTERCONNECT_DOMAIN))
    first = nodes_of(placed(engine.schedule(0.0))["g"])
    lost, survivor = sorted(first)

    # The survivor's domain has no room for the lost task, so the gang is requeued.
    engine.apply(NodeMissedHeartbeats(lost))
    result = engine.schedule(10.0)

    assert [d.job_id for d in result.decisions if isinstance(d, Requeue)] == ["g"]
    assert nodes_of(placed(result)["g"]) == {"a1", "a2", "b1", "b2"} - first
    assert engine.fleet.by_id[survivor].fenced == {"g#1"}
    assert engine.fleet.by_id[survivor].free_whole == 0


def test_requeue_fences_only_stopping_tasks() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.add_node(node("n2", 1))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_NODE))
    assert nodes_of(placed(engine.schedule(0.0))["g"]) == {"n1"}

    # Task 1 failed to start, and task 0 got a stop command. A task index that names
    # another node than the task's allocation fences nothing.
    engine.apply(JobRequeued("g", ((0, "n1"), (1, "n2"))))

    assert engine.pending() == ["g"]
    n1 = engine.fleet.by_id["n1"]
    assert n1.fenced == {"g#1"}
    assert n1.free_whole == 1
    assert n1.used.count(1000) == 1
    engine.apply(TasksStopped("n1", "g"))
    assert not n1.fenced
    assert n1.free_whole == 2


def test_start_rejected_job_avoids_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.add_node(node("n2", 1))
    engine.submit(job("j"))
    first = nodes_of(placed(engine.schedule(0.0))["j"])
    other = {"n1", "n2"} - first

    # The node rejected the start and confirmed no task runs there.
    engine.apply(JobRequeued("j", avoid_nodes=tuple(first)))
    again = placed(engine.schedule(1.0))

    assert nodes_of(again["j"]) == other
    assert engine.jobs["j"].spec.avoid_nodes == frozenset(first)


def test_avoided_node_used_when_only_room() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.submit(job("j"))
    assert nodes_of(placed(engine.schedule(0.0))["j"]) == {"n1"}

    engine.apply(JobRequeued("j", avoid_nodes=("n1",)))
    again = placed(engine.schedule(1.0))

    assert nodes_of(again["j"]) == {"n1"}


def test_avoided_nodes_kept_across_requeues() -> None:
    engine = make_engine()
    for name in ("n1", "n2", "n3"):
        engine.add_node(node(name, 1))
    engine.submit(job("j"))
    used = nodes_of(placed(engine.schedule(0.0))["j"])
    engine.apply(JobRequeued("j", avoid_nodes=tuple(used)))
    used |= nodes_of(placed(engine.schedule(1.0))["j"])
    engine.apply(JobRequeued("j", avoid_nodes=tuple(sorted(used))))
    last = nodes_of(placed(engine.schedule(2.0))["j"])

    assert len(used) == 2
    assert last == {"n1", "n2", "n3"} - used


@pytest.mark.parametrize(("started", "noted"), [(True, True), (False, False)])
def test_requeue_note_only_after_start(started: bool, noted: bool) -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.submit(job("j"))
    assert "j" in placed(engine.schedule(0.0))
    engine.apply(JobRequeued("j", started=started))
    engine.apply(NodeDrain("n1"))

    waiting = {w.job_id: w.message for w in engine.schedule(1.0).waiting}

    assert waiting["j"].startswith("requeued") is noted


def test_requeue_of_pending_job_rejected() -> None:
    engine = make_engine()
    engine.submit(job("a"))

    with pytest.raises(InvalidInputError, match="job a: requeued but it is not running"):
        engine.apply(JobRequeued("a"))
    assert engine.pending() == ["a"]
