"""Grant events that JetStream rejects for good move to ``dead_events``; others go on.

Each test runs a nats-server of its own, whose events stream takes messages up to
MAX_MSG_SIZE, and uses a fresh grant schema in the test PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from acsp import subjects
from acsp.v1 import grant_pb2
from services.grant import outbox
from services.grant.outbox import message_id, publish_pending
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.jetstream import Publisher
from tests.agent.natsserver import NatsServer, stored_message_ids
from tests.grant.conftest import seed_grant, seed_project
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import application, rid, setup_project

pytestmark = pytest.mark.timeout(120)

MAX_MSG_SIZE = 1024
"""The events stream's ``max_msg_size`` in bytes, well above every real grant event."""
SUBJECT = subjects.grant_event_subject("awarded")
LEDGER_TABLES = ("grants", "allocations", "holds", "ledger_entries", "postings")


async def declare_small_stream(url: str) -> None:
    client = await nats.connect(url, connect_timeout=5)
    try:
        await client.jetstream().add_stream(
            StreamConfig(
                name=subjects.EVENT_STREAM,
                subjects=list(subjects.EVENT_SUBJECTS),
                max_msg_size=MAX_MSG_SIZE,
                duplicate_window=120.0,
            )
        )
    finally:
        await client.close()


@pytest.fixture
async def events_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server whose events stream takes messages up to MAX_MSG_SIZE."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_small_stream(server.url)
    yield server
    server.stop()


class CountingCounter:
    """A stand-in for an OpenTelemetry counter that sums the amounts added."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, amount: int, attributes: Any = None) -> None:
        self.total += amount


async def add_row(db: Database, event_id: str, size: int, subject: str = SUBJECT) -> int:
    async with db.acquire() as conn:
        row_id: int = await conn.fetchval(
            "INSERT INTO outbox (event_id, subject, payload) VALUES ($1, $2, $3) RETURNING id",
            event_id,
            subject,
            b"x" * size,
        )
    return row_id


async def ledger_rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of the ledger's tables, each table sorted."""
    snapshot = {}
    async with db.acquire() as conn:
        for table in LEDGER_TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            snapshot[table] = sorted((tuple(row.values()) for row in rows), key=repr)
    return snapshot


async def stored_ids(js: JetStreamContext) -> list[str]:
    return await stored_message_ids(js, subjects.EVENT_STREAM)


async def test_oversize_event_moves_at_limit(
    db: Database,
    events_nats: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = CountingCounter()
    monkeypatch.setattr(outbox, "_dead_events", counter)
    caplog.set_level(logging.ERROR, logger="services.grant.outbox")
    await seed_project(db)
    await seed_grant(db, "100")
    async with db.acquire() as conn:
        (awarded,) = await conn.fetchval("SELECT array_agg(id) FROM outbox")
    large = await add_row(db, "large/awarded", MAX_MSG_SIZE + 1)
    after = await add_row(db, "after/awarded", 100)
    ledger_before = await ledger_rows(db)

    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        first = await publish_pending(db, publisher, max_rejections=3, spacing_s=0)
        async with db.acquire() as conn:
            counted = await conn.fetchval("SELECT rejections FROM outbox WHERE id = $1", large)
        second = await publish_pending(db, publisher, max_rejections=3, spacing_s=0)
        third = await publish_pending(db, publisher, max_rejections=3, spacing_s=0)
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert first == 2
    assert counted == 1
    assert second == 0
    assert third == 0
    assert stored == [message_id(awarded), message_id(after)]
    async with db.acquire() as conn:
        left = await conn.fetchval("SELECT count(*) FROM outbox WHERE id = $1", large)
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        dead = await conn.fetch("SELECT * FROM dead_events")
    assert left == 0
    assert unpublished == 0
    assert len(dead) == 1
    assert dead[0]["message_id"] == message_id(large)
    assert dead[0]["event_id"] == "large/awarded"
    assert dead[0]["subject"] == SUBJECT
    assert dead[0]["payload"] == b"x" * (MAX_MSG_SIZE + 1)
    assert dead[0]["rejections"] == 3
    assert "message size exceeds maximum allowed" in dead[0]["reason"]
    assert await ledger_rows(db) == ledger_before
    assert counter.total == 1
    lines = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    assert len(lines) == 1
    assert f"(message {message_id(large)}) on {SUBJECT}" in lines[0]
    assert "after 3 rejections: " in lines[0]
    assert "message size exceeds maximum allowed" in lines[0]


async def test_rejected_event_waits_spacing(db: Database, events_nats: NatsServer) -> None:
    large = await add_row(db, "large/awarded", MAX_MSG_SIZE + 1)
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        await publish_pending(db, publisher, max_rejections=2, spacing_s=60)
        # Rows after it go out while the rejected row waits its spacing.
        after = await add_row(db, "after/awarded", 100)
        published = await publish_pending(db, publisher, max_rejections=2, spacing_s=60)
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert published == 1
    assert stored == [message_id(after)]
    async with db.acquire() as conn:
        rejections = await conn.fetchval("SELECT rejections FROM outbox WHERE id = $1", large)
        dead = await conn.fetchval("SELECT count(*) FROM dead_events")
    assert rejections == 1
    assert dead == 0


async def test_event_without_stream_moves(db: Database, events_nats: NatsServer) -> None:
    streamless = await add_row(db, "stray/awarded", 100, subject="acsp.stray.awarded")
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        await publish_pending(db, publisher, max_rejections=1, spacing_s=0)
    finally:
        await client.close()

    async with db.acquire() as conn:
        reason = await conn.fetchval(
            "SELECT reason FROM dead_events WHERE message_id = $1", message_id(streamless)
        )
    assert "no JetStream stream captures subject acsp.stray.awarded" in reason


async def test_event_retried_without_jetstream(db: Database, tmp_path: Path) -> None:
    row = await add_row(db, "any/awarded", 100)
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    server.start()
    try:
        client = await nats.connect(server.url, connect_timeout=5)
        try:
            publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
            for _ in range(3):
                with pytest.raises(Unavailable):
                    await publish_pending(db, publisher, max_rejections=1, spacing_s=0)
        finally:
            await client.close()
    finally:
        server.stop()

    # No stream replies, and JetStream's API does not either, as during a restart.
    async with db.acquire() as conn:
        outbox_row = await conn.fetchrow("SELECT * FROM outbox WHERE id = $1", row)
        dead = await conn.fetchval("SELECT count(*) FROM dead_events")
    assert outbox_row is not None
    assert outbox_row["published_at"] is None
    assert outbox_row["rejections"] == 0
    assert dead == 0


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float, condition: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():  # noqa: ASYNC110 - polling the database
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {condition}") from None


async def test_service_moves_oversize_event(
    schema: str, db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="services.grant.outbox")
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        # The service declares the stream with its default size, which leaves this one.
        await declare_small_stream(server.url)
        extra = {
            "ACSP_NATS_URL": server.url,
            "ACSP_GRANT_OUTBOX_INTERVAL_S": "0.05",
            "ACSP_GRANT_MAX_EVENT_REJECTIONS": "2",
        }
        async with running_grant(schema, tmp_path, extra) as svc:
            await setup_project(svc)
            large = await add_row(db, "large/awarded", MAX_MSG_SIZE + 1)
            pi = svc.stub("alice", ["pi"], "uni-a")
            awarded = await pi.SubmitApplication(
                grant_pb2.SubmitApplicationRequest(
                    request_id=rid(), application=application(grant_pb2.GRANT_TIER_EXPLORATORY, "5")
                )
            )
            office = svc.stub("office", ["program_office"])
            summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
            ledger_before = await ledger_rows(db)

            async def moved() -> bool:
                async with db.acquire() as conn:
                    count: int = await conn.fetchval("SELECT count(*) FROM dead_events")
                return count == 1

            async def all_published() -> bool:
                async with db.acquire() as conn:
                    count: int = await conn.fetchval(
                        "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                    )
                return count == 0

            # Two rejections are at least 5 s apart.
            await poll(moved, 30, "the oversize event to move to dead_events")
            await poll(all_published, 10, "every other event to be published")
            summary_after = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
            grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=awarded.grant_id))
        client = await nats.connect(server.url, connect_timeout=5)
        try:
            stored = await stored_ids(client.jetstream())
        finally:
            await client.close()
    finally:
        server.stop()

    assert message_id(large) not in stored
    assert len(stored) == 1
    assert summary_after == summary
    assert await ledger_rows(db) == ledger_before
    assert grant.balance.available_pf_days.value == "5"
    async with db.acquire() as conn:
        dead = await conn.fetchrow("SELECT * FROM dead_events")
    assert dead["message_id"] == message_id(large)
    assert dead["rejections"] == 2
    lines = [r for r in caplog.records if "moved to" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR
    assert f"event large/awarded (message {message_id(large)}) on {SUBJECT}" in (
        lines[0].getMessage()
    )
