"""publish_async releases the ack slot that nats-py keeps when a publish raises.

Every test runs a nats-server of its own with a small max_payload, and a JetStream context
with two ack slots, so one leaked slot shows at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.runtime.ack_slots import publish_async
from tests.agent.natsserver import NatsServer, start_limited_server

pytestmark = pytest.mark.timeout(60)

STREAM = "SLOTS"
SUBJECT = "slots.events"
MAX_PAYLOAD = 4096
"""The server's ``max_payload`` in bytes."""
SLOTS = 2
"""Ack slots of each test's JetStream context."""


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = await start_limited_server(tmp_path, STREAM, [SUBJECT], MAX_PAYLOAD, MAX_PAYLOAD)
    yield server
    server.stop()


@pytest.fixture
async def client(small_nats: NatsServer) -> AsyncIterator[Client]:
    connection = await nats.connect(small_nats.url, connect_timeout=5)
    yield connection
    await connection.close()


async def free_slot_taken(js: JetStreamContext) -> bool:
    """Return whether a valid message gets an ack slot and JetStream's ack within 2 s."""
    try:
        future = await js.publish_async(SUBJECT, b"x", wait_stall=2.0)
    except nats.js.errors.TooManyStalledMsgsError:
        return False
    await asyncio.wait_for(future, 5)
    return True


async def test_library_keeps_slot_of_raising_call(client: Client) -> None:
    # If nats-py stops keeping the slot, publish_async in services/runtime can call it directly.
    js = client.jetstream(publish_async_max_pending=SLOTS)
    for _ in range(SLOTS):
        with pytest.raises(nats.errors.BadSubjectError):
            await js.publish_async("bad subject", b"x")

    assert js.publish_async_pending() == SLOTS
    assert not await free_slot_taken(js)


async def test_invalid_subject_releases_slot(client: Client) -> None:
    js = client.jetstream(publish_async_max_pending=SLOTS)
    for _ in range(SLOTS * 3):
        with pytest.raises(nats.errors.BadSubjectError):
            await publish_async(js, "bad subject", b"x", {})
    await asyncio.sleep(0)  # the cancelled futures' callbacks release the slots

    assert js.publish_async_pending() == 0
    assert await free_slot_taken(js)


async def test_invalid_header_releases_slot(client: Client) -> None:
    js = client.jetstream(publish_async_max_pending=SLOTS)
    for _ in range(SLOTS * 3):
        with pytest.raises(nats.errors.BadHeaderError):
            await publish_async(js, SUBJECT, b"x", {"bad key": "v"})
    await asyncio.sleep(0)

    assert js.publish_async_pending() == 0
    assert await free_slot_taken(js)


async def test_oversize_payload_takes_no_slot(client: Client) -> None:
    js = client.jetstream(publish_async_max_pending=SLOTS)
    for _ in range(SLOTS * 3):
        with pytest.raises(nats.errors.MaxPayloadError):
            await publish_async(js, SUBJECT, b"x" * (MAX_PAYLOAD + 1), {})

    assert js.publish_async_pending() == 0
    assert await free_slot_taken(js)


async def test_full_reconnect_buffer_releases_slot(small_nats: NatsServer) -> None:
    disconnected, reconnected = asyncio.Event(), asyncio.Event()

    async def on_disconnected() -> None:
        disconnected.set()

    async def on_reconnected() -> None:
        reconnected.set()

    client = await nats.connect(
        small_nats.url,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        pending_size=64,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    try:
        js = client.jetstream(publish_async_max_pending=SLOTS)
        await asyncio.wait_for(await publish_async(js, SUBJECT, b"x", {}), 5)
        small_nats.stop()
        await asyncio.wait_for(disconnected.wait(), 10)
        for _ in range(SLOTS * 3):
            with pytest.raises(nats.errors.OutboundBufferLimitError):
                await publish_async(js, SUBJECT, b"x" * 100, {})
        await asyncio.sleep(0)
        assert js.publish_async_pending() == 0

        small_nats.start()
        await asyncio.wait_for(reconnected.wait(), 20)
        assert await free_slot_taken(js)
    finally:
        await client.close()


async def test_successful_publish_keeps_slot_until_ack(client: Client) -> None:
    js = client.jetstream(publish_async_max_pending=SLOTS)

    future = await publish_async(js, SUBJECT, b"x", {"Nats-Msg-Id": "m1"})
    ack = await asyncio.wait_for(future, 5)

    assert ack.stream == STREAM
    assert js.publish_async_pending() == 0
