"""A lost task of a running gang started again on a new node, in the scheduler's pure core."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from acsp.v1 import agent_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.admission import HoldOutcome
from scheduler.service.engine_adapter import AcceleratorHealth, EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job, TaskPlacement
from scheduler.service.store import DispatchRecord, Orphan
from tests.scheduler.test_jobbook import NOW, make_job

NODES = ("n1", "n2", "n3")
"""One accelerator each, so a two-task gang fills two nodes and the third is free."""


def make_book(sizes: tuple[int, ...] = (1, 1, 1), names: tuple[str, ...] = NODES) -> JobBook:
    """Return a book whose nodes ``names`` have ``sizes`` accelerators each."""
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    for name, size in zip(names, sizes, strict=True):
        accelerators = tuple(
            AcceleratorView(f"{name}-GPU-{i}", "A100-SXM4-80GB") for i in range(size)
        )
        node = NodeView("prov", "reg", name, accelerators)
        adapter.add_node(fleet.apply_inventory(node, NOW).node)
    return JobBook(adapter, epoch=7)


def pass_at(book: JobBook, now: float) -> Effects:
    fx = Effects(now)
    book.apply_pass(book.engine.schedule(now), fx)
    return fx


def admitted(book: JobBook) -> Job:
    job = make_job(tasks=2)
    book.add([job], NOW + 1)
    pass_at(book, NOW + 1)
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), fx)
    return book.jobs[job.job_id]


def report(book: JobBook, node_key: str, task_id: str, state: str, now: float) -> Effects:
    fx = Effects(now)
    book.apply_task(node_key, task_id, state, 0, "", fx)
    return fx


def running(book: JobBook) -> Job:
    job = admitted(book)
    for task in job.placement:
        report(book, task.node_key, f"{job.job_id}/1/{task.task_index}", "started", NOW + 3)
    assert book.jobs[job.job_id].state == "running"
    return book.jobs[job.job_id]


def lose(book: JobBook, node_key: str, now: float = NOW + 10) -> Effects:
    book.engine.node_unknown(node_key, now)
    return pass_at(book, now)


def free_node(job: Job) -> str:
    used = {t.node_key for t in job.placement}
    return next(f"prov.reg.{n}" for n in NODES if f"prov.reg.{n}" not in used)


def test_replacement_keeps_job_running() -> None:
    book = make_book()
    job = running(book)
    survivor, lost = job.placement
    target = free_node(job)

    fx = lose(book, lost.node_key)

    replaced = book.jobs[job.job_id]
    assert replaced.state == "running"
    assert replaced.attempt == 1
    assert replaced.placement[0] == survivor
    assert replaced.placement[1].node_key == target
    assert replaced.placement[1].state == "assigned"
    commands = {
        (r.kind, r.node_key, r.task_index) for r in fx.commands if not r.kind.startswith("hosts:")
    }
    assert commands == {
        (f"stop:{lost.node_key}:1", lost.node_key, 1),
        (f"start:{target}:1", target, 1),
    }
    updates = [(r.node_key, r.task_index) for r in fx.commands if r.kind.startswith("hosts:")]
    assert updates == [(survivor.node_key, 0)]
    start = next(r for r in fx.commands if r.kind.startswith("start"))
    command = agent_pb2.AgentCommand.FromString(start.payload)
    assert command.task_id == f"{job.job_id}/1/1"
    assert command.command_id == f"{job.job_id}/1/1/start:{target}:1"
    assert command.placement_version == 1
    assert fx.events == []
    assert book.engine.running_in_engine(job.job_id)

    started = report(book, target, f"{job.job_id}/1/1", "started", NOW + 11)

    assert book.jobs[job.job_id].state == "running"
    assert book.jobs[job.job_id].placement[1].state == "started"
    assert started.events == []
    assert started.commands == []


def test_replaced_task_gets_current_rendezvous() -> None:
    book = make_book()
    job = running(book)
    survivor, lost = job.placement
    target = free_node(job)
    assert job.rendezvous_port

    fx = lose(book, lost.node_key)

    start = next(r for r in fx.commands if r.kind.startswith("start"))
    command = agent_pb2.AgentCommand.FromString(start.payload)
    # Without endpoints from inventories, a node's host is its node id.
    assert list(command.node_hosts) == [survivor.node, target.split(".")[-1]]
    assert list(command.task_node_indexes) == [0, 1]
    assert command.rendezvous_port == job.rendezvous_port
    assert book.jobs[job.job_id].rendezvous_port == job.rendezvous_port


def test_replacement_updates_running_tasks_hosts() -> None:
    book = make_book((1,) * 6, names=("n1", "n2", "n3", "n4", "n5", "n6"))
    job = make_job(tasks=4)
    book.add([job], NOW + 1)
    pass_at(book, NOW + 1)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), Effects(NOW + 2))
    placed = {t.task_index: t for t in book.jobs[job.job_id].placement}
    for index in (0, 1, 3):
        report(book, placed[index].node_key, f"{job.job_id}/1/{index}", "started", NOW + 3)
    # A task that exited runs nowhere, so it has no hosts file to rewrite.
    report(book, placed[2].node_key, f"{job.job_id}/1/2", "exited", NOW + 4)
    assert book.jobs[job.job_id].state == "running"

    fx = lose(book, placed[3].node_key)

    updates = [r for r in fx.commands if r.kind.startswith("hosts:")]
    assert {(r.task_index, r.node_key) for r in updates} == {
        (0, placed[0].node_key),
        (1, placed[1].node_key),
    }
    start = next(r for r in fx.commands if r.kind.startswith("start"))
    new_copy = agent_pb2.AgentCommand.FromString(start.payload)
    for record in updates:
        command = agent_pb2.AgentCommand.FromString(record.payload)
        assert command.kind == agent_pb2.COMMAND_KIND_UPDATE_HOSTS
        assert command.task_id == f"{job.job_id}/1/{record.task_index}"
        assert command.job_id == job.job_id
        assert command.node.node_id == placed[record.task_index].node
        assert command.command_id == f"{job.job_id}/1/{record.task_index}/{record.kind}"
        assert command.fencing_token == 7
        assert command.placement_version == 1
        assert list(command.node_hosts) == list(new_copy.node_hosts)
        assert list(command.task_node_indexes) == list(new_copy.task_node_indexes)
        assert command.rendezvous_port == new_copy.rendezvous_port
    assert placed[3].node not in new_copy.node_hosts
    # Each replacement sends updates of its own, so none is dropped as a duplicate of another.
    assert len({r.kind for r in updates}) == 1
    later = book.jobs[job.job_id].placement[3]
    report(book, later.node_key, f"{job.job_id}/1/3", "started", NOW + 11)
    again = lose(book, later.node_key, NOW + 20)
    kinds = {r.kind for r in again.commands if r.kind.startswith("hosts:")}
    assert kinds
    assert kinds.isdisjoint(r.kind for r in updates)


def test_task_back_on_earlier_node_gets_new_commands() -> None:
    book = make_book()
    job = running(book)
    task_id = f"{job.job_id}/1/1"
    first = job.placement[1].node_key
    commands: list[DispatchRecord] = []
    now = NOW + 10
    # Each lost node comes back empty, so the task moves between two nodes and back again.
    for _ in range(3):
        lost = book.jobs[job.job_id].placement[1].node_key
        commands += lose(book, lost, now).commands
        book.apply_node_running(lost, frozenset(), Effects(now + 1))
        book.engine.node_back(lost, now + 1)
        report(book, book.jobs[job.job_id].placement[1].node_key, task_id, "started", now + 2)
        now += 10

    second = free_node(job)
    starts = [r for r in commands if r.kind.startswith("start")]
    assert [r.node_key for r in starts] == [second, first, second]
    stops = [r for r in commands if r.kind.startswith("stop")]
    assert [r.node_key for r in stops] == [first, second, first]
    # The store drops a command whose key it has seen, so each move needs keys of its own.
    keys = [r.key for r in commands]
    assert len(set(keys)) == len(keys)
    ids = [agent_pb2.AgentCommand.FromString(r.payload).command_id for r in commands]
    assert len(set(ids)) == len(ids)
    # Each move raises the version of the hosts that the task 0 and the new copy get.
    versions = [
        agent_pb2.AgentCommand.FromString(r.payload).placement_version
        for r in commands
        if not r.kind.startswith("stop")
    ]
    assert versions == [1, 1, 2, 2, 3, 3]
    assert book.jobs[job.job_id].replacements == 3


def test_lost_task_zero_requeues_gang() -> None:
    book = make_book()
    job = running(book)
    rendezvous, survivor = job.placement
    assert job.rendezvous_port

    fx = lose(book, rendezvous.node_key)

    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert requeued.rendezvous_port == 0
    assert requeued.attempt_reason == (
        f"lost task 0, the rendezvous host, on node prov/reg/{rendezvous.node}"
    )
    assert not any(r.kind.startswith("start") for r in fx.commands)
    stops = {(r.kind, r.node_key) for r in fx.commands}
    assert stops == {("stop", rendezvous.node_key), ("stop", survivor.node_key)}


def test_old_copy_events_skip_new_task() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    target = free_node(job)
    lose(book, lost.node_key)
    task_id = f"{job.job_id}/1/1"

    late = report(book, lost.node_key, task_id, "started", NOW + 12)

    assert book.jobs[job.job_id].placement[1].node_key == target
    assert book.jobs[job.job_id].placement[1].state == "assigned"
    assert [(r.kind, r.node_key) for r in late.commands] == [
        (f"stop:{lost.node_key}:1", lost.node_key)
    ]
    assert late.changed == {}

    stopped = report(book, lost.node_key, task_id, "stopped", NOW + 13)

    assert book.jobs[job.job_id].state == "running"
    assert book.jobs[job.job_id].placement[1].state == "assigned"
    assert stopped.changed == {}
    # The confirmed stop released the lost node's fenced accelerator.
    fleet = book.engine.engine.fleet
    assert not fleet.node(lost.node_key).fenced


def test_node_listing_confirms_old_copy() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    lose(book, lost.node_key)
    assert book.engine.engine.fleet.node(lost.node_key).fenced

    book.apply_node_running(lost.node_key, frozenset(), Effects(NOW + 11))

    assert not book.engine.engine.fleet.node(lost.node_key).fenced


def test_unstarted_replacement_requeues_gang() -> None:
    book = make_book()
    job = running(book)
    survivor, lost = job.placement
    target = free_node(job)
    lose(book, lost.node_key, NOW + 10)

    early = Effects(NOW + 100)
    book.expire_starts(120.0, early)
    assert book.jobs[job.job_id].state == "running"

    fx = Effects(NOW + 131)
    book.expire_starts(120.0, fx)

    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert fx.changed[job.job_id][1] == "timer:start-deadline"
    stops = {(r.kind, r.node_key) for r in fx.commands}
    assert stops == {("stop", target), ("stop", survivor.node_key)}
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/requeued"]
    assert not book.engine.running_in_engine(job.job_id)
    assert requeued.avoid_nodes == (target,)


def test_unpublishable_replacement_fails_attempt() -> None:
    book = make_book()
    job = running(book)
    fx = lose(book, job.placement[1].node_key)
    start = next(r for r in fx.commands if r.kind.startswith("start"))
    rejected = Effects(NOW + 11)

    book.fail_unpublishable(start, "payload too large", rejected)

    assert book.jobs[job.job_id].state == "stopping"
    assert book.jobs[job.job_id].placement[1].state == "start_failed"


def test_unpublishable_old_start_ignored() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    lose(book, lost.node_key)
    first = DispatchRecord(job.job_id, 1, 1, "start", lost.node_key, b"")
    fx = Effects(NOW + 11)

    book.fail_unpublishable(first, "payload too large", fx)

    assert book.jobs[job.job_id].state == "running"
    assert fx.changed == {}


def test_replacement_before_hold_requeues_gang() -> None:
    book = make_book()
    job = make_job(tasks=2)
    book.add([job], NOW + 1)
    placed = pass_at(book, NOW + 1)
    lost = placed.admit[0][0].placement[1]

    fx = lose(book, lost.node_key)

    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert fx.changed[job.job_id][1] == "engine:requeue"
    assert not any(r.kind.startswith("start") for r in fx.commands)
    assert not book.engine.running_in_engine(job.job_id)


def test_requeue_reason_names_node_with_slashes() -> None:
    book = make_book()
    job = make_job(tasks=2)
    book.add([job], NOW + 1)
    placed = pass_at(book, NOW + 1)
    lost = placed.admit[0][0].placement[1]

    lose(book, lost.node_key)

    reason = book.jobs[job.job_id].reason
    assert reason == f"task 1 lost on prov/reg/{lost.node}"


def test_gang_without_room_names_lost_node() -> None:
    book = make_book()
    job = make_job(tasks=3)
    book.add([job], NOW + 1)
    pass_at(book, NOW + 1)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), Effects(NOW + 2))
    for task in book.jobs[job.job_id].placement:
        report(book, task.node_key, f"{job.job_id}/1/{task.task_index}", "started", NOW + 3)
    lost = book.jobs[job.job_id].placement[1]

    lose(book, lost.node_key)

    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert f"lost task(s) on node prov/reg/{lost.node} and found no replacement" in (
        requeued.reason
    )
    assert "prov.reg." not in requeued.reason


def test_replacement_stop_names_nodes_with_slashes() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    target = free_node(job)

    fx = lose(book, lost.node_key)

    stop = next(r for r in fx.commands if r.kind.startswith("stop"))
    command = agent_pb2.AgentCommand.FromString(stop.payload)
    assert command.reason == (
        f"task 1 lost on prov/reg/{lost.node}; replaced on {target.replace('.', '/')}"
    )


def test_restarted_book_keeps_lost_node_fenced() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    lose(book, lost.node_key)
    task_id = f"{job.job_id}/1/1"
    orphans, confirmed = book.take_orphan_writes()
    assert [(o.node_key, o.task_id, o.accelerators, o.millis) for o in orphans] == [
        (lost.node_key, task_id, lost.accelerators, 1000)
    ]
    assert confirmed == []
    assert book.take_orphan_writes() == ([], [])

    # A new leader re-enters the running gang and the stored copy. The lost node counts as up.
    restarted = make_book()
    restarted.add([book.jobs[job.job_id]], NOW + 20)
    restarted.adopt_orphans(orphans)
    single = make_job(tasks=1)
    restarted.add([single], NOW + 21)

    waiting = pass_at(restarted, NOW + 21)

    assert waiting.admit == []
    assert restarted.jobs[single.job_id].state == "pending"
    assert restarted.take_orphan_writes() == ([], [])

    restarted.apply_node_running(lost.node_key, frozenset(), Effects(NOW + 21))

    assert restarted.take_orphan_writes() == ([], [(lost.node_key, task_id)])
    placed = pass_at(restarted, NOW + 22)
    ((admitted_job, _),) = placed.admit
    assert admitted_job.job_id == single.job_id
    assert [t.node_key for t in admitted_job.placement] == [lost.node_key]


def test_node_marked_down_frees_old_copy() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    lose(book, lost.node_key)
    orphans, _ = book.take_orphan_writes()
    assert [o.node_key for o in orphans] == [lost.node_key]
    single = make_job(tasks=1)
    book.add([single], NOW + 11)
    assert pass_at(book, NOW + 11).admit == []

    # The operator declares the node off: its copy is confirmed stopped without a word from it.
    book.node_down(lost.node_key, Effects(NOW + 12))
    book.engine.node_down(lost.node_key, NOW + 12)

    assert book.take_orphan_writes() == ([], [(lost.node_key, f"{job.job_id}/1/1")])
    assert pass_at(book, NOW + 12).admit == []
    # Back with nothing running, the node takes the new job at once.
    book.engine.node_back(lost.node_key, NOW + 13)
    placed = pass_at(book, NOW + 13)
    ((admitted_job, _),) = placed.admit
    assert admitted_job.job_id == single.job_id
    assert [t.node_key for t in admitted_job.placement] == [lost.node_key]


def test_orphan_confirmed_in_its_turn_is_not_stored() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[1]
    lose(book, lost.node_key)

    report(book, lost.node_key, f"{job.job_id}/1/1", "stopped", NOW + 11)

    assert book.take_orphan_writes() == ([], [(lost.node_key, f"{job.job_id}/1/1")])


def test_stored_orphan_on_reused_accelerator_is_not_fenced() -> None:
    book = make_book()
    job = running(book)
    placed = job.placement[0]
    stale = Orphan(placed.node_key, "old-job/1/0", placed.accelerators, 1000)

    book.adopt_orphans([stale])

    # The running gang uses the accelerator, so the copy no longer had it.
    node = book.engine.engine.fleet.node(placed.node_key)
    assert not node.fenced
    book.apply_node_running(placed.node_key, frozenset(), Effects(NOW + 4))
    assert book.take_orphan_writes() == ([], [(placed.node_key, "old-job/1/0")])
    assert book.engine.running_in_engine(job.job_id)


def test_lost_node_ends_cancelled_gang() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    book.cancel(job.job_id, "not needed", "rpc:cancel", Effects(NOW + 5))

    fx = lose(book, lost.node_key)

    ended, cause = fx.changed[job.job_id]
    assert ended.state == "cancelled"
    assert cause == "rpc:cancel"
    assert job.job_id not in book.jobs
    assert not any(r.kind.startswith("start") for r in fx.commands)
    assert not book.engine.running_in_engine(job.job_id)
    fleet = book.engine.engine.fleet
    assert fleet.node(lost.node_key).fenced
    # The survivor still stops on its node, so its accelerator stays fenced too.
    assert fleet.node(survivor.node_key).free_whole == 0
    assert fleet.node(free_node(job)).free_whole == 1
    orphans, _ = book.take_orphan_writes()
    assert sorted(o.node_key for o in orphans) == sorted([lost.node_key, survivor.node_key])

    report(book, survivor.node_key, f"{job.job_id}/1/1", "stopped", NOW + 20)

    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced
    assert fleet.node(lost.node_key).fenced

    report(book, lost.node_key, f"{job.job_id}/1/0", "stopped", NOW + 30)

    assert not fleet.node(lost.node_key).fenced
    assert fleet.node(lost.node_key).free_whole == 1


def start_stop(book: JobBook, job: Job, preempted: bool, now: float) -> None:
    """Begin stopping ``job``: a preemption when ``preempted``, else a cancel."""
    fx = Effects(now)
    if preempted:
        book.stop(job.job_id, None, "preempted: priority urgent", 30, "engine:preempt", fx)
    else:
        book.cancel(job.job_id, "not needed", "rpc:cancel", fx)
    assert book.jobs[job.job_id].state == "stopping"


@pytest.mark.parametrize("preempted", [False, True], ids=["cancelled", "preempted"])
def test_lost_node_keeps_survivor_fenced(preempted: bool) -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    # A job on the third node leaves no room to replace the lost task, and one more waits.
    # The waiting job is short, so that a reservation of the requeued gang does not hold it.
    filler = make_job(tasks=1)
    book.add([filler], NOW + 4)
    pass_at(book, NOW + 4)
    book.apply_hold(filler.job_id, 1, HoldOutcome("held", "h2", "g1", Decimal(1)), Effects(NOW + 4))
    waiting = make_job(tasks=1)
    waiting = replace(waiting, spec=replace(waiting.spec, wall_time_s=60))
    book.add([waiting], NOW + 5)
    start_stop(book, job, preempted, NOW + 5)
    assert pass_at(book, NOW + 6).admit == []

    fx = lose(book, lost.node_key)

    # The pass that lost the node places nothing on the survivor's accelerator.
    assert [placed.job_id for placed, _ in fx.admit] == []
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 0
    expected = "pending" if preempted else None
    assert getattr(book.jobs.get(job.job_id), "state", None) == expected
    survivor_id = f"{job.job_id}/1/{survivor.task_index}"
    orphans, _ = book.take_orphan_writes()
    assert (survivor.node_key, survivor_id) in {(o.node_key, o.task_id) for o in orphans}
    assert pass_at(book, NOW + 11).admit == []

    report(book, survivor.node_key, survivor_id, "stopped", NOW + 20)

    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced
    assert fleet.node(lost.node_key).fenced
    assert book.take_orphan_writes() == ([], [(survivor.node_key, survivor_id)])


def test_survivor_stopped_before_loss_freed() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    start_stop(book, job, False, NOW + 5)
    survivor_id = f"{job.job_id}/1/{survivor.task_index}"
    report(book, survivor.node_key, survivor_id, "stopped", NOW + 6)

    lose(book, lost.node_key)

    # Only the lost node's copy still awaits a confirmed stop.
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced
    assert fleet.node(lost.node_key).fenced
    orphans, _ = book.take_orphan_writes()
    assert [o.node_key for o in orphans] == [lost.node_key]


def test_stopping_survivor_fenced_on_restart() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    start_stop(book, job, False, NOW + 5)
    lose(book, lost.node_key)
    orphans, _ = book.take_orphan_writes()

    # A new leader fences both stored copies, as the leader that stored them did.
    restarted = make_book()
    restarted.adopt_orphans(orphans)
    fleet = restarted.engine.engine.fleet
    assert fleet.node(lost.node_key).free_whole == 0
    assert fleet.node(survivor.node_key).free_whole == 0

    restarted.apply_node_running(survivor.node_key, frozenset(), Effects(NOW + 20))

    assert fleet.node(survivor.node_key).free_whole == 1
    assert fleet.node(lost.node_key).free_whole == 0


def test_old_copy_freed_beside_new_attempt() -> None:
    # n2 has room for the old copy and for the next attempt's task.
    book = make_book(sizes=(1, 2, 1))
    placement = (
        TaskPlacement(0, "prov", "reg", "n1", ("n1-GPU-0",), state="started"),
        TaskPlacement(1, "prov", "reg", "n2", ("n2-GPU-0",), state="started"),
    )
    job = replace(make_job(tasks=2), state="running", placement=placement, hold_id="h1")
    book.add([job], NOW + 1)
    start_stop(book, job, True, NOW + 5)

    fx = lose(book, "prov.reg.n1")

    (attempt,) = [placed for placed, _ in fx.admit if placed.job_id == job.job_id]
    assert attempt.attempt == 2
    assert sorted(t.accelerators for t in attempt.placement) == [("n2-GPU-1",), ("n3-GPU-0",)]
    book.apply_hold(job.job_id, 2, HoldOutcome("held", "h2", "g1", Decimal(1)), Effects(NOW + 11))
    for task in attempt.placement:
        report(book, task.node_key, f"{job.job_id}/2/{task.task_index}", "started", NOW + 12)
    n2 = book.engine.engine.fleet.node("prov.reg.n2")
    assert n2.used == [1000, 1000]

    # The old copy's confirmed stop frees its accelerator, though the next attempt runs there.
    report(book, "prov.reg.n2", f"{job.job_id}/1/1", "stopped", NOW + 20)

    assert n2.used == [0, 1000]
    assert not n2.fenced
    assert book.jobs[job.job_id].state == "running"


def test_failed_accelerator_keeps_survivor_fenced() -> None:
    book = make_book()
    job = running(book)
    failed, survivor = job.placement
    start_stop(book, job, False, NOW + 5)
    failure = AcceleratorHealth(failed.node_key, failed.accelerators[0], True, "n1/b/1", "XID 79")
    book.engine.set_accelerator_health(failure, NOW + 10)

    fx = pass_at(book, NOW + 10)

    assert fx.changed[job.job_id][0].state == "cancelled"
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 0
    survivor_id = f"{job.job_id}/1/{survivor.task_index}"
    report(book, survivor.node_key, survivor_id, "stopped", NOW + 20)
    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced


def test_lost_node_ends_cancelled_single_task() -> None:
    book = make_book()
    job = make_job(tasks=1)
    book.add([job], NOW + 1)
    pass_at(book, NOW + 1)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), Effects(NOW + 2))
    (task,) = book.jobs[job.job_id].placement
    report(book, task.node_key, f"{job.job_id}/1/0", "started", NOW + 3)
    book.cancel(job.job_id, "not needed", "rpc:cancel", Effects(NOW + 5))

    fx = lose(book, task.node_key)

    assert fx.changed[job.job_id][0].state == "cancelled"
    assert job.job_id not in book.jobs
    assert job.job_id not in book.engine.engine.jobs
    assert book.engine.engine.fleet.node(task.node_key).fenced


def test_lost_node_leaves_tasks_stopping() -> None:
    book = make_book()
    job = admitted(book)
    lost, survivor = job.placement
    book.cancel(job.job_id, "not needed", "rpc:cancel", Effects(NOW + 5))

    ended, _ = lose(book, lost.node_key).changed[job.job_id]

    assert ended.state == "cancelled"
    assert [t.state for t in ended.placement] == ["stopping", "stopping"]

    # Each node's confirmation replaces its task's state, as the node reported it.
    survivor_id = f"{job.job_id}/1/{survivor.task_index}"
    fx = Effects(NOW + 20)
    book.apply_task(survivor.node_key, survivor_id, "stopped", 143, "", fx)
    stopped, cause = fx.changed[job.job_id]
    assert stopped.state == "cancelled"
    assert cause == "task:stopped"
    assert [(t.state, t.exit_code) for t in stopped.placement] == [
        ("stopping", None),
        ("stopped", 143),
    ]
    fx = Effects(NOW + 30)
    book.apply_node_running(lost.node_key, frozenset(), fx)
    confirmed, _ = fx.changed[job.job_id]
    assert [(t.state, t.exit_code) for t in confirmed.placement] == [
        ("stopped", None),
        ("stopped", 143),
    ]

    # Both stops are confirmed, so later reports change the job no more.
    fx = report(book, lost.node_key, f"{job.job_id}/1/{lost.task_index}", "stopped", NOW + 31)
    assert fx.changed == {}


def test_restarted_book_records_confirmed_stop() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    book.cancel(job.job_id, "not needed", "rpc:cancel", Effects(NOW + 5))
    ended, _ = lose(book, lost.node_key).changed[job.job_id]
    orphans, _ = book.take_orphan_writes()

    # A new leader gets the copies and the ended job from the store.
    restarted = make_book()
    restarted.adopt_orphans(orphans)
    restarted.adopt_ended([ended])
    fx = Effects(NOW + 20)
    restarted.apply_node_running(survivor.node_key, frozenset(), fx)

    recorded, _ = fx.changed[job.job_id]
    assert [t.state for t in recorded.placement] == ["stopping", "stopped"]


def test_down_node_confirms_stopping_task() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    book.cancel(job.job_id, "not needed", "rpc:cancel", Effects(NOW + 5))
    lose(book, lost.node_key)
    report(book, survivor.node_key, f"{job.job_id}/1/{survivor.task_index}", "stopped", NOW + 6)

    fx = Effects(NOW + 20)
    book.node_down(lost.node_key, fx)

    confirmed, _ = fx.changed[job.job_id]
    assert [t.state for t in confirmed.placement] == ["stopped", "stopped"]


def test_reloaded_down_node_confirms_next_turn() -> None:
    book = make_book()
    job = running(book)
    lost = job.placement[0]
    lose(book, lost.node_key)
    orphans, _ = book.take_orphan_writes()
    restarted = make_book()
    restarted.adopt_orphans(orphans)

    restarted.reload_down(lost.node_key)
    assert restarted.take_orphan_writes() == ([], [])
    restarted.settle_reloaded(Effects(NOW + 20))

    assert restarted.take_orphan_writes() == ([], [(lost.node_key, f"{job.job_id}/1/0")])


def test_only_unknown_node_goes_down() -> None:
    fleet = FleetView(heartbeat_timeout_s=15)
    node = NodeView("prov", "reg", "n1", (AcceleratorView("n1-GPU-0", "A100-SXM4-80GB"),))
    key = fleet.apply_inventory(node, NOW).node.key
    assert fleet.set_down(key, "powered off") is None

    assert [c.node.status for c in fleet.expire(NOW + 20)] == ["unknown"]
    down = fleet.set_down(key, "powered off")
    assert down is not None
    assert (down.previous, down.node.status, down.reason) == ("unknown", "down", "powered off")
    assert fleet.expire(NOW + 40) == []

    back = fleet.apply_heartbeat(key, "boot-2", frozenset(), NOW + 41)
    assert back is not None
    assert (back.previous, back.node.status) == ("down", "up")


def fill_free_node(book: JobBook, now: float) -> Job:
    """Start a one-task job on the node a two-task gang left free, so that a lost task of
    the gang finds no replacement, and queue a short job that waits for a free node.

    The waiting job is short, so that a reservation of a requeued gang does not hold it.
    """
    filler = make_job(tasks=1)
    book.add([filler], now)
    pass_at(book, now)
    book.apply_hold(filler.job_id, 1, HoldOutcome("held", "h2", "g1", Decimal(1)), Effects(now))
    waiting = make_job(tasks=1)
    waiting = replace(waiting, spec=replace(waiting.spec, wall_time_s=60))
    book.add([waiting], now)
    assert pass_at(book, now).admit == []
    return waiting


def test_requeued_gang_keeps_survivor_fenced() -> None:
    book = make_book()
    job = running(book)
    survivor, lost = job.placement
    waiting = fill_free_node(book, NOW + 4)

    fx = lose(book, lost.node_key)

    assert book.jobs[job.job_id].state == "pending"
    assert "found no replacement" in book.jobs[job.job_id].reason
    # The pass that requeued the gang places nothing on the survivor's accelerator.
    assert fx.admit == []
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 0
    lost_id = f"{job.job_id}/1/{lost.task_index}"
    survivor_id = f"{job.job_id}/1/{survivor.task_index}"
    orphans, _ = book.take_orphan_writes()
    assert sorted((o.node_key, o.task_id, o.accelerators) for o in orphans) == sorted(
        [
            (lost.node_key, lost_id, lost.accelerators),
            (survivor.node_key, survivor_id, survivor.accelerators),
        ]
    )
    assert pass_at(book, NOW + 11).admit == []

    report(book, survivor.node_key, survivor_id, "stopped", NOW + 20)

    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced
    assert fleet.node(lost.node_key).fenced
    assert book.take_orphan_writes() == ([], [(survivor.node_key, survivor_id)])
    placed = pass_at(book, NOW + 21)
    assert [(j.job_id, j.placement[0].node_key) for j, _ in placed.admit] == [
        (waiting.job_id, survivor.node_key)
    ]


def test_requeued_survivor_fenced_on_restart() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    fill_free_node(book, NOW + 4)
    lose(book, lost.node_key)
    orphans, _ = book.take_orphan_writes()

    # A new leader fences both stored copies, as the leader that stored them did.
    restarted = make_book()
    restarted.adopt_orphans(orphans)
    fleet = restarted.engine.engine.fleet
    assert fleet.node(lost.node_key).free_whole == 0
    assert fleet.node(survivor.node_key).free_whole == 0

    restarted.apply_node_running(survivor.node_key, frozenset(), Effects(NOW + 20))

    assert fleet.node(survivor.node_key).free_whole == 1
    assert fleet.node(lost.node_key).free_whole == 0


def test_survivor_ended_before_loss_freed() -> None:
    book = make_book()
    job = running(book)
    lost, survivor = job.placement
    fill_free_node(book, NOW + 4)
    report(book, survivor.node_key, f"{job.job_id}/1/{survivor.task_index}", "exited", NOW + 5)

    lose(book, lost.node_key)

    # Nothing of the gang runs on the survivor's node, so the turn frees its accelerator.
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced
    orphans, _ = book.take_orphan_writes()
    assert [o.node_key for o in orphans] == [lost.node_key]


def test_requeue_during_admission_fences_nothing() -> None:
    book = make_book()
    job = make_job(tasks=2)
    book.add([job], NOW + 1)
    lost, survivor = pass_at(book, NOW + 1).admit[0][0].placement
    fill_free_node(book, NOW + 2)

    fx = lose(book, lost.node_key)

    # Its hold is still in flight, so no task of the gang started anywhere.
    assert book.jobs[job.job_id].state == "pending"
    assert fx.commands == []
    assert book.take_orphan_writes() == ([], [])
    fleet = book.engine.engine.fleet
    assert fleet.node(survivor.node_key).free_whole == 1
    assert not fleet.node(survivor.node_key).fenced


def test_start_failure_keeps_started_node_fenced() -> None:
    book = make_book()
    job = admitted(book)
    started, failed = job.placement
    started_id = f"{job.job_id}/1/{started.task_index}"
    report(book, started.node_key, started_id, "started", NOW + 3)

    report(book, failed.node_key, f"{job.job_id}/1/{failed.task_index}", "start_failed", NOW + 4)

    assert book.jobs[job.job_id].state == "pending"
    fleet = book.engine.engine.fleet
    assert fleet.node(started.node_key).fenced == {f"{job.job_id}#1"}
    assert fleet.node(failed.node_key).free_whole == 1
    orphans, _ = book.take_orphan_writes()
    assert [(o.node_key, o.task_id) for o in orphans] == [(started.node_key, started_id)]
    # The next attempt goes to the free nodes, not next to the copy that still stops.
    (attempt,) = [placed for placed, _ in pass_at(book, NOW + 5).admit]
    assert started.node_key not in {t.node_key for t in attempt.placement}

    report(book, started.node_key, started_id, "stopped", NOW + 6)

    assert not fleet.node(started.node_key).fenced
    assert fleet.node(started.node_key).free_whole == 1


def test_start_deadline_fences_until_confirmed() -> None:
    book = make_book()
    job = admitted(book)
    started, silent = job.placement
    started_id = f"{job.job_id}/1/{started.task_index}"
    report(book, started.node_key, started_id, "started", NOW + 3)

    book.expire_starts(120.0, Effects(NOW + 200))

    assert book.jobs[job.job_id].state == "pending"
    fleet = book.engine.engine.fleet
    assert fleet.node(started.node_key).free_whole == 0
    assert fleet.node(silent.node_key).free_whole == 0
    # Only the third node is free, so the gang's next attempt does not fit yet.
    assert pass_at(book, NOW + 201).admit == []

    # The silent node never got its start command, so a heartbeat without the task confirms.
    book.apply_node_running(silent.node_key, frozenset(), Effects(NOW + 202))

    assert fleet.node(silent.node_key).free_whole == 1
    assert fleet.node(started.node_key).free_whole == 0
    report(book, started.node_key, started_id, "stopped", NOW + 203)
    assert fleet.node(started.node_key).free_whole == 1


def test_unstarted_replacement_fences_live_tasks() -> None:
    book = make_book()
    job = running(book)
    survivor, lost = job.placement
    target = free_node(job)
    lose(book, lost.node_key, NOW + 10)

    book.expire_starts(120.0, Effects(NOW + 131))

    # The replaced task and the survivor may still run, and the lost copy stays fenced.
    fleet = book.engine.engine.fleet
    for key in (lost.node_key, survivor.node_key, target):
        assert fleet.node(key).free_whole == 0, key
    report(book, target, f"{job.job_id}/1/{lost.task_index}", "stopped", NOW + 132)
    assert fleet.node(target).free_whole == 1
    book.apply_node_running(survivor.node_key, frozenset(), Effects(NOW + 133))
    assert fleet.node(survivor.node_key).free_whole == 1
    assert fleet.node(lost.node_key).free_whole == 0
