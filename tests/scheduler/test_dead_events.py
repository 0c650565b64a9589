"""Job events that JetStream rejects for good move to ``scheduler.dead_events``; others go on.

Every test runs a real nats-server of its own, and the store and scheduler tests a real
PostgreSQL database.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from acsp import subjects
from acsp.v1 import scheduler_pb2
from scheduler.service.publisher import Publisher, PublishResult
from scheduler.service.store import DeadEvent, Fenced, JobStore, OutboxEvent
from scheduler.service.validation import MAX_REASON_LENGTH
from services.runtime.auth import Role
from tests.agent.natsserver import (
    NatsServer,
    connect_limited,
    start_denying_server,
    start_limited_server,
    stored_message_ids,
)
from tests.scheduler.harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from tests.scheduler.test_end_to_end import job_spec
from tests.scheduler.test_store import lead

pytestmark = pytest.mark.timeout(180)

MAX_MSG_SIZE = 1024
"""The events stream's ``max_msg_size`` in bytes, above every job event a short reason makes."""
STORED_KIND = "ended"
"""The kind of job event whose subject the test stream captures."""


def event(job_id: str, kind: str = STORED_KIND, size: int = 100) -> OutboxEvent:
    return OutboxEvent(subjects.job_event_subject(kind), f"{job_id}/1/{kind}", b"x" * size)


@pytest.fixture
async def events_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server whose events stream captures only ended events, up to MAX_MSG_SIZE."""
    server = await start_limited_server(
        tmp_path, subjects.EVENT_STREAM, [subjects.job_event_subject(STORED_KIND)], MAX_MSG_SIZE
    )
    yield server
    server.stop()


async def stored_ids(js: JetStreamContext) -> list[str]:
    return await stored_message_ids(js, subjects.EVENT_STREAM)


async def test_oversize_event_rejected_next_stored(events_nats: NatsServer) -> None:
    before, large, after = event("j1"), event("j2", size=MAX_MSG_SIZE + 1), event("j3")
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), timeout_s=2.0)
        result = await publisher.publish_all([], [before, large, after])
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert result.event_ids == [before.msg_id, after.msg_id]
    assert [e.msg_id for e, _ in result.rejected_events] == [large.msg_id]
    reason = result.rejected_events[0][1]
    assert "message size exceeds maximum allowed" in reason
    assert f"{large.msg_id} of {MAX_MSG_SIZE + 1} bytes" in reason
    assert stored == [before.msg_id, after.msg_id]


async def test_event_without_stream_rejected(events_nats: NatsServer) -> None:
    streamless, stored_event = event("j1", kind="admitted"), event("j1")
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), timeout_s=2.0)
        result = await publisher.publish_all([], [streamless, stored_event])
    finally:
        await client.close()

    assert result.event_ids == [stored_event.msg_id]
    assert [e.msg_id for e, _ in result.rejected_events] == [streamless.msg_id]
    reason = result.rejected_events[0][1]
    assert f"no JetStream stream captures subject {streamless.subject}" in reason


DENIED_KIND = "admitted"
"""The kind of job event whose subject the denying server's user may not publish."""


async def publish_past_denial(
    directory: Path, timeout_s: float
) -> tuple[PublishResult, float, OutboxEvent, OutboxEvent]:
    """Publish a denied and an allowed event on a server that denies the first's subject.

    Returns the result, the seconds ``publish_all`` took, and the denied and allowed events.
    """
    server = await start_denying_server(
        directory,
        subjects.EVENT_STREAM,
        [subjects.job_event_subject(STORED_KIND), subjects.job_event_subject(DENIED_KIND)],
        [subjects.job_event_subject(DENIED_KIND)],
    )
    denied, allowed = event("j1", kind=DENIED_KIND), event("j1")
    try:
        client = await connect_limited(server)
        try:
            publisher = Publisher(client.jetstream(), timeout_s=timeout_s)
            began = time.monotonic()
            result = await publisher.publish_all([], [denied, allowed])
            elapsed = time.monotonic() - began
        finally:
            await client.close()
    finally:
        server.stop()
    return result, elapsed, denied, allowed


async def test_event_on_denied_subject_rejected(tmp_path: Path) -> None:
    result, _, denied, allowed = await publish_past_denial(tmp_path, timeout_s=1.0)

    assert result.event_ids == [allowed.msg_id]
    assert [e.msg_id for e, _ in result.rejected_events] == [denied.msg_id]
    reason = result.rejected_events[0][1]
    assert "permissions violation for publish" in reason
    assert f"on {denied.subject}" in reason


async def test_denied_subject_ends_wait_early(tmp_path: Path) -> None:
    result, elapsed, denied, allowed = await publish_past_denial(tmp_path, timeout_s=20.0)

    # The server reports the violation at once, so the wave does not wait out its 20 s.
    assert result.event_ids == [allowed.msg_id]
    assert [e.msg_id for e, _ in result.rejected_events] == [denied.msg_id]
    assert elapsed < 10.0


async def test_event_retried_without_jetstream(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    server.start()
    try:
        client = await nats.connect(server.url, connect_timeout=5)
        try:
            publisher = Publisher(client.jetstream(), timeout_s=1.0)
            result = await publisher.publish_all([], [event("j1")])
        finally:
            await client.close()
    finally:
        server.stop()

    # No stream replies, and JetStream's API does not either, as during a restart.
    assert result.event_ids == []
    assert result.rejected_events == []


async def test_event_retried_across_nats_restart(events_nats: NatsServer) -> None:
    sent = event("j1")
    client = await nats.connect(
        events_nats.url, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    try:
        publisher = Publisher(client.jetstream(), timeout_s=1.0)
        events_nats.stop()
        during = await publisher.publish_all([], [sent])
        events_nats.start()
        await wait_for(lambda: client.is_connected, 30, "the client to reconnect")
        after = await wait_for(
            lambda: _stored(publisher, sent), 30, "JetStream to store the event again"
        )
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert during.event_ids == []
    assert during.rejected_events == []
    assert after.rejected_events == []
    # The copy buffered during the outage and the retry share a Nats-Msg-Id.
    assert stored == [sent.msg_id]


async def _stored(publisher: Publisher, sent: OutboxEvent) -> object:
    result = await publisher.publish_all([], [sent])
    return result if result.event_ids == [sent.msg_id] else None


async def test_event_moves_at_rejection_limit(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    waiting, rejected = event("j1"), event("j2", size=10)
    await store.commit_turn([], [], [], [waiting, rejected], epoch)

    first = await store.reject_events([(rejected.msg_id, "too large")], 3, epoch)
    second = await store.reject_events([(rejected.msg_id, "too large")], 3, epoch)
    third = await store.reject_events([(rejected.msg_id, "too large at last")], 3, epoch)

    assert first == []
    assert second == []
    assert third == [DeadEvent(rejected.msg_id, rejected.subject, "too large at last", 3)]
    assert await store.unacked_events() == [waiting]
    row = await pool.fetchrow("SELECT * FROM scheduler.dead_events")
    assert row is not None
    assert row["event_id"] == rejected.msg_id
    assert row["shard"] == "s0"
    assert row["payload"] == rejected.payload
    assert row["reason"] == "too large at last"
    assert row["rejections"] == 3

    # An acknowledged event is not counted, however often it is reported.
    await store.ack_events([waiting.msg_id])
    assert await store.reject_events([(waiting.msg_id, "rejected")], 1, epoch) == []
    assert await pool.fetchval("SELECT count(*) FROM scheduler.dead_events") == 1
    await lease.release()


async def test_rejection_by_fenced_leader_changes_nothing(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    old = await lead(database_dsn, "old")
    old_epoch = old.epoch or 0
    store = JobStore(pool, "s0")
    rejected = event("j1")
    await store.commit_turn([], [], [], [rejected], old_epoch)
    await old.release()
    new = await lead(database_dsn, "new")

    with pytest.raises(Fenced):
        await store.reject_events([(rejected.msg_id, "too large")], 1, old_epoch)

    assert await store.unacked_events() == [rejected]
    count = "SELECT rejections FROM scheduler.outbox WHERE event_id = $1"
    assert await pool.fetchval(count, rejected.msg_id) == 0
    await new.release()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Servers whose events stream takes messages up to MAX_MSG_SIZE, and the grant service."""
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        client = await nats.connect(stack.nats_url, connect_timeout=5)
        try:
            # The services declare the stream with its default size, which leaves this one.
            await client.jetstream().add_stream(
                StreamConfig(
                    name=subjects.EVENT_STREAM,
                    subjects=list(subjects.EVENT_SUBJECTS),
                    max_msg_size=MAX_MSG_SIZE,
                )
            )
        finally:
            await client.close()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


async def test_scheduler_dead_letters_oversize_event(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler(
        ACSP_SCHEDULER_MAX_EVENT_REJECTIONS="2"
    )
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_ids = []
        # No node runs them, so each waits until its cancel ends it with an ended event that
        # carries the reason. A reason at the cancel's length cap puts the first event over
        # MAX_MSG_SIZE with the event's other fields, and the second stays well under.
        for reason in ("r" * MAX_REASON_LENGTH, "not needed"):
            submitted = await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
                metadata=md,
                timeout=10,
            )
            job_id = submitted.job.job_id
            await scheduler.CancelJob(
                scheduler_pb2.CancelJobRequest(job_id=job_id, reason=reason),
                metadata=md,
                timeout=10,
            )
            job_ids.append(job_id)
    rejected, published = (f"{job_id}/1/ended" for job_id in job_ids)

    database = await asyncpg.connect(stack.dsn, timeout=10)
    client = await nats.connect(stack.nats_url, connect_timeout=5)
    try:

        async def dead_row() -> asyncpg.Record | None:
            return await database.fetchrow(
                "SELECT * FROM scheduler.dead_events WHERE event_id = $1", rejected
            )

        row = await wait_for(dead_row, 90, "the oversize event to move", 0.5)

        async def all_acked() -> bool:
            unacked = "SELECT count(*) FROM scheduler.outbox WHERE acked_at IS NULL"
            return bool(await database.fetchval(unacked) == 0)

        await wait_for(all_acked, 30, "every other event to be acked", 0.2)
        in_outbox = await database.fetchval(
            "SELECT count(*) FROM scheduler.outbox WHERE event_id = $1", rejected
        )
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()
        await database.close()

    assert row["rejections"] == 2
    assert row["subject"] == subjects.job_event_subject("ended")
    assert "message size exceeds maximum allowed" in row["reason"]
    assert len(row["payload"]) > MAX_MSG_SIZE
    assert in_outbox == 0
    assert published in stored
    assert rejected not in stored
    log = scheduler_process.log_path.read_text()
    assert f"job event {rejected} on acsp.events.job.ended moved to scheduler.dead_events" in log
    assert "ERROR" in next(line for line in log.splitlines() if "moved to scheduler" in line)
