"""Publish outbox rows to JetStream, then mark them published.

Rows are sent in id order with the message id ``grant-outbox-<id>``, so a row sent again after a
crash between the ack and the update is dropped by JetStream's duplicate window. A publish that
gets no ack leaves the row for the next pass.

A row whose message JetStream rejects for good (see :mod:`services.runtime.publish_errors`)
counts the rejection and waits REJECTION_SPACING_S before its next try, while the rows after it
go on. At ``max_rejections`` it moves to the ``dead_events`` table (see
:mod:`services.runtime.dead_events`). Only outbox rows change, never the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Final

import asyncpg
import nats.errors
from nats.js.client import JetStreamContext
from opentelemetry import metrics

from services.runtime.db import Database
from services.runtime.dead_events import (
    REJECTION_SPACING_S,
    DeadEvent,
    insert_dead_events,
    report_dead_events,
)
from services.runtime.errors import Unavailable
from services.runtime.nats import Publisher

log = logging.getLogger(__name__)

_dead_events = metrics.get_meter(__name__).create_counter(
    "acsp.grant.dead_events",
    description="grant events moved to grant.dead_events after JetStream rejected them",
)

BATCH = 256
PUBLISHED_KEPT = timedelta(days=7)
"""How long published rows stay, for inspection, before they are deleted."""
CLEANUP_INTERVAL_S = 3600.0
MAX_REJECTIONS: Final = 5
"""Default of ACSP_GRANT_MAX_EVENT_REJECTIONS."""

_SELECT_PENDING: Final = """
SELECT id, subject, payload FROM outbox
WHERE published_at IS NULL AND (rejected_at IS NULL OR rejected_at <= now() - $2::interval)
ORDER BY id LIMIT $1
"""

# A rejection counts once per spacing, so replicas that publish the same row at the same time
# count it once.
_COUNT_REJECTIONS: Final = """
UPDATE outbox SET rejections = rejections + 1, rejected_at = now()
WHERE id = ANY($1) AND published_at IS NULL
    AND (rejected_at IS NULL OR rejected_at <= now() - $2::interval)
RETURNING id, rejections
"""

_DELETE_DEAD: Final = """
DELETE FROM outbox WHERE id = ANY($1) AND published_at IS NULL
RETURNING id, event_id, subject, payload, rejections, created_at
"""


def message_id(row_id: int) -> str:
    """Return the ``Nats-Msg-Id`` of the outbox row ``row_id``."""
    return f"grant-outbox-{row_id}"


async def publish_pending(
    db: Database,
    publisher: Publisher,
    max_rejections: int = MAX_REJECTIONS,
    spacing_s: float = REJECTION_SPACING_S,
) -> int:
    """Publish one batch of unpublished rows; return how many JetStream stored.

    Marks the stored rows and counts the rejected ones, then raises Unavailable if some rows
    got no ack, so the caller backs off.
    """
    spacing = timedelta(seconds=spacing_s)
    async with db.acquire() as conn:
        rows = await conn.fetch(_SELECT_PENDING, BATCH, spacing)
    if not rows:
        return 0
    outcomes = await publisher.publish_batch(
        [(row["subject"], row["payload"], message_id(row["id"])) for row in rows]
    )
    stored = [row["id"] for row, outcome in zip(rows, outcomes, strict=True) if outcome is True]
    rejected = {
        row["id"]: outcome
        for row, outcome in zip(rows, outcomes, strict=True)
        if isinstance(outcome, str)
    }
    async with db.transaction() as conn:
        if stored:
            await conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1)", stored)
        dead = await _count_rejections(conn, rejected, max_rejections, spacing)
    report_dead_events(log, f"{db.schema}.dead_events", dead, _dead_events)
    retried = outcomes.count(False)
    if retried:
        raise Unavailable(f"JetStream did not acknowledge {retried} of {len(rows)} grant events")
    return len(stored)


async def _count_rejections(
    conn: asyncpg.Connection, reasons: dict[int, str], limit: int, spacing: timedelta
) -> Sequence[DeadEvent]:
    """Count one rejection of each row in ``reasons``; move those at ``limit`` to dead_events."""
    if not reasons:
        return []
    counted = await conn.fetch(_COUNT_REJECTIONS, list(reasons), spacing)
    due = sorted(row["id"] for row in counted if row["rejections"] >= limit)
    if not due:
        return []
    moved = await conn.fetch(_DELETE_DEAD, due)
    dead = [
        DeadEvent(
            message_id=message_id(row["id"]),
            event_id=row["event_id"],
            subject=row["subject"],
            payload=row["payload"],
            reason=reasons[row["id"]],
            rejections=row["rejections"],
            created_at=row["created_at"],
        )
        for row in sorted(moved, key=lambda row: row["id"])
    ]
    await insert_dead_events(conn, "dead_events", dead)
    return dead


async def delete_published(db: Database, keep: timedelta) -> int:
    """Delete rows published longer ago than ``keep``; return how many were deleted."""
    async with db.acquire() as conn:
        status: str = await conn.execute(
            "DELETE FROM outbox WHERE published_at < now() - $1::interval", keep
        )
    return int(status.rsplit(" ", 1)[1])


async def run_publisher(
    db: Database,
    js: JetStreamContext,
    stopping: asyncio.Event,
    interval_s: float,
    max_rejections: int = MAX_REJECTIONS,
) -> None:
    """Publish outbox rows until ``stopping`` is set; back off while NATS is unreachable."""
    publisher = Publisher(js)
    failures = 0
    next_cleanup = time.monotonic()
    while not stopping.is_set():
        try:
            published = await publish_pending(db, publisher, max_rejections)
            failures = 0
            if time.monotonic() >= next_cleanup:
                deleted = await delete_published(db, PUBLISHED_KEPT)
                log.debug("deleted %s published outbox rows", deleted)
                next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
        except (Unavailable, nats.errors.Error, asyncpg.PostgresError, OSError) as error:
            failures += 1
            if failures == 1 or failures % 60 == 0:
                log.warning(
                    "grant events not published, will retry: %s (%s tries)", error, failures
                )
            published = 0
        if published < BATCH:
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval_s * min(failures + 1, 20))
            except TimeoutError:
                pass
