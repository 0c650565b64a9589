"""Waste flags reach the events stream once each, through the waste_flags outbox."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import nats
import pytest
from nats.js.api import StreamConfig

from acsp import subjects
from acsp.v1 import events_pb2
from services.metering.efficiency import job_efficiency
from services.metering.ingest import UsageIngest
from services.metering.waste_events import SUBJECT, publish_waste_flags
from services.runtime.db import Database
from services.runtime.jetstream import Publisher
from tests.metering.helpers import T0, admit, count, report, running_ingest, sample, wait_until

UNREPORTED = "SELECT count(*) FROM metering.waste_flags WHERE reported_at IS NULL"


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def _flag_idle_job(db: Database) -> None:
    """Check efficiency twice for a job idle for 40 minutes, as two ListJobEfficiency calls."""
    async with db.acquire() as conn:
        for _ in range(2):
            rows = await job_efficiency(
                conn, project_id="", after=None, limit=10, threshold=0.1, sustained_s=1800
            )
            assert [row.flagged_waste for row in rows] == [True]


async def test_waste_flag_published_once(nats_url: str, db: Database) -> None:
    items = [
        sample(f"node-1/{i}", "job-w", T0 + timedelta(minutes=i), utilization=0.02)
        for i in range(40)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(subjects.usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    await admit(db, "job-w")
    await _flag_idle_job(db)
    now = datetime.now(UTC)

    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        publisher = Publisher(js, ack_timeout_s=2.0)
        # The grant service and scheduler declare the events stream. Until one has, the flag
        # waits in the outbox and counts a rejection, far from the limit.
        without_stream = await publish_waste_flags(db, publisher, now, spacing_s=0)
        unreported_without_stream = await count(db, UNREPORTED)
        rejections = await count(db, "SELECT rejections FROM metering.waste_flags")

        await js.add_stream(
            StreamConfig(name=subjects.EVENT_STREAM, subjects=list(subjects.EVENT_SUBJECTS))
        )
        first = await publish_waste_flags(db, publisher, now, spacing_s=0)
        second = await publish_waste_flags(db, publisher, now, spacing_s=0)
        # A crash after the ack but before the commit leaves the flag unreported, so it is
        # sent again under the same message id, which the stream drops.
        async with db.acquire() as conn:
            await conn.execute("UPDATE metering.waste_flags SET reported_at = NULL")
        resent = await publish_waste_flags(db, publisher, now, spacing_s=0)

        info = await js.stream_info(subjects.EVENT_STREAM)
        stored = await js.get_msg(subjects.EVENT_STREAM, seq=1)
    finally:
        await client.close()

    assert without_stream == 0
    assert unreported_without_stream == 1
    assert rejections == 1
    assert first == 1
    assert second == 0
    assert resent == 1
    assert info.state.messages == 1
    assert stored.subject == SUBJECT == "acsp.events.metering.waste_flagged"
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == "metering-waste/job-w/0"
    event = events_pb2.WasteFlagEvent.FromString(stored.data or b"")
    assert event.event_id == "job-w/0"
    assert event.job_id == "job-w"
    assert event.attempt == 0
    assert event.project_id == "proj-1"
    assert event.low_utilization_window.start_time.ToDatetime(UTC) == T0
    assert event.low_utilization_window.end_time.ToDatetime(UTC) == T0 + timedelta(minutes=40)
    assert event.mean_utilization == pytest.approx(0.02)
    assert event.threshold == pytest.approx(0.1)
    assert event.cause.trigger == "efficiency:waste"
    assert await count(db, UNREPORTED) == 0
