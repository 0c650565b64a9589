"""Publish outbox rows to JetStream, then mark them published.

Rows are sent in id order with the message id ``grant-outbox-<id>``, so a row sent again after a
crash between the ack and the update is dropped by JetStream's duplicate window. A failed
publish leaves the row for the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import asyncpg
import nats.errors
from nats.js.client import JetStreamContext

from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.nats import Publisher

log = logging.getLogger(__name__)

BATCH = 256
PUBLISHED_KEPT = timedelta(days=7)
"""How long published rows stay, for inspection, before they are deleted."""
CLEANUP_INTERVAL_S = 3600.0


async def publish_pending(db: Database, publisher: Publisher) -> int:
    """Publish one batch of unpublished rows; return how many were published."""
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, subject, payload FROM outbox WHERE published_at IS NULL "
            "ORDER BY id LIMIT $1",
            BATCH,
        )
    if not rows:
        return 0
    acks = [
        await publisher.publish(r["subject"], r["payload"], msg_id=f"grant-outbox-{r['id']}")
        for r in rows
    ]
    await publisher.wait(acks)
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1)", [r["id"] for r in rows]
        )
    return len(rows)


async def delete_published(db: Database, keep: timedelta) -> int:
    """Delete rows published longer ago than ``keep``; return how many were deleted."""
    async with db.acquire() as conn:
        status: str = await conn.execute(
            "DELETE FROM outbox WHERE published_at < now() - $1::interval", keep
        )
    return int(status.rsplit(" ", 1)[1])


async def run_publisher(
    db: Database, js: JetStreamContext, stopping: asyncio.Event, interval_s: float
) -> None:
    """Publish outbox rows until ``stopping`` is set; back off while NATS is unreachable."""
    publisher = Publisher(js)
    failures = 0
    next_cleanup = time.monotonic()
    while not stopping.is_set():
        try:
            published = await publish_pending(db, publisher)
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
