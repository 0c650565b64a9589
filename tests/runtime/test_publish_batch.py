"""Publisher.publish_batch: messages JetStream rejects for good are reported, others go on.

Every test runs a nats-server of its own, whose max_payload and stream max_msg_size are small.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.client import JetStreamContext

from services.runtime.jetstream import Publisher
from services.runtime.publish_errors import Message
from tests.agent.natsserver import NatsServer, start_limited_server, stored_message_ids

pytestmark = pytest.mark.timeout(120)

STREAM = "BATCH"
SUBJECT = "batch.events"
MAX_MSG_SIZE = 1024
"""The stream's ``max_msg_size`` in bytes."""
MAX_PAYLOAD = 8 * 1024
"""The server's ``max_payload`` in bytes."""


def message(msg_id: str, size: int = 100, subject: str = SUBJECT) -> Message:
    return subject, b"x" * size, msg_id


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with a small max_payload and a stream with a small max_msg_size."""
    server = await start_limited_server(tmp_path, STREAM, [SUBJECT], MAX_MSG_SIZE, MAX_PAYLOAD)
    yield server
    server.stop()


async def stored_ids(js: JetStreamContext) -> list[str]:
    return await stored_message_ids(js, STREAM)


async def test_oversize_message_rejected_others_stored(small_nats: NatsServer) -> None:
    batch = [message("m1"), message("m2", size=MAX_MSG_SIZE + 1), message("m3")]
    client = await nats.connect(small_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        outcomes = await publisher.publish_batch(batch)
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert outcomes[0] is True
    assert outcomes[2] is True
    reason = outcomes[1]
    assert isinstance(reason, str)
    assert "message size exceeds maximum allowed" in reason
    assert f"m2 of {MAX_MSG_SIZE + 1} bytes on {SUBJECT}" in reason
    assert stored == ["m1", "m3"]


async def test_message_over_max_payload_rejected(small_nats: NatsServer) -> None:
    batch = [message("m1"), message("m2", size=MAX_PAYLOAD + 1), message("m3")]
    client = await nats.connect(small_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        outcomes = await publisher.publish_batch(batch)
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert outcomes[0] is True
    assert outcomes[2] is True
    assert isinstance(outcomes[1], str)
    assert "maximum payload exceeded" in outcomes[1]
    assert stored == ["m1", "m3"]


async def test_message_without_stream_rejected(small_nats: NatsServer) -> None:
    batch = [message("m1", subject="nowhere.events"), message("m2")]
    client = await nats.connect(small_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        outcomes = await publisher.publish_batch(batch)
    finally:
        await client.close()

    assert isinstance(outcomes[0], str)
    assert "no JetStream stream captures subject nowhere.events" in outcomes[0]
    assert outcomes[1] is True


async def test_duplicate_message_counts_as_stored(small_nats: NatsServer) -> None:
    client = await nats.connect(small_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        first = await publisher.publish_batch([message("m1")])
        again = await publisher.publish_batch([message("m1")])
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert first == [True]
    assert again == [True]
    assert stored == ["m1"]


async def test_message_retried_without_jetstream(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    server.start()
    try:
        client = await nats.connect(server.url, connect_timeout=5)
        try:
            publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
            outcomes = await publisher.publish_batch([message("m1")])
        finally:
            await client.close()
    finally:
        server.stop()

    # No stream replies, and JetStream's API does not either, as during a restart.
    assert outcomes == [False]


async def test_message_retried_across_nats_restart(small_nats: NatsServer) -> None:
    client = await nats.connect(
        small_nats.url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
        small_nats.stop()
        during = await publisher.publish_batch([message("m1")])
        small_nats.start()
        async with asyncio.timeout(30):
            after = await publisher.publish_batch([message("m1")])
            while after != [True]:
                assert after == [False]
                await asyncio.sleep(0.2)
                after = await publisher.publish_batch([message("m1")])
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert during == [False]
    # The copy buffered during the outage and the retry share a Nats-Msg-Id.
    assert stored == ["m1"]
