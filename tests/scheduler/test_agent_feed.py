"""The agent feed's settling of fetched batches, with a stand-in for the JetStream consumer, and
which heartbeats and health events it passes to the loop."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from acsp.v1 import agent_pb2
from scheduler.service.agent_feed import AgentFeed
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.inputs import AgentDrainRequested, HeartbeatReceived, Input, TaskReported


class FakeMessage:
    """A JetStream message that records how it was settled."""

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data
        self.settled: list[str] = []
        self.was_settled = asyncio.Event()

    def _settle(self, action: str) -> None:
        self.settled.append(action)
        self.was_settled.set()

    async def ack(self) -> None:
        self._settle("ack")

    async def nak(self, delay: float | None = None) -> None:
        self._settle("nak")

    async def term(self) -> None:
        self._settle("term")


class FakeSubscription:
    """Returns the given batches from ``fetch``, then times out as an idle consumer does."""

    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        self.batches = batches

    async def fetch(self, batch: int, timeout: float) -> list[FakeMessage]:  # noqa: ASYNC109
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(timeout)
        raise TimeoutError

    async def unsubscribe(self) -> None:
        pass


class FakeJetStream:
    def __init__(self, subscription: FakeSubscription) -> None:
        self.subscription = subscription

    async def pull_subscribe(self, *args: Any, **kwargs: Any) -> FakeSubscription:
        return self.subscription


def task_message(task_id: str) -> FakeMessage:
    event = agent_pb2.TaskEvent(task_id=task_id, state=agent_pb2.TASK_STATE_EXITED)
    return FakeMessage("acsp.task.p.r.n1", event.SerializeToString())


def bad_inventory_message() -> FakeMessage:
    inventory = agent_pb2.Inventory()
    inventory.node.provider_id = "p"
    inventory.node.region_id = "r"
    inventory.node.node_id = "not a token"
    return FakeMessage("acsp.inventory.p.r.n2", inventory.SerializeToString())


async def commit_inputs(inbox: asyncio.Queue[Input], count: int) -> list[Input]:
    """Take ``count`` inputs as the loop would, and acknowledge each after its commit."""
    committed = []
    for _ in range(count):
        item = await inbox.get()
        committed.append(item)
        ack = getattr(item, "ack", None)
        if ack is not None:
            await ack()
    return committed


async def test_malformed_message_terminated_alone() -> None:
    first, bad, last = task_message("j1/1/0"), bad_inventory_message(), task_message("j2/1/0")
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(
        FakeJetStream(FakeSubscription([[first, bad, last]])),  # type: ignore[arg-type]
        inbox,
        "scheduler-test",
        FleetView(heartbeat_timeout_s=30),
        commit_timeout_s=5,
    )
    stop = asyncio.Event()
    stream = asyncio.create_task(feed.run_stream(stop))
    try:
        committed = await asyncio.wait_for(commit_inputs(inbox, 2), timeout=5)
        async with asyncio.timeout(5):
            await first.was_settled.wait()
            await last.was_settled.wait()
    finally:
        stop.set()
        await asyncio.wait_for(stream, timeout=5)

    # One agent's bad inventory must not drop the task events that share its batch.
    assert [item.task_id for item in committed if isinstance(item, TaskReported)] == [
        "j1/1/0",
        "j2/1/0",
    ]
    assert bad.settled == ["term"]
    assert first.settled == ["ack"]
    assert last.settled == ["ack"]


def heartbeat_payload(sent_at: float) -> bytes:
    beat = agent_pb2.Heartbeat(boot_id="boot", running_task_ids=["j1/1/0"])
    beat.time.FromNanoseconds(int(sent_at * 1e9))
    return beat.SerializeToString()


def test_replayed_heartbeats_carry_their_time() -> None:
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    fleet = FleetView(heartbeat_timeout_s=30)
    fleet.load(NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),)), 100.0)
    feed = AgentFeed(None, inbox, "scheduler-test", fleet)  # type: ignore[arg-type]

    # JetStream's store time takes precedence over the agent's clock. Without it the send time
    # is used.
    feed._replayed_heartbeat("p.r.n1", heartbeat_payload(95.0), datetime.fromtimestamp(90.0, UTC))
    feed._replayed_heartbeat("p.r.n1", heartbeat_payload(95.0), None)
    # The first live heartbeat queues too, behind the replayed ones, although its task list
    # is the same.
    feed._heartbeat("p.r.n1", heartbeat_payload(101.0))

    items = [inbox.get_nowait() for _ in range(inbox.qsize())]
    beats = [item for item in items if isinstance(item, HeartbeatReceived)]
    assert len(beats) == 3
    assert [beat.replayed for beat in beats] == [True, True, False]
    assert [beat.sent_at for beat in beats] == [90.0, 95.0, 0.0]
    assert all(beat.running == frozenset({"j1/1/0"}) for beat in beats)


def test_held_heartbeat_keeps_arrival_time() -> None:
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    fleet = FleetView(heartbeat_timeout_s=30)
    fleet.apply_inventory(
        NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),)), 90.0
    )
    feed = AgentFeed(None, inbox, "scheduler-test", fleet)  # type: ignore[arg-type]

    feed._heartbeat("p.r.n1", heartbeat_payload(99.0), received_at=100.0)

    (beat,) = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert isinstance(beat, HeartbeatReceived)
    assert beat.received_at == 100.0
    assert not beat.replayed
    assert fleet.expire(129.0) == []
    assert [change.node.status for change in fleet.expire(131.0)] == ["unknown"]


def test_heartbeat_before_inventory_reaches_loop_again() -> None:
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    fleet = FleetView(heartbeat_timeout_s=30)
    feed = AgentFeed(None, inbox, "scheduler-test", fleet)  # type: ignore[arg-type]
    feed._heartbeat("p.r.n1", heartbeat_payload(99.0), received_at=100.0)
    fleet.apply_inventory(
        NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),)), 100.5
    )

    # The same task list again: the loop has not seen it with the node known.
    feed._heartbeat("p.r.n1", heartbeat_payload(100.0), received_at=101.0)
    feed._heartbeat("p.r.n1", heartbeat_payload(101.0), received_at=102.0)

    beats = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [beat.received_at for beat in beats if isinstance(beat, HeartbeatReceived)] == [
        100.0,
        101.0,
    ]


def test_deleted_node_heartbeat_reaches_loop_again() -> None:
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    fleet = FleetView(heartbeat_timeout_s=30)
    node = NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),))
    fleet.apply_inventory(node, 100.0)
    feed = AgentFeed(None, inbox, "scheduler-test", fleet)  # type: ignore[arg-type]
    feed._heartbeat("p.r.n1", heartbeat_payload(100.0), received_at=100.5)
    fleet.remove("p.r.n1")

    feed._heartbeat("p.r.n1", heartbeat_payload(101.0), received_at=101.5)
    fleet.apply_inventory(node, 102.0)
    # The same task list again, which the loop has not seen since the node returned.
    feed._heartbeat("p.r.n1", heartbeat_payload(102.0), received_at=102.5)
    feed._heartbeat("p.r.n1", heartbeat_payload(103.0), received_at=103.5)

    beats = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [beat.received_at for beat in beats if isinstance(beat, HeartbeatReceived)] == [
        100.5,
        101.5,
        102.5,
    ]


def drain_feed() -> tuple[AgentFeed, FleetView, asyncio.Queue[Input]]:
    """Return a feed whose fleet has node ``p.r.n1`` up, and the inbox it fills."""
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    fleet = FleetView(heartbeat_timeout_s=30)
    fleet.apply_inventory(
        NodeView("p", "r", "n1", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),)), time.time()
    )
    return AgentFeed(None, inbox, "scheduler-test", fleet), fleet, inbox  # type: ignore[arg-type]


def state_payload(state: int, sent_at: float) -> bytes:
    beat = agent_pb2.Heartbeat(boot_id="boot", state=state)  # type: ignore[arg-type]
    beat.time.FromNanoseconds(int(sent_at * 1e9))
    return beat.SerializeToString()


def queued(inbox: asyncio.Queue[Input]) -> list[Input]:
    return [inbox.get_nowait() for _ in range(inbox.qsize())]


def test_heartbeats_that_change_a_drain_reach_the_loop() -> None:
    feed, fleet, inbox = drain_feed()
    ready, drain = agent_pb2.AGENT_NODE_STATE_READY, agent_pb2.AGENT_NODE_STATE_DRAIN_REQUESTED
    feed._heartbeat("p.r.n1", state_payload(ready, 100.0))
    (first,) = queued(inbox)
    assert isinstance(first, HeartbeatReceived)
    assert (first.drain_requested, first.agent_time) == (False, 100.0)

    # Nothing changed: a ready agent of a node that does not drain.
    feed._heartbeat("p.r.n1", state_payload(ready, 101.0))
    assert queued(inbox) == []
    feed._heartbeat("p.r.n1", state_payload(drain, 102.0))
    (request,) = queued(inbox)
    assert isinstance(request, HeartbeatReceived)
    assert (request.drain_requested, request.agent_time) == (True, 102.0)

    fleet.agent_drain("p.r.n1", "agent requested a drain in its heartbeat", 102.0)
    feed._heartbeat("p.r.n1", state_payload(drain, 103.0))
    feed._heartbeat("p.r.n1", state_payload(agent_pb2.AGENT_NODE_STATE_STOPPING, 104.0))
    assert queued(inbox) == []
    feed._heartbeat("p.r.n1", state_payload(ready, 105.0))
    (withdrawal,) = queued(inbox)
    assert isinstance(withdrawal, HeartbeatReceived)
    assert (withdrawal.drain_requested, withdrawal.agent_time) == (False, 105.0)


def test_stopping_heartbeat_neither_requests_nor_withdraws() -> None:
    feed, _, inbox = drain_feed()

    feed._heartbeat("p.r.n1", state_payload(agent_pb2.AGENT_NODE_STATE_STOPPING, 100.0))

    (beat,) = queued(inbox)
    assert isinstance(beat, HeartbeatReceived)
    assert beat.drain_requested is None


async def test_health_drain_request_is_acknowledged_after_commit() -> None:
    feed, _, _ = drain_feed()
    event = agent_pb2.HealthEvent(
        event_id="n1/boot/7",
        condition="xid",
        action=agent_pb2.HEALTH_ACTION_DRAIN_NODE,
        message="XID 74: NVLink error",
    )
    event.node.provider_id, event.node.region_id, event.node.node_id = "p", "r", "n1"
    event.time.FromNanoseconds(int(100.5 * 1e9))

    async def ack() -> None:
        pass

    (request,) = feed._health(event, ack)

    assert request == AgentDrainRequested("p.r.n1", "health: xid XID 74: NVLink error", 100.5, ack)
