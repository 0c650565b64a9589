"""Publish each waste flag once as a WasteFlagEvent on the events stream.

``metering.waste_flags`` is the outbox: a flag is stored with ``reported_at`` empty, and a pass
claims unreported flags (``FOR UPDATE SKIP LOCKED``, so replicas share the work), publishes
them, waits for JetStream's acks and sets ``reported_at`` in the same transaction. The message
id ``metering-waste/<job_id>/<attempt>`` makes JetStream drop a copy sent again after a crash
between the ack and the commit, within the stream's duplicate window.

A flag whose event JetStream rejects for good (see :mod:`services.runtime.publish_errors`)
counts the rejection and waits REJECTION_SPACING_S before its next try, while other flags go
on. At ``max_rejections`` its event moves to ``metering.dead_events`` (see
:mod:`services.runtime.dead_events`) and the flag gets ``dead_at``, so it is never published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import nats.errors
from opentelemetry import metrics

from acsp import subjects
from acsp.v1 import common_pb2, events_pb2
from services.runtime.db import Database
from services.runtime.dead_events import (
    REJECTION_SPACING_S,
    DeadEvent,
    insert_dead_events,
    report_dead_events,
)
from services.runtime.errors import Unavailable
from services.runtime.jetstream import Publisher
from services.runtime.publish_errors import Message

logger = logging.getLogger(__name__)

_dead_events = metrics.get_meter(__name__).create_counter(
    "acsp.metering.dead_events",
    description="waste flag events moved to metering.dead_events after JetStream rejected them",
)

SUBJECT = subjects.metering_event_subject("waste_flagged")
BATCH = 100
DEAD_EVENTS: Final = "metering.dead_events"
MAX_REJECTIONS: Final = 5
"""Default of ACSP_METERING_MAX_EVENT_REJECTIONS."""

_SELECT_UNREPORTED: Final = """
SELECT * FROM metering.waste_flags
WHERE reported_at IS NULL AND dead_at IS NULL
    AND (rejected_at IS NULL OR rejected_at <= $2::timestamptz - $3::interval)
ORDER BY flagged_at, job_id, attempt LIMIT $1
FOR UPDATE SKIP LOCKED
"""

_COUNT_REJECTIONS: Final = """
UPDATE metering.waste_flags w SET rejections = w.rejections + 1, rejected_at = $3
FROM unnest($1::text[], $2::int[]) AS f(job_id, attempt)
WHERE w.job_id = f.job_id AND w.attempt = f.attempt
RETURNING w.job_id, w.attempt, w.rejections, w.flagged_at
"""

_MARK_DEAD: Final = """
UPDATE metering.waste_flags w SET dead_at = $3
FROM unnest($1::text[], $2::int[]) AS f(job_id, attempt)
WHERE w.job_id = f.job_id AND w.attempt = f.attempt
"""


def waste_message_id(job_id: str, attempt: int) -> str:
    return f"metering-waste/{job_id}/{attempt}"


def waste_event(row: asyncpg.Record) -> events_pb2.WasteFlagEvent:
    """Build the event of one ``metering.waste_flags`` row."""
    event = events_pb2.WasteFlagEvent(
        event_id=f"{row['job_id']}/{row['attempt']}",
        job_id=row["job_id"],
        attempt=row["attempt"],
        project_id=row["project_id"],
        mean_utilization=row["mean_utilization"],
        threshold=row["threshold"],
        cause=common_pb2.Cause(trigger="efficiency:waste"),
    )
    event.low_utilization_window.start_time.FromDatetime(row["window_start"])
    event.low_utilization_window.end_time.FromDatetime(row["window_end"])
    event.time.FromDatetime(row["flagged_at"])
    return event


async def publish_waste_flags(
    db: Database,
    publisher: Publisher,
    now: datetime,
    max_rejections: int = MAX_REJECTIONS,
    spacing_s: float = REJECTION_SPACING_S,
) -> int:
    """Publish one batch of unreported flags and mark them reported; return how many.

    Counts the flags whose event JetStream rejected for good in the same transaction, then
    raises Unavailable if some events got no ack, so the caller backs off.
    """
    async with db.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_SELECT_UNREPORTED, BATCH, now, timedelta(seconds=spacing_s))
        if not rows:
            return 0
        messages: list[Message] = [
            (
                SUBJECT,
                waste_event(row).SerializeToString(),
                waste_message_id(row["job_id"], row["attempt"]),
            )
            for row in rows
        ]
        outcomes = await publisher.publish_batch(messages)
        stored = [row for row, outcome in zip(rows, outcomes, strict=True) if outcome is True]
        await conn.execute(
            """
            UPDATE metering.waste_flags w SET reported_at = $3
            FROM unnest($1::text[], $2::int[]) AS f(job_id, attempt)
            WHERE w.job_id = f.job_id AND w.attempt = f.attempt
            """,
            [row["job_id"] for row in stored],
            [row["attempt"] for row in stored],
            now,
        )
        rejected = {
            (row["job_id"], row["attempt"]): (message, outcome)
            for row, message, outcome in zip(rows, messages, outcomes, strict=True)
            if isinstance(outcome, str)
        }
        dead = await _count_rejections(conn, rejected, now, max_rejections)
    for row in stored:
        logger.info(
            "published waste flag of job %s attempt %d",
            row["job_id"],
            row["attempt"],
            extra={"job_id": row["job_id"], "project_id": row["project_id"]},
        )
    report_dead_events(logger, DEAD_EVENTS, dead, _dead_events)
    retried = outcomes.count(False)
    if retried:
        raise Unavailable(f"JetStream did not acknowledge {retried} of {len(rows)} waste flags")
    return len(stored)


async def _count_rejections(
    conn: asyncpg.Connection,
    rejected: dict[tuple[str, int], tuple[Message, str]],
    now: datetime,
    limit: int,
) -> Sequence[DeadEvent]:
    """Count one rejection of each flag, and move the events of those at ``limit``.

    ``rejected`` maps a flag's job id and attempt to its message and the reason JetStream
    rejected it for good.
    """
    if not rejected:
        return []
    keys = sorted(rejected)
    counted = await conn.fetch(
        _COUNT_REJECTIONS, [job for job, _ in keys], [attempt for _, attempt in keys], now
    )
    due = sorted(
        (row for row in counted if row["rejections"] >= limit),
        key=lambda row: (row["job_id"], row["attempt"]),
    )
    if not due:
        return []
    await conn.execute(
        _MARK_DEAD, [row["job_id"] for row in due], [row["attempt"] for row in due], now
    )
    dead = []
    for row in due:
        (subject, payload, message_id), reason = rejected[(row["job_id"], row["attempt"])]
        dead.append(
            DeadEvent(
                message_id=message_id,
                event_id=f"{row['job_id']}/{row['attempt']}",
                subject=subject,
                payload=payload,
                reason=reason,
                rejections=row["rejections"],
                created_at=row["flagged_at"],
            )
        )
    await insert_dead_events(conn, DEAD_EVENTS, dead)
    return dead


async def run_waste_publisher(
    db: Database,
    publisher: Publisher,
    stop: asyncio.Event,
    interval_s: float = 5.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    max_rejections: int = MAX_REJECTIONS,
) -> None:
    """Publish waste flags until ``stop`` is set, retrying after failures."""
    failures = 0
    while not stop.is_set():
        published = 0
        try:
            published = await publish_waste_flags(db, publisher, clock(), max_rejections)
            failures = 0
        except (Unavailable, nats.errors.Error, asyncpg.PostgresError, OSError) as error:
            failures += 1
            # Logged on the first failure and every 60th after, so an outage is not a flood.
            if failures == 1 or failures % 60 == 0:
                logger.warning(
                    "publishing waste flags failed %d times, retrying: %s", failures, error
                )
        if published:
            continue
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass
