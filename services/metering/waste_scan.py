"""Evaluate every ended attempt for waste once, in the background, on every replica.

ListJobEfficiency flags waste only in the attempts it reads, so this scan flags the attempts
that no caller lists. It claims ended attempts not yet checked with ``FOR UPDATE SKIP LOCKED``,
so replicas split the work instead of repeating it. In the same transaction it evaluates
them, stores their waste flags and sets ``waste_checked_at``. The waste publisher then sends
each new flag as a WasteFlagEvent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg

from services.metering.efficiency import evaluate_attempt, record_waste_flags
from services.runtime.db import Database
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

BATCH: Final = 50
"""Attempts evaluated in one transaction; each one reads all its utilization samples."""


@dataclass(frozen=True, slots=True)
class WasteScanConfig:
    interval_s: float
    """Seconds between scans that found nothing to evaluate."""
    lateness_s: float
    """Seconds after an attempt ends before it is evaluated, so late samples count."""
    threshold: float
    """Utilization (0..1) below which accelerators count as idle."""
    sustained_s: float
    """Seconds of continuous idle use that make an attempt waste."""


async def scan_ended_attempts(db: Database, config: WasteScanConfig, now: datetime) -> int:
    """Evaluate one batch of ended, unchecked attempts; return how many were evaluated."""
    # NOTE: a running attempt is evaluated only once it ends, or when ListJobEfficiency reads
    # it, so the waste of a job that runs for weeks is flagged late.
    ended_before = now - timedelta(seconds=config.lateness_s)
    async with db.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(
            """
            SELECT job_id, attempt, project_id FROM metering.jobs
            WHERE ended_at IS NOT NULL AND ended_at <= $1 AND waste_checked_at IS NULL
            ORDER BY ended_at, job_id, attempt
            LIMIT $2
            FOR UPDATE SKIP LOCKED
            """,
            ended_before,
            BATCH,
        )
        if not claimed:
            return 0
        job_ids = [row["job_id"] for row in claimed]
        attempts = [row["attempt"] for row in claimed]
        # Only attempts with usage are evaluated; one without usage has nothing to flag and
        # is marked checked all the same.
        usage = await conn.fetch(
            """
            SELECT c.job_id, c.attempt, c.project_id,
                   sum(up.accelerator_micros) AS micros,
                   sum(up.utilization_seconds) AS used,
                   sum(up.utilization_weight) AS weight
            FROM unnest($1::text[], $2::int[], $3::text[]) AS c(job_id, attempt, project_id)
            JOIN metering.usage_periods up ON up.job_id = c.job_id AND up.attempt = c.attempt
            GROUP BY c.job_id, c.attempt, c.project_id
            """,
            job_ids,
            attempts,
            [row["project_id"] for row in claimed],
        )
        results = [
            await evaluate_attempt(conn, row, config.threshold, config.sustained_s) for row in usage
        ]
        await record_waste_flags(conn, results, config.threshold)
        await conn.execute(
            """
            UPDATE metering.jobs j SET waste_checked_at = $3
            FROM unnest($1::text[], $2::int[]) AS c(job_id, attempt)
            WHERE j.job_id = c.job_id AND j.attempt = c.attempt
            """,
            job_ids,
            attempts,
            now,
        )
    for result in results:
        if result.flagged_waste:
            logger.info(
                "flagged job %s attempt %d as waste: %.0f s below utilization %g",
                result.job_id,
                result.attempt,
                result.low_utilization_seconds,
                config.threshold,
                extra={"job_id": result.job_id, "project_id": result.project_id},
            )
    return len(claimed)


async def run_waste_scan(
    db: Database,
    config: WasteScanConfig,
    stop: asyncio.Event,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Evaluate ended attempts until ``stop`` is set, retrying after failures."""
    failures = 0
    while not stop.is_set():
        evaluated = 0
        try:
            evaluated = await scan_ended_attempts(db, config, clock())
            failures = 0
        except (Unavailable, asyncpg.PostgresError, OSError, TimeoutError) as error:
            failures += 1
            # Logged on the first failure and every 60th after, so an outage is not a flood.
            if failures == 1 or failures % 60 == 0:
                logger.warning("waste scan failed %d times, retrying: %s", failures, error)
        if evaluated == BATCH:
            continue
        try:
            await asyncio.wait_for(stop.wait(), config.interval_s)
        except TimeoutError:
            pass
