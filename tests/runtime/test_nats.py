"""NATS helpers against the local JetStream server, each test on its own stream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo, KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider

from services.runtime import nats as runtime_nats
from services.runtime.errors import Unavailable
from services.runtime.nats import (
    Publisher,
    PullConsumer,
    Reject,
    connect_nats,
    ensure_key_value,
    ensure_stream,
)
from services.runtime.settings import Settings, SettingsError
from tests.runtime.conftest import TEST_NATS_URL


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    connection = await connect_nats(Settings.from_env({"ACSP_NATS_URL": TEST_NATS_URL}), "test")
    yield connection
    await runtime_nats.close_nats(connection)


@pytest.fixture
async def stream(client: Client) -> AsyncIterator[tuple[str, str]]:
    """A fresh stream name and its subject prefix, deleted afterwards."""
    suffix = uuid.uuid4().hex[:10]
    name, prefix = f"RT_{suffix}", f"rt.{suffix}"
    yield name, prefix
    js = client.jetstream()
    try:
        await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        pass


async def test_ensure_stream_creates_then_updates(
    client: Client, stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    js = client.jetstream()
    name, prefix = stream
    updates: list[StreamConfig] = []
    update_stream = js.update_stream

    async def counting_update(config: StreamConfig) -> object:
        updates.append(config)
        return await update_stream(config)

    monkeypatch.setattr(js, "update_stream", counting_update)
    config = StreamConfig(name=name, subjects=[f"{prefix}.>"], max_age=60)
    created = await ensure_stream(js, config)
    same = await ensure_stream(js, config)
    updates_after_same = len(updates)
    changed = StreamConfig(name=name, subjects=[f"{prefix}.>"], max_age=120)
    updated = await ensure_stream(js, changed)
    assert created.config.max_age == 60
    assert same.config.max_age == 60
    assert updates_after_same == 0
    assert updated.config.max_age == 120
    assert updated.config.subjects == [f"{prefix}.>"]
    assert len(updates) == 1


async def test_ensure_key_value_creates_then_updates_history(client: Client) -> None:
    js = client.jetstream()
    bucket = f"rt_{uuid.uuid4().hex[:10]}"
    try:
        first = await ensure_key_value(js, KeyValueConfig(bucket=bucket, history=1))
        await first.put("k", b"v1")
        second = await ensure_key_value(js, KeyValueConfig(bucket=bucket, history=5))
        await second.put("k", b"v2")
        info = await js.stream_info(f"KV_{bucket}")
        entry = await second.get("k")
        assert info.config.max_msgs_per_subject == 5
        assert entry.value == b"v2"
    finally:
        await js.delete_key_value(bucket)


async def test_publisher_keeps_acks_in_flight_and_dedups(
    client: Client, stream: tuple[str, str]
) -> None:
    js = client.jetstream()
    name, prefix = stream
    await ensure_stream(js, StreamConfig(name=name, subjects=[f"{prefix}.>"]))
    publisher = Publisher(js, max_pending=16)
    acks = [
        await publisher.publish(f"{prefix}.usage", f"{n}".encode(), msg_id=f"sample-{n % 100}")
        for n in range(200)
    ]
    results = await publisher.wait(acks)
    info = await js.stream_info(name)
    assert len(results) == 200
    assert sum(1 for ack in results if ack.duplicate) == 100
    assert info.state.messages == 100
    assert publisher.pending == 0


async def test_publisher_reports_missing_stream(client: Client) -> None:
    publisher = Publisher(client.jetstream(), ack_timeout_s=0.5)
    ack = await publisher.publish(f"nowhere.{uuid.uuid4().hex}", b"x")
    with pytest.raises(Unavailable) as caught:
        await publisher.wait([ack])
    assert "JetStream did not ack a message on nowhere." in str(caught.value)


async def consumer_stream(js: JetStreamContext, name: str, prefix: str, count: int) -> None:
    await ensure_stream(js, StreamConfig(name=name, subjects=[f"{prefix}.>"]))
    publisher = Publisher(js)
    await publisher.wait(
        [await publisher.publish(f"{prefix}.x", f"{n}".encode()) for n in range(count)]
    )


async def settled_info(js: JetStreamContext, stream: str, durable: str) -> ConsumerInfo:
    """Poll until the server has processed every ack of the consumer, then return its info."""
    async with asyncio.timeout(10):
        while True:
            info = await js.consumer_info(stream, durable)
            if info.num_ack_pending == 0:
                return info
            await asyncio.sleep(0.05)


async def run_until(consumer: PullConsumer, condition: asyncio.Event) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(condition.wait(), timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_consumer_redelivers_batch_whose_handler_failed(
    client: Client, stream: tuple[str, str]
) -> None:
    js = client.jetstream()
    name, prefix = stream
    await consumer_stream(js, name, prefix, 5)
    committed: list[bytes] = []
    calls = 0
    done = asyncio.Event()

    async def handle(messages: list[Msg]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database unavailable")
        committed.extend(message.data for message in messages)
        if len(committed) >= 5:
            done.set()

    consumer = PullConsumer(
        js, name, "worker", handle, batch=10, fetch_timeout_s=0.5, retry_delay_s=0.1
    )
    await run_until(consumer, done)
    info = await settled_info(js, name, "worker")
    assert sorted(committed) == [b"0", b"1", b"2", b"3", b"4"]
    assert info.num_pending == 0


@pytest.mark.parametrize("in_progress", [True, False])
async def test_consumer_keeps_long_work_in_progress(
    client: Client, stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch, in_progress: bool
) -> None:
    js = client.jetstream()
    name, prefix = stream
    await consumer_stream(js, name, prefix, 1)
    if not in_progress:
        # The control case: without in-progress acks the same test gets a redelivery.
        monkeypatch.setattr(
            PullConsumer, "_in_progress", lambda self, messages: contextlib.nullcontext()
        )
    redelivered: list[Msg] = []
    done = asyncio.Event()

    # PullConsumer sends in-progress acks every ack_wait / 3, so JetStream redelivers only when
    # the event loop stalls for more than two thirds of ack_wait: 2 s on a busy machine here.
    ack_wait_s = 3.0

    async def handle(messages: list[Msg]) -> None:
        # Work for longer than ack_wait while a second worker on the same durable consumer
        # fetches. Only in-progress acks keep JetStream from redelivering this message to it.
        rival = await js.pull_subscribe("", durable="slow", stream=name)
        try:
            redelivered.extend(await rival.fetch(1, timeout=2.5 * ack_wait_s))
        except nats.errors.TimeoutError:
            pass
        finally:
            await rival.unsubscribe()
        done.set()

    consumer = PullConsumer(js, name, "slow", handle, fetch_timeout_s=0.5, ack_wait_s=ack_wait_s)
    await run_until(consumer, done)
    assert len(redelivered) == (0 if in_progress else 1)


async def test_consumer_terminates_rejected_messages(
    client: Client, stream: tuple[str, str]
) -> None:
    js = client.jetstream()
    name, prefix = stream
    await consumer_stream(js, name, prefix, 2)
    done = asyncio.Event()

    async def handle(messages: list[Msg]) -> None:
        done.set()
        raise Reject("payload is not a UsageSample")

    consumer = PullConsumer(js, name, "strict", handle, fetch_timeout_s=0.5)
    await run_until(consumer, done)
    info = await settled_info(js, name, "strict")
    assert info.num_redelivered == 0
    assert info.num_pending == 0


async def test_publish_carries_trace_context(client: Client, stream: tuple[str, str]) -> None:
    js = client.jetstream()
    name, prefix = stream
    await ensure_stream(js, StreamConfig(name=name, subjects=[f"{prefix}.>"]))
    tracer = TracerProvider().get_tracer("test")
    publisher = Publisher(js)
    with tracer.start_as_current_span("submit") as span:
        await publisher.wait([await publisher.publish(f"{prefix}.x", b"payload")])
        trace_id = format(span.get_span_context().trace_id, "032x")
    message = await js.get_msg(name, 1)
    assert message.headers is not None
    assert trace_id in message.headers["traceparent"]


async def test_unreachable_nats_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_nats, "CONNECT_TIMEOUT_S", 1.0)
    settings = Settings.from_env({"ACSP_NATS_URL": "nats://127.0.0.1:1"})
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, "test")
    assert caught.value.variable == "ACSP_NATS_URL"
    assert "cannot connect to nats://127.0.0.1:1" in str(caught.value)


async def test_consumer_restart_updates_ack_wait(client: Client, stream: tuple[str, str]) -> None:
    js = client.jetstream()
    name, prefix = stream
    await consumer_stream(js, name, prefix, 0)
    stop = asyncio.Event()
    stop.set()

    async def handle(messages: list[Msg]) -> None:
        return None

    await PullConsumer(js, name, "tuned", handle, ack_wait_s=30.0).run(stop)
    await PullConsumer(js, name, "tuned", handle, ack_wait_s=5.0).run(stop)
    info = await js.consumer_info(name, "tuned")
    assert info.config.ack_wait == 5.0
