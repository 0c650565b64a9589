"""The coverage sweep, and the maximum sample age at ingest that makes it safe.

Ingest rejects a sample that starts more than ACSP_METERING_MAX_SAMPLE_AGE_S before its receipt,
so the sweep may delete the coverage rows that end before that horizon, plus a margin.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from acsp import subjects
from services.metering.coverage_sweep import (
    SWEEP_MARGIN_S,
    cutoff_hour,
    delete_old_rows,
    next_accelerators,
    sweep_coverage,
)
from services.metering.ingest_store import MAX_PROBE_DELAY_S, BatchResult, write_batch
from services.metering.overlaps import END_HOUR_US
from services.metering.samples import UsageSample
from services.metering.settings import MeteringSettings
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.settings import SettingsError
from tests.metering.helpers import count, report, running_ingest, sample, wait_until

pytestmark = pytest.mark.timeout(60)

MODEL = "A100-SXM4-80GB"
SECOND_US = 1_000_000
HOUR_US = 3600 * SECOND_US
DAY_US = 86_400 * SECOND_US
MAX_AGE_S = 14 * 86_400.0
NOW = datetime(2026, 12, 1, 12, 30, tzinfo=UTC)
NOW_US = int(NOW.timestamp()) * SECOND_US
HORIZON_US = NOW_US - int(MAX_AGE_S) * SECOND_US
"""The earliest start of a sample that a batch received at NOW accepts."""


def _sample(
    sample_id: str, job: str, start_us: int, end_us: int, accelerator: str = "GPU-0"
) -> UsageSample:
    """Return a whole-accelerator sample of ``job``'s task 0 of attempt 0 on node-1."""
    return UsageSample(
        sample_id,
        job,
        0,
        f"{job}/0/0",
        "prov-a",
        "r1",
        "node-1",
        accelerator,
        MODEL,
        1000,
        start_us,
        end_us,
        end_us - start_us,
        0.5,
        1,
    )


async def _write(db: Database, samples: list[UsageSample]) -> BatchResult:
    async with db.acquire() as conn:
        return await write_batch(
            conn, samples, [], period_seconds=300, received_at=datetime.now(UTC)
        )


async def _coverage_keys(db: Database) -> set[tuple[str, str]]:
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT accelerator_id, task_id FROM metering.sample_coverage")
    return {(row["accelerator_id"], row["task_id"]) for row in rows}


def test_cutoff_keeps_margin_past_horizon() -> None:
    first_kept = cutoff_hour(NOW, MAX_AGE_S)
    # Every deleted row ends before the horizon by at least the margin.
    assert first_kept * END_HOUR_US <= HORIZON_US - SWEEP_MARGIN_S * SECOND_US
    # And no row is kept longer than an hour beyond that.
    assert (first_kept + 1) * END_HOUR_US > HORIZON_US - SWEEP_MARGIN_S * SECOND_US


async def test_sweep_deletes_rows_past_horizon(db: Database) -> None:
    """Rows that end before the horizon and margin are deleted, and later ones are kept."""
    old_end = HORIZON_US - SWEEP_MARGIN_S * SECOND_US - 2 * HOUR_US
    near_end = HORIZON_US - 10 * 60 * SECOND_US
    await _write(
        db,
        [
            _sample("old-0", "job-old-0", old_end - 60 * SECOND_US, old_end),
            _sample("near", "job-near", near_end - 60 * SECOND_US, near_end),
            _sample("idle", "job-idle", old_end - 60 * SECOND_US, old_end, "GPU-1"),
        ],
    )

    deleted = await sweep_coverage(db, MAX_AGE_S, NOW)

    assert deleted == 3
    # GPU-1 ran nothing since, so its own row went too.
    assert await _coverage_keys(db) == {("GPU-0", ""), ("GPU-0", "job-near/0/0")}
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 3


async def test_sample_at_horizon_meets_kept_row(db: Database) -> None:
    """A sample that starts at the horizon is still compared with the rows the sweep keeps."""
    near_end = HORIZON_US + 5 * 60 * SECOND_US
    await _write(db, [_sample("near", "job-near", near_end - 10 * 60 * SECOND_US, near_end)])
    await sweep_coverage(db, MAX_AGE_S, NOW)

    late = await _write(db, [_sample("late", "job-late", HORIZON_US, HORIZON_US + HOUR_US)])

    assert (late.inserted, late.dead_lettered) == (0, 1)


async def test_row_raised_since_scan_kept(db: Database) -> None:
    """A batch raise that commits before the sweep's delete keeps the row."""
    old_end = HORIZON_US - SWEEP_MARGIN_S * SECOND_US - 2 * HOUR_US
    await _write(db, [_sample("old", "job-a", old_end - 60 * SECOND_US, old_end)])
    async with db.acquire() as conn:
        accelerators = await next_accelerators(conn, ("", "", ""), 10)
    await _write(db, [_sample("resumed", "job-a", NOW_US - HOUR_US, NOW_US - HOUR_US + SECOND_US)])

    async with db.acquire() as conn:
        deleted = await delete_old_rows(conn, accelerators, cutoff_hour(NOW, MAX_AGE_S))

    assert deleted == 0
    assert await _coverage_keys(db) == {("GPU-0", ""), ("GPU-0", "job-a/0/0")}


# Rows of sample_coverage that the current transaction has read, by sequential scans and by
# index scans.
_COVERAGE_ROWS_READ = """
SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
FROM pg_stat_xact_user_tables WHERE relid = 'metering.sample_coverage'::regclass
"""


RECENT_TASKS = 4000
"""Enough rows that PostgreSQL finds the rows to delete by their ids, not by a sequential scan,
which it prefers for a table of a few pages."""


async def test_sweep_reads_only_old_rows(db: Database) -> None:
    """On an accelerator with many recent tasks, the sweep reads the rows it deletes."""
    recent_start = NOW_US - DAY_US
    recent = [
        _sample(
            f"new-{i}",
            f"job-new-{i}",
            recent_start + i * 60 * SECOND_US,
            recent_start + i * 60 * SECOND_US + 30 * SECOND_US,
        )
        for i in range(RECENT_TASKS)
    ]
    old_start = HORIZON_US - 10 * DAY_US
    old = [
        _sample(
            f"old-{i}",
            f"job-old-{i}",
            old_start + i * 60 * SECOND_US,
            old_start + i * 60 * SECOND_US + 30 * SECOND_US,
        )
        for i in range(20)
    ]
    await _write(db, old)
    await _write(db, recent)
    async with db.acquire() as conn:
        await conn.execute("ANALYZE metering.sample_coverage")

    async with db.acquire() as conn, conn.transaction():
        before = await conn.fetchval(_COVERAGE_ROWS_READ)
        accelerators = await next_accelerators(conn, ("", "", ""), 10)
        deleted = await delete_old_rows(conn, accelerators, cutoff_hour(NOW, MAX_AGE_S))
        after = await conn.fetchval(_COVERAGE_ROWS_READ)

    assert accelerators == [("prov-a", "node-1", "GPU-0")]
    assert deleted == 20
    assert after - before <= 30
    assert await count(db, "SELECT count(*) FROM metering.sample_coverage") == RECENT_TASKS + 1


async def test_late_probe_fails_batch(db: Database) -> None:
    """A batch that reads the coverage rows too long after its receipt stores nothing."""
    received_at = datetime.now(UTC) - timedelta(seconds=MAX_PROBE_DELAY_S + 60)
    start_us = NOW_US - HOUR_US
    async with db.acquire() as conn:
        with pytest.raises(Unavailable) as caught:
            await write_batch(
                conn,
                [_sample("s", "job-a", start_us, start_us + 60 * SECOND_US)],
                [],
                period_seconds=300,
                received_at=received_at,
            )
    assert "delivered again" in str(caught.value)
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 0


async def test_sample_older_than_max_age_dead_lettered(nats_url: str, db: Database) -> None:
    now = datetime.now(UTC)
    items = [
        sample("node-1/old", "job-1", now - timedelta(hours=2)),
        sample("node-1/fresh", "job-1", now - timedelta(minutes=10)),
    ]
    async with running_ingest(nats_url, db, max_sample_age_s=3600.0) as (js, ingest):
        await js.publish(subjects.usage_subject("prov-a", "r1", "node-1"), report(items))

        async def stored() -> bool:
            return ingest.counters.messages >= 1

        await wait_until(stored)
    async with db.acquire() as conn:
        samples = await conn.fetch("SELECT sample_id FROM metering.usage_samples")
        dead = await conn.fetch("SELECT sample_id, reason, payload FROM metering.dead_letters")
    assert [row["sample_id"] for row in samples] == ["node-1/fresh"]
    assert [row["sample_id"] for row in dead] == ["node-1/old"]
    assert "ACSP_METERING_MAX_SAMPLE_AGE_S" in dead[0]["reason"]
    assert dead[0]["payload"] is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [("3600", "below the minimum 86400"), ("two weeks", "two weeks")],
)
def test_bad_max_sample_age_rejected(value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        MeteringSettings.from_env({"ACSP_METERING_MAX_SAMPLE_AGE_S": value})
    assert caught.value.variable == "ACSP_METERING_MAX_SAMPLE_AGE_S"
    assert reason in str(caught.value)


def test_max_sample_age_reaches_ingest() -> None:
    settings = MeteringSettings.from_env({"ACSP_METERING_MAX_SAMPLE_AGE_S": "86400"})
    assert settings.ingest_config().max_sample_age_s == 86_400.0
    assert settings.coverage_sweep_config().max_sample_age_s == 86_400.0
    assert MeteringSettings.from_env({}).max_sample_age_s == 14 * 86_400.0
