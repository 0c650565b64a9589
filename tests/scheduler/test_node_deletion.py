"""Node deletions in the scheduling loop: what a turn writes for a deleted node, and the
accelerators that keep a node.

The loop applies inputs to a real job book, fleet and engine here, without its store, NATS or
grant service, which :meth:`SchedulingLoop._apply` does not use. The tests of whole turns
record the writes of the store in :class:`RecordingStores` instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from acsp.v1 import scheduler_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.engine_adapter import AcceleratorHealth, EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.fleet_api import _kept_reason
from scheduler.service.inputs import (
    AcceleratorHealthReported,
    DrainRequested,
    InventoryReceived,
    NodeDeleteRequested,
    NodeDownRequested,
    TaskReported,
)
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.loop import LoopSettings, SchedulingLoop
from scheduler.service.model import Job
from scheduler.service.node_deletion import DeleteOutcome
from scheduler.service.publisher import PublishResult
from tests.scheduler.test_preemption_book import make_job, start

NOW = 1_800_000_000.0
NODE = "prov.reg.n1"
ACCELERATORS = tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB") for i in range(2))


def make_loop() -> SchedulingLoop:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    change = fleet.apply_inventory(NodeView("prov", "reg", "n1", ACCELERATORS), NOW)
    adapter.add_node(change.node)
    unused = cast(Any, None)
    return SchedulingLoop(
        book=JobBook(adapter, epoch=7),
        fleet=fleet,
        store=unused,
        nodes=unused,
        admission=unused,
        rates=unused,
        publisher=unused,
        watchers=unused,
        settings=LoopSettings(),
        inbox=asyncio.Queue(),
    )


class Turn:
    """The effects and lists of one turn, which :meth:`SchedulingLoop._apply` fills."""

    def __init__(self, loop: SchedulingLoop) -> None:
        self.loop = loop
        self.fx = Effects(NOW + 1)
        self.replies: list[tuple[asyncio.Future[object], object]] = []
        self.inventories: list[InventoryReceived] = []

    def apply(self, item: Any) -> None:
        self.loop._apply(item, self.fx, [], self.replies, self.inventories)

    def delete(self, key: str = NODE) -> DeleteOutcome:
        """Apply a delete request as the loop does at the start of the next turn."""
        reply: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()
        self.apply(NodeDeleteRequested(key, "retired", "req-1", "ops", reply))
        self.loop._apply_deletions(self.fx, self.replies)
        future, outcome = self.replies[-1]
        assert future is reply
        assert isinstance(outcome, DeleteOutcome)
        return outcome


def inventory() -> InventoryReceived:
    return InventoryReceived(NodeView("prov", "reg", "n1", ACCELERATORS), b"inventory")


async def test_deletion_returns_node_as_it_was() -> None:
    loop = make_loop()
    turn = Turn(loop)
    turn.apply(inventory())
    failure = AcceleratorHealth(NODE, "GPU-1", True, "hev-1", "XID 79")
    turn.apply(AcceleratorHealthReported(failure))
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))

    outcome = Turn(loop).delete()

    assert outcome.deletion is not None
    assert outcome.status == "drained"
    node = scheduler_pb2.Node.FromString(outcome.deletion.node_message)
    assert node.state == scheduler_pb2.NODE_STATE_DRAINED
    assert node.state_cause.reason == "retiring"
    failed = [a.accelerator_id for a in node.accelerators if a.HasField("health_cause")]
    assert failed == ["GPU-1"]
    assert [d.node_key for d in loop._deletions] == [NODE]
    assert loop.fleet.get(NODE) is None
    assert not loop.book.engine.has_node(NODE)
    assert loop.book.engine.failed_accelerators() == []


async def test_inventory_after_deletion_adds_node() -> None:
    loop = make_loop()
    turn = Turn(loop)
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))
    turn = Turn(loop)
    assert turn.delete().deletion is not None

    turn.apply(inventory())

    assert [item.node.key for item in turn.inventories] == [NODE]
    node = loop.fleet.get(NODE)
    assert node is not None
    assert node.status == "up"
    assert node.drain is None
    assert loop.book.engine.has_node(NODE)
    assert loop.book.engine.engine.fleet.by_id[NODE].draining is False


async def test_up_node_is_kept() -> None:
    loop = make_loop()

    outcome = Turn(loop).delete()

    assert outcome.deletion is None
    assert outcome.status == "up"
    assert outcome.jobs == ()
    assert loop.fleet.get(NODE) is not None
    assert loop.book.engine.has_node(NODE)
    assert loop._deletions == []


async def test_unknown_key_changes_nothing() -> None:
    loop = make_loop()

    outcome = Turn(loop).delete("prov.reg.n9")

    assert outcome == DeleteOutcome(None)
    assert loop._deletions == []
    assert loop.fleet.get(NODE) is not None


async def test_fenced_copy_keeps_drained_node() -> None:
    # A share that only the engine keeps, which the book does not list, keeps the node too.
    loop = make_loop()
    assert loop.book.engine.fence(NODE, "j1", "j1/1/0", ("GPU-0",), 1000)
    turn = Turn(loop)
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))

    outcome = Turn(loop).delete()

    assert outcome.deletion is None
    assert outcome.jobs == ("j1",)
    assert loop.fleet.get(NODE) is not None
    assert loop.book.engine.has_node(NODE)


class RecordingStores:
    """The node store, job store, publisher and watchers of a loop turn, recording the writes
    in order. ``fail_commit`` makes the turn's job commit fail, as a crash before it would."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, list[str]]] = []
        self.fail_commit = False

    async def delete(self, deletions: list[Any]) -> None:
        if deletions:
            self.writes.append(("delete", [d.node_key for d in deletions]))

    async def upsert_inventories(self, rows: list[Any]) -> None:
        self.writes.append(("inventories", [f"{p}.{r}.{n}" for p, r, n, _ in rows]))

    async def record_accelerator_health(self, changes: list[Any]) -> None:
        self.writes.append(("failures", [change.node_key for change in changes]))

    async def set_down(self, marks: dict[str, str | None]) -> None:
        if marks:
            self.writes.append(("down", sorted(marks)))

    async def commit_turn(self, jobs: list[Any], causes: list[str], commands: Any, *_: Any) -> Any:
        if self.fail_commit:
            raise ConnectionResetError("connection lost")
        self.writes.append(("jobs", [job.job_id for job in jobs]))
        return list(commands)

    async def publish_all(self, commands: Any, events: Any) -> PublishResult:
        return PublishResult()

    async def reject_events(self, *_: Any) -> list[Any]:
        return []

    async def unacked_dispatches(self, older_than_s: float) -> list[Any]:
        return []

    async def unacked_events(self, older_than_s: float) -> list[Any]:
        return []

    async def purge_acked(self, retention_s: float) -> tuple[int, int]:
        return 0, 0

    def publish(self, jobs: Any) -> None:
        list(jobs)


def loop_with_stores() -> tuple[SchedulingLoop, RecordingStores]:
    """Return a loop whose turns write to a :class:`RecordingStores`, at the test's clock."""
    loop = make_loop()
    stores = RecordingStores()
    recording = cast(Any, stores)
    loop.store = recording
    loop.nodes = recording
    loop.publisher = recording
    loop.watchers = recording
    loop._purge.store = recording
    loop._clock = NOW + 10
    loop._last_republish = float("inf")
    return loop, stores


def cancelled_on_node(loop: SchedulingLoop) -> Job:
    """Run a job on the node, drain the node and cancel the job, whose task still stops."""
    book = loop.book
    job = make_job("standard")
    book.add([job], NOW)
    book.apply_pass(book.engine.schedule(NOW), Effects(NOW))
    start(book, job, NOW)
    reply: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    fx = Effects(NOW + 1)
    loop._apply(DrainRequested(NODE, True, "retiring", reply), fx, [], [], [])
    book.cancel(job.job_id, "cancelled by owner", "rpc:CancelJob", fx)
    assert book.jobs[job.job_id].state == "stopping"
    return job


def delete_request(request_id: str = "req-1") -> tuple[NodeDeleteRequested, asyncio.Future[Any]]:
    reply: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()
    return NodeDeleteRequested(NODE, "retired", request_id, "ops", reply), reply


async def test_deletion_waits_for_stored_stop() -> None:
    # The stop that frees the node and the deletion arrive in one turn, whose job writes
    # fail. No deletion may be stored either, because a new leader would then find the job's
    # task live on a node that is gone.
    loop, stores = loop_with_stores()
    job = cancelled_on_node(loop)
    stopped = TaskReported(NODE, f"{job.job_id}/1/0", "stopped", -15, "stopped")
    request, reply = delete_request()
    stores.fail_commit = True

    async with asyncio.TaskGroup() as tasks:
        loop._tasks = tasks
        with pytest.raises(ConnectionResetError):
            await loop._turn([stopped, request])

    assert ("delete", [NODE]) not in stores.writes
    assert not reply.done()


async def test_deletion_written_after_stop() -> None:
    loop, stores = loop_with_stores()
    job = cancelled_on_node(loop)
    stopped = TaskReported(NODE, f"{job.job_id}/1/0", "stopped", -15, "stopped")
    request, reply = delete_request()

    async with asyncio.TaskGroup() as tasks:
        loop._tasks = tasks
        await loop._turn([stopped, request])
        first = list(stores.writes)
        stores.writes.clear()
        await loop._turn([])

    # The turn that stores the stop decides the deletion in the next turn, against the state
    # that it stored, and that turn writes the deletion first.
    assert first == [("jobs", [job.job_id])]
    assert stores.writes[0] == ("delete", [NODE])
    assert reply.done()
    assert reply.result().deletion is not None
    assert loop.fleet.get(NODE) is None


async def test_down_mark_before_requeue_frees_node() -> None:
    # The node is marked down before any pass requeued its job. The requeue then sends a
    # stop there, which no heartbeat will confirm, and which the down mark covers.
    loop, stores = loop_with_stores()
    book = loop.book
    job = make_job("standard")
    book.add([job], NOW)
    book.apply_pass(book.engine.schedule(NOW), Effects(NOW))
    start(book, job, NOW)
    down: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    request, reply = delete_request()

    async with asyncio.TaskGroup() as tasks:
        loop._tasks = tasks
        # The node's heartbeats are overdue, and no pass is due in this turn.
        loop._clock = NOW + 100
        loop._last_pass = NOW + 100
        await loop._turn([])
        unknown = loop.fleet.get(NODE)
        loop._clock = NOW + 101
        await loop._turn([NodeDownRequested(NODE, "powered off", down)])
        loop._clock = NOW + 102
        await loop._turn([request])
        loop._clock = NOW + 103
        await loop._turn([])

    assert unknown is not None
    assert unknown.status == "unknown"
    assert book.jobs[job.job_id].state == "pending"
    assert book.jobs_by_node() == {}
    assert reply.result().jobs == ()
    assert reply.result().deletion is not None
    assert ("delete", [NODE]) in stores.writes


def test_down_node_reason_names_next_pass() -> None:
    node = NodeView("prov", "reg", "n1", ACCELERATORS, status="down")

    reason = _kept_reason("prov/reg/n1", DeleteOutcome(node, "down", ("j1",)))

    # A down node confirms no stop, and the down mark already confirmed them.
    assert reason.startswith("node prov/reg/n1 is down and jobs j1 still have tasks placed")
    assert "the next scheduling pass" in reason
    assert "confirms" not in reason
