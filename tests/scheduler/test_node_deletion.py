"""Node deletions in the scheduling loop: what a turn writes for a deleted node, and the
accelerators that keep a node.

The loop applies inputs to a real job book, fleet and engine here, without its store, NATS or
grant service, which :meth:`SchedulingLoop._apply` does not use.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from acsp.v1 import scheduler_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.engine_adapter import AcceleratorHealth, EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.inputs import (
    AcceleratorHealthReported,
    DrainRequested,
    InventoryReceived,
    NodeDeleteRequested,
)
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.loop import LoopSettings, SchedulingLoop
from scheduler.service.node_deletion import DeleteOutcome

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

    def delete(self, request_id: str = "req-1") -> DeleteOutcome:
        reply: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()
        self.apply(NodeDeleteRequested(NODE, "retired", request_id, "ops", reply))
        future, outcome = self.replies[-1]
        assert future is reply
        assert isinstance(outcome, DeleteOutcome)
        return outcome


def inventory() -> InventoryReceived:
    return InventoryReceived(NodeView("prov", "reg", "n1", ACCELERATORS), b"inventory")


async def test_deletion_drops_earlier_writes() -> None:
    loop = make_loop()
    turn = Turn(loop)
    turn.apply(inventory())
    failure = AcceleratorHealth(NODE, "GPU-1", True, "hev-1", "XID 79")
    turn.apply(AcceleratorHealthReported(failure))
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))

    outcome = turn.delete()

    assert outcome.deletion is not None
    assert outcome.status == "drained"
    node = scheduler_pb2.Node.FromString(outcome.deletion.node_message)
    assert node.state == scheduler_pb2.NODE_STATE_DRAINED
    assert node.state_cause.reason == "retiring"
    failed = [a.accelerator_id for a in node.accelerators if a.HasField("health_cause")]
    assert failed == ["GPU-1"]
    assert turn.inventories == []
    assert turn.fx.accelerators == []
    assert loop._drains == {}
    assert [d.node_key for d in loop._deletions] == [NODE]
    assert loop.fleet.get(NODE) is None
    assert not loop.book.engine.has_node(NODE)
    assert loop.book.engine.failed_accelerators() == []


async def test_inventory_after_deletion_adds_node() -> None:
    loop = make_loop()
    turn = Turn(loop)
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))
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
    turn = Turn(loop)
    reply: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()

    turn.apply(NodeDeleteRequested("prov.reg.n9", "", "req-1", "ops", reply))

    (_, outcome) = turn.replies[-1]
    assert outcome == DeleteOutcome(None)
    assert loop._deletions == []
    assert loop.fleet.get(NODE) is not None


async def test_fenced_copy_keeps_drained_node() -> None:
    # A copy that a new leader fenced from the stored orphans, which the book does not list.
    loop = make_loop()
    assert loop.book.engine.fence(NODE, "j1", "j1/1/0", ("GPU-0",), 1000)
    turn = Turn(loop)
    drained: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
    turn.apply(DrainRequested(NODE, True, "retiring", drained))

    outcome = turn.delete()

    assert outcome.deletion is None
    assert outcome.jobs == ("j1",)
    assert loop.fleet.get(NODE) is not None
    assert loop.book.engine.has_node(NODE)
