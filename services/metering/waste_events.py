"""Publish each waste flag once as a WasteFlagEvent on the events stream.

``metering.waste_flags`` is the outbox: a flag is stored with ``reported_at`` empty, and a pass
claims unreported flags (``FOR UPDATE SKIP LOCKED``, so replicas share the work), publishes
them, waits for JetStream's acks and sets ``reported_at`` in the same transaction. The message
id ``metering-waste/<job_id>/<attempt>`` makes JetStream drop a copy sent again after a crash
between the ack and the commit, within the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import nats.errors

from acsp import subjects
from acsp.v1 import common_pb2, events_pb2
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.jetstream import Publisher

logger = logging.getLogger(__name__)

SUBJECT = subjects.metering_event_subject("waste_flagged")
BATCH = 100


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


async def publish_waste_flags(db: Database, publisher: Publisher, now: datetime) -> int:
    """Publish one batch of unreported flags and mark them reported; return how many."""
    async with db.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            SELECT * FROM metering.waste_flags WHERE reported_at IS NULL
            ORDER BY flagged_at, job_id, attempt LIMIT $1
            FOR UPDATE SKIP LOCKED
            """,
            BATCH,
        )
        if not rows:
            return 0
        acks = [
            await publisher.publish(
                SUBJECT,
                waste_event(row).SerializeToString(),
                msg_id=waste_message_id(row["job_id"], row["attempt"]),
            )
            for row in rows
        ]
        # Raises Unavailable if any publish got no ack: the transaction rolls back and every
        # flag of the batch is sent again, under the same message id, on a later pass.
        await publisher.wait(acks)
        await conn.execute(
            """
            UPDATE metering.waste_flags w SET reported_at = $3
            FROM unnest($1::text[], $2::int[]) AS f(job_id, attempt)
            WHERE w.job_id = f.job_id AND w.attempt = f.attempt
            """,
            [row["job_id"] for row in rows],
            [row["attempt"] for row in rows],
            now,
        )
    for row in rows:
        logger.info(
            "published waste flag of job %s attempt %d",
            row["job_id"],
            row["attempt"],
            extra={"job_id": row["job_id"], "project_id": row["project_id"]},
        )
    return len(rows)


async def run_waste_publisher(
    db: Database,
    publisher: Publisher,
    stop: asyncio.Event,
    interval_s: float = 5.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Publish waste flags until ``stop`` is set, retrying after failures."""
    failures = 0
    while not stop.is_set():
        published = 0
        try:
            published = await publish_waste_flags(db, publisher, clock())
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
