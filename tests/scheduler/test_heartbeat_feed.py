"""The agent feed's heartbeats from a real NATS server: the bucket's stored values first, then
every new heartbeat, even while other work blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig

from acsp import subjects
from acsp.v1 import agent_pb2
from scheduler.service.agent_feed import AgentFeed
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.inputs import HeartbeatReceived, Input

NODES = 200
LOADED_AT = 1000.0
"""When the fleet last heard from every node before the test: long ago."""
BUSY_SLICE_S = 0.05


def heartbeat(task_ids: list[str]) -> bytes:
    beat = agent_pb2.Heartbeat(boot_id="boot", running_task_ids=task_ids)
    beat.time.FromNanoseconds(time.time_ns())
    return beat.SerializeToString()


def key(index: int) -> str:
    return subjects.heartbeat_key("p", "r", f"n{index}")


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


async def hold_event_loop(done: asyncio.Event) -> None:
    """Block the event loop for ``BUSY_SLICE_S`` at a time, as a long scheduling turn does."""
    while not done.is_set():
        time.sleep(BUSY_SLICE_S)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0)


async def stop_feed(
    stop: asyncio.Event,
    heartbeats: asyncio.Task[None],
    done: asyncio.Event,
    busy: asyncio.Task[None],
) -> None:
    """End the blocking task, then the feed, and wait for both."""
    done.set()
    stop.set()
    await busy
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(heartbeats, timeout=10)


async def test_busy_feed_hears_every_node(client: Client) -> None:
    js = client.jetstream()
    bucket = await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    await bucket.put(key(0), heartbeat(["stored/1/0"]))
    fleet = FleetView(heartbeat_timeout_s=30)
    for index in range(NODES):
        node = NodeView("p", "r", f"n{index}", (AcceleratorView("GPU-1", "A100-SXM4-80GB"),))
        fleet.apply_inventory(node, LOADED_AT)
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(js, inbox, "scheduler-test", fleet)
    stop, done = asyncio.Event(), asyncio.Event()
    heartbeats = asyncio.create_task(feed.run_heartbeats(stop, client))
    busy = asyncio.create_task(hold_event_loop(done))
    try:
        # The stored value comes first, because it is queued before any live heartbeat is sent.
        replayed = await asyncio.wait_for(inbox.get(), timeout=10)
        assert isinstance(replayed, HeartbeatReceived)
        assert replayed.replayed
        assert replayed.node_key == key(0)

        began = time.monotonic()
        for index in range(NODES):
            await client.publish(f"$KV.{subjects.HEARTBEAT_BUCKET}.{key(index)}", heartbeat([]))
        await client.flush(timeout=10)
        deadline = began + 5.0
        while not all(fleet.get(key(i)).last_heartbeat > LOADED_AT for i in range(NODES)):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "some nodes' heartbeats did not reach the fleet"
            await asyncio.sleep(0.05)
    finally:
        await stop_feed(stop, heartbeats, done, busy)

    live = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert len(live) == NODES
    assert all(isinstance(item, HeartbeatReceived) and not item.replayed for item in live)


async def test_replay_holds_latest_heartbeat_per_node(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = client.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(js, inbox, "scheduler-test", FleetView(heartbeat_timeout_s=30))
    replay_done = asyncio.Event()

    async def slow_replay(stop: asyncio.Event) -> None:
        await replay_done.wait()

    monkeypatch.setattr(feed, "_replay_heartbeats", slow_replay)
    subscriptions: list[Subscription] = []
    subscribe = client.subscribe

    async def capture(*args: Any, **kwargs: Any) -> Subscription:
        subscription = await subscribe(*args, **kwargs)
        subscriptions.append(subscription)
        return subscription

    monkeypatch.setattr(client, "subscribe", capture)
    stop = asyncio.Event()
    heartbeats = asyncio.create_task(feed.run_heartbeats(stop, client))
    nodes, beats = 3, 5
    try:
        deadline = time.monotonic() + 10
        while not subscriptions:
            assert time.monotonic() < deadline, "the feed did not subscribe"
            await asyncio.sleep(0.01)
        (live,) = subscriptions
        for beat in range(beats):
            for index in range(nodes):
                subject = f"$KV.{subjects.HEARTBEAT_BUCKET}.{key(index)}"
                await client.publish(subject, heartbeat([f"t/{beat}/0"]))
        await client.flush(timeout=10)
        while live.delivered < nodes * beats or live.pending_msgs:
            assert time.monotonic() < deadline, "the heartbeats did not reach the feed"
            await asyncio.sleep(0.01)
        assert inbox.empty()

        replay_done.set()
        while inbox.qsize() < nodes:
            assert time.monotonic() < deadline, "held heartbeats were not applied"
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(heartbeats, timeout=10)

    applied = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert len(applied) == nodes
    for item in applied:
        assert isinstance(item, HeartbeatReceived)
        assert item.running == frozenset({f"t/{beats - 1}/0"})
    assert {item.node_key for item in applied if isinstance(item, HeartbeatReceived)} == {
        key(index) for index in range(nodes)
    }


async def test_busy_feed_replays_every_stored_value(client: Client) -> None:
    js = client.jetstream()
    bucket = await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    # The NATS server runs on this machine, so its store times follow this clock.
    stored_after = time.time() - 1.0
    for index in range(NODES):
        await bucket.put(key(index), heartbeat([f"stored/{index}/0"]))
    stored_before = time.time() + 1.0
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(js, inbox, "scheduler-test", FleetView(heartbeat_timeout_s=30))
    stop, done = asyncio.Event(), asyncio.Event()
    busy = asyncio.create_task(hold_event_loop(done))
    heartbeats = asyncio.create_task(feed.run_heartbeats(stop, client))
    try:
        # A KV watch takes one event loop iteration per stored value: NODES * BUSY_SLICE_S = 10 s.
        deadline = time.monotonic() + 5.0
        while inbox.qsize() < NODES:
            assert time.monotonic() < deadline, "some stored heartbeats were not replayed"
            await asyncio.sleep(0.05)
    finally:
        await stop_feed(stop, heartbeats, done, busy)

    replayed = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert len(replayed) == NODES
    running = {key(index): frozenset({f"stored/{index}/0"}) for index in range(NODES)}
    for item in replayed:
        assert isinstance(item, HeartbeatReceived)
        assert item.replayed
        assert stored_after < item.sent_at < stored_before
        assert item.running == running[item.node_key]
    assert {item.node_key for item in replayed if isinstance(item, HeartbeatReceived)} == {
        key(index) for index in range(NODES)
    }


async def test_empty_bucket_ends_replay(client: Client) -> None:
    js = client.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(js, inbox, "scheduler-test", FleetView(heartbeat_timeout_s=30))

    # No stored value arrives with nothing pending after it, so the consumer's info ends it.
    await asyncio.wait_for(feed._replay_heartbeats(asyncio.Event()), timeout=10)

    assert inbox.empty()


class _LateValues:
    """JetStream context whose subscriptions receive values only after the consumer's info.

    This is what happens when the server's reply to the info request overtakes a value."""

    def __init__(self, js: Any) -> None:
        self._js = js

    async def subscribe(self, subject: str, *, cb: Any, **kwargs: Any) -> Any:
        info_returned = asyncio.Event()

        async def late(message: Any) -> None:
            await info_returned.wait()
            await asyncio.sleep(0.2)  # The value is still in transit after the info is read.
            await cb(message)

        subscription = await self._js.subscribe(subject, cb=late, **kwargs)
        return _InfoFirst(subscription, info_returned)


class _InfoFirst:
    """Subscription that releases its held values once its consumer's info is read."""

    def __init__(self, subscription: Any, info_returned: asyncio.Event) -> None:
        self._subscription = subscription
        self._info_returned = info_returned

    @property
    def delivered(self) -> int:
        return 0  # Nothing has reached this client yet.

    async def consumer_info(self) -> Any:
        # Wait until the server has sent the stored value.
        deadline = time.monotonic() + 5.0
        while True:
            info = await self._subscription.consumer_info()
            if info.num_pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self._info_returned.set()
        return info

    async def unsubscribe(self) -> None:
        await self._subscription.unsubscribe()


async def test_replay_waits_for_late_value(client: Client) -> None:
    js = client.jetstream()
    bucket = await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    await bucket.put(key(0), heartbeat(["stored/0/0"]))
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    feed = AgentFeed(_LateValues(js), inbox, "scheduler-test", FleetView(heartbeat_timeout_s=30))  # type: ignore[arg-type]

    await asyncio.wait_for(feed._replay_heartbeats(asyncio.Event()), timeout=10)

    replayed = inbox.get_nowait()
    assert isinstance(replayed, HeartbeatReceived)
    assert replayed.replayed
    assert replayed.node_key == key(0)
