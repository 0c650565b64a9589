"""The outbox moves messages JetStream rejects for good to the dead letters, and goes on.

Every test runs a nats-server of its own, whose max_payload and stream max_msg_size are small,
so that one message is rejected while the messages before and after it are stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from agents.dead_letters import DeadLetters
from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.natsserver import (
    NatsServer,
    connect_limited,
    start_denying_server,
    start_limited_server,
)

pytestmark = pytest.mark.timeout(120)

STREAM = "REJECTS"
SUBJECT = "rejects.usage"
MAX_MSG_SIZE = 1024
"""The stream's ``max_msg_size`` in bytes."""
MAX_PAYLOAD = 8 * 1024
"""The server's ``max_payload`` in bytes."""


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with a small max_payload and a stream with a small max_msg_size."""
    server = await start_limited_server(tmp_path, STREAM, [SUBJECT], MAX_MSG_SIZE, MAX_PAYLOAD)
    yield server
    server.stop()


@pytest.fixture
async def client(small_nats: NatsServer) -> AsyncIterator[Client]:
    connection = await nats.connect(
        small_nats.url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    yield connection
    await connection.close()


def build_outbox(state_dir: Path, max_rejections: int = 3) -> Outbox:
    """Return an outbox with short timers, as a freshly started agent opens it."""
    return Outbox(
        Spool(state_dir / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.1,
        dead_letters=DeadLetters(state_dir / "dead_letters.jsonl"),
        max_rejections=max_rejections,
        rejection_spacing_s=0.2,
    )


def add(outbox: Outbox, msg_id: str, size: int = 100, subject: str = SUBJECT) -> None:
    outbox.add(subject, msg_id, b"x" * size)


async def stored_ids(client: Client) -> list[str]:
    """Return the message id of every message in the stream, in stream order."""
    js = client.jetstream()
    info = await js.stream_info(STREAM)
    ids = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg(STREAM, sequence)
        assert stored.headers is not None
        ids.append(stored.headers["Nats-Msg-Id"])
    return ids


async def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_until_empty(outbox: Outbox, client: Client, timeout_s: float = 30.0) -> None:
    """Run the outbox's sender until its spool is empty, then stop it."""
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.pending == 0, timeout_s, "an empty spool")
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)


async def test_oversize_message_moves_others_go_on(
    tmp_path: Path, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents.outbox")
    outbox = build_outbox(tmp_path)
    add(outbox, "m1")
    add(outbox, "m2", size=MAX_MSG_SIZE + 1)
    add(outbox, "m3")

    await run_until_empty(outbox, client)

    assert await stored_ids(client) == ["m1", "m3"]
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m2"]
    assert letters[0].subject == SUBJECT
    assert letters[0].payload == b"x" * (MAX_MSG_SIZE + 1)
    assert letters[0].rejections == 3
    assert "message size exceeds maximum allowed" in letters[0].reason
    assert outbox.counters.dead_lettered == 1
    assert outbox.counters.rejections == 3
    assert outbox.counters.published == 2
    errors = [r for r in caplog.records if r.name == "agents.outbox" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "message m2 on rejects.usage moved to" in errors[0].getMessage()
    assert "message size exceeds maximum allowed" in errors[0].getMessage()


async def test_message_over_max_payload_moves(tmp_path: Path, client: Client) -> None:
    outbox = build_outbox(tmp_path)
    add(outbox, "m1")
    add(outbox, "m2", size=MAX_PAYLOAD + 1)
    add(outbox, "m3")

    await run_until_empty(outbox, client)

    assert await stored_ids(client) == ["m1", "m3"]
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m2"]
    assert "maximum payload exceeded" in letters[0].reason


async def test_message_without_stream_moves(tmp_path: Path, client: Client) -> None:
    outbox = build_outbox(tmp_path)
    add(outbox, "m1", subject="nowhere.usage")
    add(outbox, "m2")

    await run_until_empty(outbox, client)

    assert await stored_ids(client) == ["m2"]
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m1"]
    assert "no JetStream stream captures subject nowhere.usage" in letters[0].reason


async def test_consecutive_rejections_move_together(tmp_path: Path, client: Client) -> None:
    outbox = build_outbox(tmp_path)
    add(outbox, "m1", size=MAX_MSG_SIZE + 1)
    add(outbox, "m2", size=MAX_MSG_SIZE + 2)
    add(outbox, "m3")
    started = time.monotonic()

    await run_until_empty(outbox, client)

    # Both count their rejections in the same waves, so the second does not wait for the first.
    assert time.monotonic() - started < 10
    assert await stored_ids(client) == ["m3"]
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m1", "m2"]


async def test_rejection_counts_once_per_spacing(tmp_path: Path, client: Client) -> None:
    outbox = Outbox(
        Spool(tmp_path / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.1,
        max_rejections=2,
        rejection_spacing_s=60.0,
    )
    add(outbox, "m1", size=MAX_MSG_SIZE + 1)
    add(outbox, "m2")
    sent: list[str] = []

    async def record(message: Msg) -> None:
        sent.append(message.headers["Nats-Msg-Id"] if message.headers else "")

    await client.subscribe(SUBJECT, cb=record)
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.counters.publish_failures >= 5, 30, "five retries")
        assert outbox.counters.rejections == 1
        assert outbox.counters.dead_lettered == 0
        assert outbox.pending == 2
        # The message behind it is stored once and not sent again on each retry.
        assert await stored_ids(client) == ["m2"]
        assert sent.count("m2") == 1
        assert sent.count("m1") >= 5
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)
    # The default dead-letter file is in the spool's parent, the agent's state directory.
    assert not (tmp_path / "dead_letters.jsonl").exists()


async def test_outage_retried_not_moved(tmp_path: Path, small_nats: NatsServer) -> None:
    client = await nats.connect(
        small_nats.url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    outbox = build_outbox(tmp_path, max_rejections=1)
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        small_nats.stop()
        for index in range(5):
            add(outbox, f"m{index}")
        await poll(lambda: outbox.counters.spooled == 5, 10, "the spooled messages")
        small_nats.start()
        await poll(lambda: outbox.pending == 0, 30, "the spool to drain after the restart")
        assert await stored_ids(client) == [f"m{index}" for index in range(5)]
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)
        await client.close()
    assert outbox.counters.rejections == 0
    assert not (tmp_path / "dead_letters.jsonl").exists()


async def test_no_jetstream_retried_not_moved(tmp_path: Path) -> None:
    # No stream replies, and JetStream's API does not either, as while JetStream starts.
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    server.start()
    client = await nats.connect(server.url, connect_timeout=5)
    outbox = build_outbox(tmp_path, max_rejections=1)
    add(outbox, "m1")
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.counters.publish_failures >= 3, 30, "three retries")
        assert outbox.pending == 1
        assert outbox.counters.rejections == 0
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)
        await client.close()
        server.stop()
    assert not (tmp_path / "dead_letters.jsonl").exists()


async def test_restart_keeps_letter_sends_nothing_twice(tmp_path: Path, client: Client) -> None:
    first = build_outbox(tmp_path)
    add(first, "m1")
    add(first, "m2", size=MAX_MSG_SIZE + 1)
    add(first, "m3")
    await run_until_empty(first, client)
    first.flush_to_spool()

    # The agent restarts: a new spool and outbox on the same state directory.
    second = build_outbox(tmp_path)
    add(second, "m4")
    add(second, "m5", size=MAX_MSG_SIZE + 1)
    add(second, "m6")
    await run_until_empty(second, client)

    assert await stored_ids(client) == ["m1", "m3", "m4", "m6"]
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m2", "m5"]


class CrashingSpool(Spool):
    """A spool whose first commit past a dead letter fails, as if the agent died there."""

    def commit(self, count: int) -> None:
        if count and any(r.msg_id == "m2" for r in self.peek(count)):
            raise OSError("the agent died before the spool's commit")
        super().commit(count)


async def test_crash_before_commit_writes_letter_once(tmp_path: Path, client: Client) -> None:
    crashing = Outbox(
        CrashingSpool(tmp_path / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.1,
        dead_letters=DeadLetters(tmp_path / "dead_letters.jsonl"),
        max_rejections=2,
        rejection_spacing_s=0.2,
    )
    add(crashing, "m1")
    add(crashing, "m2", size=MAX_MSG_SIZE + 1)
    add(crashing, "m3")
    with pytest.raises(OSError, match="died before"):
        await asyncio.wait_for(crashing.run(lambda: client), 30)
    assert [d.message_id for d in DeadLetters(tmp_path / "dead_letters.jsonl").read()] == ["m2"]

    # An operator raises the stream's limit, so m2 would be stored if it were published again.
    js = client.jetstream()
    await js.update_stream(
        StreamConfig(name=STREAM, subjects=[SUBJECT], max_msg_size=4 * MAX_MSG_SIZE)
    )
    restarted = build_outbox(tmp_path)
    assert restarted.pending == 2
    await run_until_empty(restarted, client)

    assert await stored_ids(client) == ["m1", "m3"]
    assert [d.message_id for d in DeadLetters(tmp_path / "dead_letters.jsonl").read()] == ["m2"]
    assert restarted.counters.dead_lettered == 0
    # m3, stored before the crash, is sent again and JetStream drops the copy by its id.
    assert restarted.counters.published == 1


async def test_denied_message_moves_others_go_on(tmp_path: Path) -> None:
    denied = "rejects.denied"
    server = await start_denying_server(tmp_path / "nats", STREAM, [SUBJECT, denied], [denied])
    client = await connect_limited(server)
    try:
        outbox = build_outbox(tmp_path)
        add(outbox, "m1")
        add(outbox, "m2", subject=denied)
        add(outbox, "m3")

        await run_until_empty(outbox, client)

        assert await stored_ids(client) == ["m1", "m3"]
    finally:
        await client.close()
        server.stop()
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m2"]
    assert letters[0].subject == denied
    assert "permissions violation for publish" in letters[0].reason
    assert outbox.counters.rejections == 3


def restarted_outbox(state_dir: Path, spacing_s: float) -> Outbox:
    """Return the outbox of an agent that restarted on ``state_dir``, allowing two rejections."""
    return Outbox(
        Spool(state_dir / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.1,
        dead_letters=DeadLetters(state_dir / "dead_letters.jsonl"),
        max_rejections=2,
        rejection_spacing_s=spacing_s,
    )


async def run_until_failures(outbox: Outbox, client: Client, failures: int) -> None:
    """Run the outbox's sender until ``failures`` batches have failed, then stop it."""
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.counters.publish_failures >= failures, 30, f"{failures} retries")
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)


async def test_rejection_counts_survive_restarts(tmp_path: Path, client: Client) -> None:
    first = restarted_outbox(tmp_path, spacing_s=60.0)
    add(first, "m1", size=MAX_MSG_SIZE + 1)
    add(first, "m2")
    await run_until_failures(first, client, 3)
    assert first.counters.rejections == 1

    # Within the spacing of the first count, a restarted agent counts nothing more.
    second = restarted_outbox(tmp_path, spacing_s=60.0)
    await run_until_failures(second, client, 3)
    assert second.counters.rejections == 0

    # Past the spacing, the next count is the second, and the message moves.
    third = restarted_outbox(tmp_path, spacing_s=0.2)
    await run_until_empty(third, client)

    assert third.counters.rejections == 1
    assert third.counters.dead_lettered == 1
    letters = DeadLetters(tmp_path / "dead_letters.jsonl").read()
    assert [d.message_id for d in letters] == ["m1"]
    assert letters[0].rejections == 2
    assert "message size exceeds maximum allowed" in letters[0].reason
    assert await stored_ids(client) == ["m2"]


async def test_rejected_head_holds_back_no_later_batch(tmp_path: Path, client: Client) -> None:
    # The head waits for its rejections, about 20 s at the default spacing. The messages
    # beyond the first batch are published meanwhile, so a busy agent's spool does not fill.
    outbox = Outbox(
        Spool(tmp_path / "spool"),
        batch_size=4,
        ack_timeout_s=1.0,
        retry_s=0.1,
        max_rejections=2,
        rejection_spacing_s=60.0,
    )
    add(outbox, "m0", size=MAX_MSG_SIZE + 1)
    later = [f"m{index}" for index in range(1, 13)]
    for msg_id in later:
        add(outbox, msg_id)
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.counters.publish_failures >= 4, 30, "four retries")
        assert await stored_ids(client) == later
        assert outbox.counters.dead_lettered == 0
        assert outbox.pending == 13
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)
    assert outbox.counters.rejections == 1
