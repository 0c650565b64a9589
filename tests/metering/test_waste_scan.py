"""The background waste scan: ended attempts are flagged without any ListJobEfficiency call."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta

from acsp import subjects
from services.metering.ingest import UsageIngest
from services.metering.waste_scan import (
    BATCH,
    WasteScanConfig,
    run_waste_scan,
    scan_ended_attempts,
)
from services.runtime.db import Database
from tests.metering.helpers import T0, admit, count, report, running_ingest, sample, wait_until

CONFIG = WasteScanConfig(interval_s=0.1, lateness_s=30.0, threshold=0.1, sustained_s=1800.0)
"""Idle means below 10 % utilization for 30 minutes, the service's defaults."""
FLAGS = "SELECT count(*) FROM metering.waste_flags WHERE job_id = $1"
CHECKED = "SELECT count(*) FROM metering.jobs WHERE job_id = $1 AND waste_checked_at IS NOT NULL"


async def _ingested(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def _ingest_minutes(
    nats_url: str, db: Database, jobs: dict[str, float], minutes: int = 40
) -> None:
    """Ingest one sample a minute for each job, at the job's utilization."""
    async with running_ingest(nats_url, db) as (js, ingest):
        for number, (job_id, utilization) in enumerate(jobs.items()):
            items = [
                sample(
                    f"node-{number}/{minute}",
                    job_id,
                    T0 + timedelta(minutes=minute),
                    utilization=utilization,
                )
                for minute in range(minutes)
            ]
            node = f"node-{number}"
            await js.publish(subjects.usage_subject("prov-a", "r1", node), report(items, node=node))
        await wait_until(functools.partial(_ingested, ingest, len(jobs)))


async def test_scan_flags_only_ended_idle_attempts(nats_url: str, db: Database) -> None:
    await _ingest_minutes(
        nats_url, db, {"job-idle": 0.02, "job-busy": 0.9, "job-running": 0.02, "job-late": 0.02}
    )
    now = T0 + timedelta(hours=2)
    await admit(db, "job-idle", ended_at=T0 + timedelta(minutes=40), end_reason="completed")
    await admit(db, "job-busy", ended_at=T0 + timedelta(minutes=40), end_reason="completed")
    await admit(db, "job-running")
    # Ended 10 s before the scan, inside the 30 s lateness: samples may still arrive.
    await admit(db, "job-late", ended_at=now - timedelta(seconds=10), end_reason="completed")

    assert await scan_ended_attempts(db, CONFIG, now) == 2

    assert await count(db, FLAGS, "job-idle") == 1
    assert await count(db, FLAGS, "job-busy") == 0
    assert await count(db, FLAGS, "job-running") == 0
    assert await count(db, FLAGS, "job-late") == 0
    assert await count(db, CHECKED, "job-idle") == 1
    assert await count(db, CHECKED, "job-busy") == 1
    assert await count(db, CHECKED, "job-running") == 0
    assert await count(db, CHECKED, "job-late") == 0
    async with db.acquire() as conn:
        flag = await conn.fetchrow(
            "SELECT window_start, window_end, reported_at FROM metering.waste_flags"
        )
    assert flag["window_start"] == T0
    assert flag["window_end"] == T0 + timedelta(minutes=40)
    assert flag["reported_at"] is None

    # A checked attempt is not evaluated again; the late one is, once its lateness passed.
    assert await scan_ended_attempts(db, CONFIG, now) == 0
    assert await scan_ended_attempts(db, CONFIG, now + timedelta(seconds=30)) == 1
    assert await count(db, FLAGS, "job-late") == 1


async def test_ended_attempt_without_usage_checked(db: Database) -> None:
    await admit(db, "job-empty", ended_at=T0, end_reason="cancelled")

    assert await scan_ended_attempts(db, CONFIG, T0 + timedelta(hours=1)) == 1

    assert await count(db, CHECKED, "job-empty") == 1
    assert await count(db, FLAGS, "job-empty") == 0


async def test_concurrent_scans_share_attempts(db: Database) -> None:
    total = 2 * BATCH + 7
    for number in range(total):
        await admit(db, f"job-{number:04d}", ended_at=T0, end_reason="completed")
    now = T0 + timedelta(hours=1)

    evaluated = 0
    while True:
        first, second = await asyncio.gather(
            scan_ended_attempts(db, CONFIG, now), scan_ended_attempts(db, CONFIG, now)
        )
        evaluated += first + second
        if first == second == 0:
            break

    # Each attempt is evaluated by exactly one of the two scans.
    assert evaluated == total
    unchecked = await count(db, "SELECT count(*) FROM metering.jobs WHERE waste_checked_at IS NULL")
    assert unchecked == 0


async def test_periodic_scan_flags_new_attempt(nats_url: str, db: Database) -> None:
    await _ingest_minutes(nats_url, db, {"job-idle": 0.02})
    scans: list[datetime] = []

    def clock() -> datetime:
        scans.append(datetime.now(UTC))
        return scans[-1]

    async def scanned_twice() -> bool:
        return len(scans) >= 2

    stop = asyncio.Event()
    scan = asyncio.create_task(run_waste_scan(db, CONFIG, stop, clock=clock))
    try:
        # The loop keeps scanning after scans that found nothing.
        await wait_until(scanned_twice, timeout_s=10)
        assert await count(db, FLAGS, "job-idle") == 0
        await admit(db, "job-idle", ended_at=T0 + timedelta(minutes=40), end_reason="completed")

        async def flagged() -> bool:
            return await count(db, FLAGS, "job-idle") == 1

        await wait_until(flagged, timeout_s=10)
    finally:
        stop.set()
        await asyncio.wait_for(scan, 5)
    assert scan.exception() is None
