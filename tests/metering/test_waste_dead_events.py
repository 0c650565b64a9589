"""Waste flag events that JetStream rejects for good move to metering.dead_events.

Each test runs a nats-server of its own, whose events stream takes messages up to
MAX_MSG_SIZE, and uses the metering test database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.client import JetStreamContext

from acsp import subjects
from acsp.v1 import events_pb2
from services.metering import waste_events
from services.metering.waste_events import (
    SUBJECT,
    publish_waste_flags,
    run_waste_publisher,
    waste_message_id,
)
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.jetstream import Publisher
from tests.agent.natsserver import NatsServer, start_limited_server, stored_message_ids
from tests.metering.helpers import count, wait_until

pytestmark = pytest.mark.timeout(120)

MAX_MSG_SIZE = 1024
"""The events stream's ``max_msg_size`` in bytes, well above an event with short ids."""
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
async def events_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server whose events stream takes messages up to MAX_MSG_SIZE."""
    server = await start_limited_server(
        tmp_path, subjects.EVENT_STREAM, list(subjects.EVENT_SUBJECTS), MAX_MSG_SIZE
    )
    yield server
    server.stop()


class CountingCounter:
    """A stand-in for an OpenTelemetry counter that sums the amounts added."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, amount: int, attributes: Any = None) -> None:
        self.total += amount


async def add_flag(db: Database, job_id: str, minute: int, project_id: str = "proj-1") -> None:
    """Store an unreported waste flag for attempt 0 of ``job_id``, raised at T0 + ``minute``."""
    async with db.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO metering.waste_flags
                (job_id, attempt, project_id, window_start, window_end, mean_utilization,
                 threshold, flagged_at)
            VALUES ($1, 0, $2, $3, $4, 0.02, 0.1, $5)
            """,
            job_id,
            project_id,
            T0,
            T0 + timedelta(minutes=40),
            T0 + timedelta(minutes=minute),
        )


async def stored_ids(js: JetStreamContext) -> list[str]:
    return await stored_message_ids(js, subjects.EVENT_STREAM)


async def test_oversize_waste_event_moves_at_limit(
    db: Database,
    events_nats: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = CountingCounter()
    monkeypatch.setattr(waste_events, "_dead_events", counter)
    caplog.set_level(logging.ERROR, logger="services.metering.waste_events")
    await add_flag(db, "job-before", 1)
    # A project id this long makes the event larger than the stream takes.
    await add_flag(db, "job-large", 2, project_id="p" * MAX_MSG_SIZE)
    await add_flag(db, "job-after", 3)
    large_id = waste_message_id("job-large", 0)

    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        published = [
            await publish_waste_flags(
                db, publisher, T0 + timedelta(hours=1, seconds=n), max_rejections=3, spacing_s=1
            )
            for n in range(3)
        ]
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert published == [2, 0, 0]
    assert stored == [waste_message_id("job-before", 0), waste_message_id("job-after", 0)]
    async with db.acquire() as conn:
        flag = await conn.fetchrow("SELECT * FROM metering.waste_flags WHERE job_id = 'job-large'")
        dead = await conn.fetch("SELECT * FROM metering.dead_events")
    assert flag is not None
    assert flag["reported_at"] is None
    assert flag["dead_at"] == T0 + timedelta(hours=1, seconds=2)
    assert flag["rejections"] == 3
    assert len(dead) == 1
    assert dead[0]["message_id"] == large_id
    assert dead[0]["event_id"] == "job-large/0"
    assert dead[0]["subject"] == SUBJECT
    assert dead[0]["rejections"] == 3
    assert dead[0]["created_at"] == T0 + timedelta(minutes=2)
    assert "message size exceeds maximum allowed" in dead[0]["reason"]
    event = events_pb2.WasteFlagEvent.FromString(dead[0]["payload"])
    assert event.job_id == "job-large"
    assert event.project_id == "p" * MAX_MSG_SIZE
    assert counter.total == 1
    lines = [r for r in caplog.records if "moved to" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR
    message = lines[0].getMessage()
    assert f"event job-large/0 (message {large_id}) on {SUBJECT}" in message
    assert "moved to metering.dead_events after 3 rejections: " in message
    assert "message size exceeds maximum allowed" in message


async def test_rejected_flag_waits_spacing(db: Database, events_nats: NatsServer) -> None:
    await add_flag(db, "job-large", 1, project_id="p" * MAX_MSG_SIZE)
    now = T0 + timedelta(hours=1)
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        await publish_waste_flags(db, publisher, now, max_rejections=2, spacing_s=60)
        # Flags after it go out while the rejected flag waits its spacing.
        await add_flag(db, "job-after", 2)
        soon = await publish_waste_flags(
            db, publisher, now + timedelta(seconds=59), max_rejections=2, spacing_s=60
        )
        rejections_soon = await count(
            db, "SELECT rejections FROM metering.waste_flags WHERE job_id = 'job-large'"
        )
        late = await publish_waste_flags(
            db, publisher, now + timedelta(seconds=60), max_rejections=2, spacing_s=60
        )
    finally:
        await client.close()

    assert soon == 1
    assert rejections_soon == 1
    assert late == 0
    assert await count(db, "SELECT count(*) FROM metering.dead_events") == 1


async def test_waste_event_retried_without_jetstream(db: Database, tmp_path: Path) -> None:
    await add_flag(db, "job-w", 1)
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    server.start()
    try:
        client = await nats.connect(server.url, connect_timeout=5)
        try:
            publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
            for n in range(3):
                with pytest.raises(Unavailable):
                    await publish_waste_flags(
                        db, publisher, T0 + timedelta(hours=1, seconds=n), max_rejections=1
                    )
        finally:
            await client.close()
    finally:
        server.stop()

    # No stream replies, and JetStream's API does not either, as during a restart.
    async with db.acquire() as conn:
        flag = await conn.fetchrow("SELECT * FROM metering.waste_flags")
    assert flag is not None
    assert flag["reported_at"] is None
    assert flag["dead_at"] is None
    assert flag["rejections"] == 0
    assert await count(db, "SELECT count(*) FROM metering.dead_events") == 0


async def _moved(db: Database) -> bool:
    return await count(db, "SELECT count(*) FROM metering.dead_events") == 1


async def test_publisher_loop_moves_oversize_event(db: Database, events_nats: NatsServer) -> None:
    await add_flag(db, "job-large", 1, project_id="p" * MAX_MSG_SIZE)
    await add_flag(db, "job-after", 2)
    stop = asyncio.Event()
    client = await nats.connect(events_nats.url, connect_timeout=5)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        loop = asyncio.create_task(
            run_waste_publisher(db, publisher, stop, interval_s=0.1, max_rejections=2)
        )
        try:
            # Two rejections are at least 5 s apart.
            await wait_until(functools.partial(_moved, db), timeout_s=30)
        finally:
            stop.set()
            await asyncio.wait_for(loop, timeout=10)
        stored = await stored_ids(client.jetstream())
    finally:
        await client.close()

    assert stored == [waste_message_id("job-after", 0)]
    unreported = "SELECT count(*) FROM metering.waste_flags WHERE reported_at IS NULL"
    assert await count(db, unreported) == 1
