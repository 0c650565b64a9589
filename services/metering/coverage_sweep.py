"""Deleting the coverage rows that no sample ingest still accepts can need.

Ingest rejects a sample that starts more than ``max_sample_age_s`` (ACSP_METERING_MAX_SAMPLE_AGE_S)
before the batch that reads it was received, so every accepted sample starts after that batch's
horizon: its receive time minus the maximum age. The overlap probe follows a coverage row only
for a sample that starts before the row's end (see :mod:`services.metering.overlaps`). So a row
that ends before the horizon of every batch still to come leads to no stored sample that such a
batch needs, whether it is a task's row or its accelerator's row, and the sweep deletes it. A
missing row reads as an accelerator or task with nothing stored, and a later sample recreates it.

The sweep keeps :data:`SWEEP_MARGIN_S` more than the maximum age. A batch checks ages against its
receive time but reads the rows later, and a batch that reads them more than
:data:`~services.metering.ingest_store.MAX_PROBE_DELAY_S` after its receipt fails and is
delivered again. The rest of the margin covers the difference between the clocks of the replica
that sweeps and the replica that ingests. So those clocks must agree within 50 minutes.

Every replica sweeps every ``interval_s``. A sweep walks the accelerators in key order, a page at
a time, reading one primary key entry per accelerator. It deletes each page's old task rows
through the index on ``(provider, node, accelerator_id, end_hour)`` of migration 016, which
reads only the rows it deletes, and each accelerator's own row by its primary key. Each delete
is its own short transaction of at most :data:`ROWS_PER_DELETE` rows. It skips rows that a
batch has locked instead of waiting for them, so it never waits for a batch and cannot deadlock
with one. A batch that raises a row being deleted waits for that one delete to commit. A skipped
row goes in a later sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg

from services.metering.ingest_store import MAX_PROBE_DELAY_S
from services.metering.overlaps import END_HOUR_US, Accelerator
from services.runtime.db import Database
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

SWEEP_MARGIN_S: Final = 3600
"""Seconds that the sweep keeps rows beyond the maximum sample age: the probe delay that a
batch allows itself plus 50 minutes of difference between replicas' clocks."""
ACCELERATORS_PER_PAGE: Final = 500
ROWS_PER_DELETE: Final = 5000

assert SWEEP_MARGIN_S > MAX_PROBE_DELAY_S


@dataclass(frozen=True, slots=True)
class CoverageSweepConfig:
    interval_s: float
    """Seconds between sweeps."""
    max_sample_age_s: float
    """Seconds before its receipt that an accepted sample may start, as ingest enforces."""


def cutoff_hour(now: datetime, max_sample_age_s: float) -> int:
    """Return the first ``end_hour`` that the sweep keeps at ``now``.

    A row of an earlier hour ends before ``now`` minus the maximum age and the margin.
    """
    oldest_us = int(now.timestamp() * 1_000_000) - int(
        (max_sample_age_s + SWEEP_MARGIN_S) * 1_000_000
    )
    return oldest_us // END_HOUR_US


# A loose index scan: each step descends the primary key to the first row of the next
# accelerator, so a page costs one index lookup per accelerator however many task rows it has.
# Text parameters take the columns' "C" collation, which the primary key sorts by.
_NEXT_ACCELERATORS = """
WITH RECURSIVE page AS (
    (SELECT c.provider, c.node, c.accelerator_id, 1 AS position
     FROM metering.sample_coverage c
     WHERE (c.provider, c.node, c.accelerator_id) > ($1, $2, $3)
     ORDER BY c.provider, c.node, c.accelerator_id
     LIMIT 1)
    UNION ALL
    SELECT n.provider, n.node, n.accelerator_id, p.position + 1
    FROM page p
    CROSS JOIN LATERAL (
        SELECT c.provider, c.node, c.accelerator_id
        FROM metering.sample_coverage c
        WHERE (c.provider, c.node, c.accelerator_id) > (p.provider, p.node, p.accelerator_id)
        ORDER BY c.provider, c.node, c.accelerator_id
        LIMIT 1
    ) n
    WHERE p.position < $4
)
SELECT provider, node, accelerator_id FROM page
"""

# The condition task_id <> '' is the predicate of the end_hour index, which the scan needs to
# use it. SKIP LOCKED leaves the rows that a batch's raise has locked. A raise that committed
# since the scan read a row moved its end_hour up, and PostgreSQL checks the condition again on
# the newest version of a row it locks, so a raised row is not deleted. The delete then finds
# the locked rows by their ids with a TID scan, except in a table of a few pages, where a
# sequential scan costs less.
_DELETE_TASK_ROWS = """
DELETE FROM metering.sample_coverage
WHERE ctid = ANY(ARRAY(
    SELECT o.ctid
    FROM unnest($1::text[], $2::text[], $3::text[]) AS a(provider, node, accelerator_id)
    CROSS JOIN LATERAL (
        SELECT c.ctid
        FROM metering.sample_coverage c
        WHERE c.provider = a.provider AND c.node = a.node
          AND c.accelerator_id = a.accelerator_id AND c.task_id <> '' AND c.end_hour < $4
        LIMIT $5
        FOR UPDATE SKIP LOCKED
    ) o
    LIMIT $5
))
"""

_DELETE_ACCELERATOR_ROWS = """
DELETE FROM metering.sample_coverage
WHERE ctid = ANY(ARRAY(
    SELECT c.ctid
    FROM unnest($1::text[], $2::text[], $3::text[]) AS a(provider, node, accelerator_id)
    JOIN metering.sample_coverage c
      ON c.provider = a.provider AND c.node = a.node AND c.accelerator_id = a.accelerator_id
     AND c.task_id = ''
    WHERE c.end_hour < $4
    FOR UPDATE OF c SKIP LOCKED
))
"""


async def next_accelerators(
    conn: asyncpg.Connection, after: Accelerator, limit: int
) -> list[Accelerator]:
    """Return up to ``limit`` accelerators with coverage rows, in key order after ``after``."""
    rows = await conn.fetch(_NEXT_ACCELERATORS, *after, limit)
    return [(row["provider"], row["node"], row["accelerator_id"]) for row in rows]


async def delete_old_rows(
    conn: asyncpg.Connection, accelerators: Sequence[Accelerator], first_kept_hour: int
) -> int:
    """Delete the rows of ``accelerators`` that end before ``first_kept_hour``.

    Returns how many rows were deleted. Each statement commits on its own.
    """
    columns = (
        [a[0] for a in accelerators],
        [a[1] for a in accelerators],
        [a[2] for a in accelerators],
    )
    deleted = 0
    while True:
        status = await conn.execute(_DELETE_TASK_ROWS, *columns, first_kept_hour, ROWS_PER_DELETE)
        count = int(status.split()[-1])
        deleted += count
        if count < ROWS_PER_DELETE:
            break
    status = await conn.execute(_DELETE_ACCELERATOR_ROWS, *columns, first_kept_hour)
    return deleted + int(status.split()[-1])


async def sweep_coverage(db: Database, max_sample_age_s: float, now: datetime) -> int:
    """Delete every coverage row that ends before ``now`` minus the maximum age and the margin.

    Returns how many rows were deleted.
    """
    first_kept_hour = cutoff_hour(now, max_sample_age_s)
    deleted = 0
    # Every accelerator id is non-empty, so every key sorts after this one.
    after: Accelerator = ("", "", "")
    async with db.acquire() as conn:
        while True:
            page = await next_accelerators(conn, after, ACCELERATORS_PER_PAGE)
            if not page:
                return deleted
            deleted += await delete_old_rows(conn, page, first_kept_hour)
            after = page[-1]


async def run_coverage_sweep(
    db: Database,
    config: CoverageSweepConfig,
    stop: asyncio.Event,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; a failed sweep is logged and retried."""
    failures = 0
    while not stop.is_set():
        try:
            deleted = await sweep_coverage(db, config.max_sample_age_s, clock())
            failures = 0
            if deleted:
                logger.info("deleted %d coverage rows older than the maximum sample age", deleted)
        except (Unavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
            failures += 1
            # The rows stay until the next sweep, which costs only space.
            logger.warning("coverage sweep failed %d times, retrying: %s", failures, error)
        except TimeoutError as error:
            failures += 1
            logger.warning("coverage sweep timed out %d times, retrying: %r", failures, error)
        try:
            await asyncio.wait_for(stop.wait(), config.interval_s)
        except TimeoutError:
            pass
