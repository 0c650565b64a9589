"""The overlap probe on a node whose accelerator ran many tasks before.

Every task that ever ran on an accelerator keeps a coverage row until the coverage sweep, which
these tests do not run, deletes it. The probe reads only the rows that end in the hour the new
sample starts or later, so a late sample is still compared with every stored sample it overlaps.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from services.metering.ingest_store import BatchResult, write_batch
from services.metering.overlaps import END_HOUR_US, batch_token, raise_coverage
from services.metering.samples import UsageSample
from services.runtime.db import Database
from tests.metering.helpers import T0

MODEL = "A100-SXM4-80GB"
SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
T0_US = int(T0.timestamp()) * SECOND_US
OLD_TASKS = 2000
OLD_START_US = T0_US - 30 * DAY_US
"""Start of the first old task: older than the 14 days (the defaults) that the usage stream
keeps messages and that metering waits before it settles an ended attempt's hold."""
OLD_STEP_US = 120 * SECOND_US
"""Each old task runs for 60 s of every 120 s, so a gap of 60 s follows each."""


def _sample(
    sample_id: str, job: str, start_us: int, end_us: int, share_millis: int, sequence: int = 1
) -> UsageSample:
    """Return a sample of ``job``'s task 0 of attempt 0 on GPU-0 of node-1."""
    return UsageSample(
        sample_id,
        job,
        0,
        f"{job}/0/0",
        "prov-a",
        "r1",
        "node-1",
        "GPU-0",
        MODEL,
        share_millis,
        start_us,
        end_us,
        (end_us - start_us) * share_millis // 1000,
        0.5,
        sequence,
    )


def _old_task_sample(index: int) -> UsageSample:
    start_us = OLD_START_US + index * OLD_STEP_US
    return _sample(f"old-{index}", f"job-old-{index}", start_us, start_us + 60 * SECOND_US, 1000)


async def _store_old_tasks(db: Database) -> None:
    result = await _write(db, [_old_task_sample(index) for index in range(OLD_TASKS)])
    assert result.inserted == OLD_TASKS
    # The planner picks the end_hour index over the primary key from the table's statistics,
    # which autovacuum keeps up to date. The TRUNCATE before each test leaves none.
    async with db.acquire() as conn:
        await conn.execute("ANALYZE metering.sample_coverage")


async def _write(db: Database, samples: list[UsageSample]) -> BatchResult:
    async with db.acquire() as conn:
        return await write_batch(
            conn, samples, [], period_seconds=300, received_at=datetime.now(UTC)
        )


# Rows of sample_coverage that the current transaction has read, by sequential scans and by
# index scans. The pg_stat_xact_* views count what the transaction did so far, unlike the
# cumulative views, which a backend updates only after the transaction ends.
_COVERAGE_ROWS_READ = """
SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
FROM pg_stat_xact_user_tables WHERE relid = 'metering.sample_coverage'::regclass
"""


async def _write_counting_reads(
    db: Database, samples: list[UsageSample]
) -> tuple[BatchResult, int]:
    """Write one batch and return its result and the coverage rows it read."""
    async with db.acquire() as conn, conn.transaction():
        before = await conn.fetchval(_COVERAGE_ROWS_READ)
        result = await write_batch(
            conn, samples, [], period_seconds=300, received_at=datetime.now(UTC)
        )
        after = await conn.fetchval(_COVERAGE_ROWS_READ)
    return result, after - before


async def _dead_letter_keys(db: Database) -> set[str]:
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT dedupe_key FROM metering.dead_letters")
    return {row["dedupe_key"] for row in rows}


async def test_probe_skips_old_tasks(db: Database) -> None:
    """A probe beside a running task reads a few coverage rows, not one per old task."""
    await _store_old_tasks(db)
    await _write(db, [_sample("a", "job-a", T0_US, T0_US + 60 * SECOND_US, 600)])

    overlap, overlap_reads = await _write_counting_reads(
        db, [_sample("b", "job-b", T0_US + 30 * SECOND_US, T0_US + 90 * SECOND_US, 600, 2)]
    )
    fits, fits_reads = await _write_counting_reads(
        db, [_sample("c", "job-c", T0_US + 30 * SECOND_US, T0_US + 90 * SECOND_US, 400, 3)]
    )

    assert (overlap.inserted, overlap.dead_lettered) == (0, 1)
    assert (fits.inserted, fits.dead_lettered) == (1, 0)
    assert await _dead_letter_keys(db) == {"overlap:prov-a/b"}
    # The raise and the probe read the accelerator's row and the rows of job-a, of the new
    # sample's task and, for c, of job-b, whose row b's raise left behind.
    assert overlap_reads <= 10
    assert fits_reads <= 10


async def test_late_sample_meets_old_tasks(db: Database) -> None:
    """A sample 30 days late is compared with the old samples it overlaps, of any task."""
    await _store_old_tasks(db)
    await _write(db, [_sample("now", "job-now", T0_US, T0_US + 60 * SECOND_US, 1000)])
    first = OLD_START_US
    gap = OLD_START_US + 60 * SECOND_US

    other_task = await _write(
        db, [_sample("late-x", "job-late", first + 30 * SECOND_US, gap + 30 * SECOND_US, 500)]
    )
    own_task = await _write(
        db, [_sample("late-y", "job-old-5", first + 5 * OLD_STEP_US, gap + 5 * OLD_STEP_US, 1000)]
    )
    in_gap = await _write(db, [_sample("late-z", "job-late-gap", gap, gap + 60 * SECOND_US, 500)])

    assert (other_task.inserted, other_task.dead_lettered) == (0, 1)
    assert (own_task.inserted, own_task.dead_lettered) == (0, 1)
    assert (in_gap.inserted, in_gap.dead_lettered) == (1, 0)
    assert await _dead_letter_keys(db) == {"overlap:prov-a/late-x", "overlap:prov-a/late-y"}


async def _hot_updates(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
        "WHERE relid = 'metering.sample_coverage'::regclass"
    )
    assert row is not None
    return int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])


async def test_raise_within_hour_heap_only(db: Database) -> None:
    """A raise within end_hour writes no index entry, but one into the next hour does."""
    hour_start = T0_US
    async with db.acquire() as conn, conn.transaction():
        for end_us in (hour_start + 60 * SECOND_US, hour_start + 120 * SECOND_US):
            sample = _sample(f"s{end_us}", "job-a", end_us - 60 * SECOND_US, end_us, 1000)
            await raise_coverage(conn, [sample], batch_token())
        same_hour = await _hot_updates(conn)
        next_hour_end = hour_start + END_HOUR_US + 60 * SECOND_US
        sample = _sample("next", "job-a", next_hour_end - 60 * SECOND_US, next_hour_end, 1000)
        await raise_coverage(conn, [sample], batch_token())
        next_hour = await _hot_updates(conn)
        rows = await conn.fetch("SELECT end_us, end_hour FROM metering.sample_coverage")

    # Each raise updates the task's row and the accelerator's row.
    assert same_hour == (2, 2)
    assert next_hour == (4, 2)
    assert len(rows) == 2
    for row in rows:
        assert row["end_us"] == next_hour_end
        assert row["end_hour"] == next_hour_end // END_HOUR_US


async def test_batch_reads_accelerator_row_once(db: Database) -> None:
    """A batch of samples that follow their accelerator's coverage reads its row once, not once
    per sample."""
    await _write(db, [_sample("first", "job-a", T0_US, T0_US + SECOND_US, 1000)])
    samples = [
        _sample(f"next-{i}", "job-a", T0_US + i * SECOND_US, T0_US + (i + 1) * SECOND_US, 1000, i)
        for i in range(1, 201)
    ]

    result, reads = await _write_counting_reads(db, samples)

    assert (result.inserted, result.dead_lettered) == (200, 0)
    # The raise reads the accelerator's row and the task's row, and the probe reads the
    # accelerator's row again.
    assert reads <= 10
