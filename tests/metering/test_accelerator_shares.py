"""The shares charged for one accelerator add up to at most the whole accelerator at any time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from acsp.subjects import usage_subject
from services.metering.ingest_store import BatchResult, write_batch
from services.metering.overlaps import (
    batch_token,
    lock_sample_times,
    raise_coverage,
    split_overlapping,
)
from services.metering.samples import UsageSample
from services.metering.shares import StoredSample, share_peak
from services.runtime.db import Database
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    admit,
    assert_priced,
    count,
    drain,
    exact_price,
    make_charger,
    report,
    running_ingest,
    sample,
    wait_until,
)

MODEL = "A100-SXM4-80GB"
T0_US = int(T0.timestamp()) * 1_000_000
SECOND_US = 1_000_000


def _share(
    sample_id: str,
    job: str,
    start_s: int,
    end_s: int,
    share_millis: int,
    *,
    sequence: int = 1,
    attempt: int = 0,
    task: int = 0,
) -> UsageSample:
    """Return a sample of ``job`` on GPU-0 of node-1 from T0 + start_s to T0 + end_s."""
    return UsageSample(
        sample_id,
        job,
        attempt,
        f"{job}/{attempt}/{task}",
        "prov-a",
        "r1",
        "node-1",
        "GPU-0",
        MODEL,
        share_millis,
        T0_US + start_s * SECOND_US,
        T0_US + end_s * SECOND_US,
        (end_s - start_s) * share_millis * 1000,
        0.5,
        sequence,
    )


def _stored(sample_id: str, start_s: int, end_s: int, share_millis: int) -> StoredSample:
    return StoredSample(
        sample_id,
        T0_US + start_s * SECOND_US,
        T0_US + end_s * SECOND_US,
        f"job-{sample_id}/0/0",
        f"job-{sample_id}",
        0,
        share_millis,
    )


async def _write(db: Database, samples: list[UsageSample]) -> BatchResult:
    async with db.acquire() as conn:
        return await write_batch(
            conn, samples, [], period_seconds=300, received_at=datetime.now(UTC)
        )


async def _stored_ids(db: Database) -> list[str]:
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT sample_id FROM metering.usage_samples ORDER BY sample_id")
    return [row["sample_id"] for row in rows]


async def _stored_micros(db: Database) -> int:
    return await count(
        db, "SELECT coalesce(sum(accelerator_micros), 0) FROM metering.usage_periods"
    )


async def _reasons(db: Database) -> dict[str, str]:
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT dedupe_key, reason FROM metering.dead_letters")
    return {row["dedupe_key"]: row["reason"] for row in rows}


def test_peak_of_disjoint_samples() -> None:
    """Two samples that do not overlap each other never add up."""
    peak = share_peak(
        T0_US, T0_US + 100 * SECOND_US, [_stored("a", 0, 50, 500), _stored("b", 50, 100, 500)]
    )

    assert peak.share_millis == 500
    assert [other.sample_id for other in peak.samples] == ["a"]


def test_peak_of_overlapping_samples() -> None:
    others = [_stored("a", 0, 60, 400), _stored("b", 30, 90, 300), _stored("c", 70, 120, 500)]

    peak = share_peak(T0_US + 40 * SECOND_US, T0_US + 100 * SECOND_US, others)

    assert peak.share_millis == 800
    assert peak.time_us == T0_US + 70 * SECOND_US
    assert [other.sample_id for other in peak.samples] == ["b", "c"]


def test_peak_outside_interval_ignored() -> None:
    peak = share_peak(T0_US + 60 * SECOND_US, T0_US + 120 * SECOND_US, [_stored("a", 0, 60, 1000)])

    assert peak.share_millis == 0
    assert peak.samples == ()


@pytest.mark.parametrize("batches", [1, 3], ids=["one-batch", "three-batches"])
async def test_three_of_four_tenths_one_dead_letter(db: Database, batches: int) -> None:
    samples = [
        _share("a", "job-a", 0, 60, 400, sequence=1),
        _share("b", "job-b", 0, 60, 400, sequence=2),
        _share("c", "job-c", 0, 60, 400, sequence=3),
    ]

    if batches == 1:
        results = [await _write(db, samples)]
    else:
        results = [await _write(db, [item]) for item in samples]

    assert sum(result.inserted for result in results) == 2
    assert sum(result.dead_lettered for result in results) == 1
    assert await _stored_ids(db) == ["a", "b"]
    assert await _stored_micros(db) == 2 * 24 * SECOND_US
    reasons = await _reasons(db)
    assert list(reasons) == ["overlap:prov-a/c"]
    assert (
        "sample c of job job-c attempt 0 (task job-c/0/0, share 0.4)" in reasons["overlap:prov-a/c"]
    )
    assert "sample a of job job-a attempt 0" in reasons["overlap:prov-a/c"]
    assert "sample b of job job-b attempt 0" in reasons["overlap:prov-a/c"]
    assert "add up to 1.2 of the accelerator" in reasons["overlap:prov-a/c"]


@pytest.mark.parametrize(
    "shares",
    [[500, 500], [250, 250, 250, 250], [100, 900], [1]],
    ids=["halves", "quarters", "uneven", "one"],
)
async def test_shares_that_fit_all_charged(db: Database, shares: list[int]) -> None:
    samples = [
        _share(f"s{index}", f"job-{index}", 0, 60, share, sequence=index)
        for index, share in enumerate(shares)
    ]

    stored_first = await _write(db, samples[:1])
    rest = await _write(db, samples[1:])

    assert stored_first.inserted + rest.inserted == len(shares)
    assert rest.dead_lettered == 0
    assert await _stored_micros(db) == sum(shares) * 60 * 1000


async def test_tasks_of_one_job_added_up(db: Database) -> None:
    """The tasks of one job that share an accelerator are added up like those of several."""
    samples = [
        _share(f"t{task}", "job-o", 0, 60, 400, sequence=task, task=task) for task in range(3)
    ]

    result = await _write(db, samples)

    assert (result.inserted, result.dead_lettered) == (2, 1)
    assert (
        "sample t0 of job job-o attempt 0 (task job-o/0/0"
        in (await _reasons(db))["overlap:prov-a/t2"]
    )


async def test_partial_overlaps_added_where_they_meet(db: Database) -> None:
    """A sample across two stored samples that do not overlap each other fits beside each."""
    await _write(
        db, [_share("a", "job-a", 0, 60, 500), _share("b", "job-b", 60, 120, 500, sequence=2)]
    )

    across = await _write(db, [_share("c", "job-c", 30, 90, 500, sequence=3)])
    # From 30 s to 60 s, a and c already use the whole accelerator.
    too_much = await _write(db, [_share("d", "job-d", 50, 70, 100, sequence=4)])
    # From 90 s on, only b runs.
    after = await _write(db, [_share("e", "job-e", 90, 120, 500, sequence=5)])

    assert (across.inserted, across.dead_lettered) == (1, 0)
    assert (too_much.inserted, too_much.dead_lettered) == (0, 1)
    assert (after.inserted, after.dead_lettered) == (1, 0)
    assert await _stored_ids(db) == ["a", "b", "c", "e"]
    reason = (await _reasons(db))["overlap:prov-a/d"]
    assert "sample a of job job-a" in reason
    assert "sample c of job job-c" in reason
    assert "sample b of job" not in reason
    assert "add up to 1.1 of the accelerator" in reason


async def test_partial_overlaps_in_one_batch(db: Database) -> None:
    samples = [
        _share("a", "job-a", 0, 60, 500, sequence=1),
        _share("b", "job-b", 60, 120, 500, sequence=2),
        _share("c", "job-c", 30, 90, 500, sequence=3),
        _share("d", "job-d", 50, 70, 100, sequence=4),
        _share("e", "job-e", 90, 120, 500, sequence=5),
    ]

    result = await _write(db, samples)

    assert (result.inserted, result.dead_lettered) == (4, 1)
    assert await _stored_ids(db) == ["a", "b", "c", "e"]
    assert "received earlier in its batch" in (await _reasons(db))["overlap:prov-a/d"]


async def test_late_sample_checked_against_later_ones(db: Database) -> None:
    """A sample that arrives after samples of later times is still added up with them."""
    await _write(
        db, [_share("a", "job-a", 60, 120, 600), _share("b", "job-b", 0, 30, 600, sequence=2)]
    )

    late = await _write(db, [_share("c", "job-c", 0, 120, 400, sequence=3)])
    later = await _write(db, [_share("d", "job-d", 100, 110, 100, sequence=4)])

    assert (late.inserted, late.dead_lettered) == (1, 0)
    assert (later.inserted, later.dead_lettered) == (0, 1)


async def test_share_redelivery_changes_nothing(db: Database) -> None:
    batch = [
        _share("a", "job-a", 0, 60, 400, sequence=1),
        _share("b", "job-b", 0, 60, 400, sequence=2),
        _share("c", "job-c", 0, 60, 400, sequence=3),
    ]

    first = await _write(db, batch)
    second = await _write(db, batch)

    assert (first.inserted, first.duplicates, first.dead_lettered) == (2, 0, 1)
    # a and b are replays of their own ids, which neither reject themselves nor count twice.
    assert (second.inserted, second.duplicates, second.dead_lettered) == (0, 2, 1)
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 1
    assert await _stored_micros(db) == 2 * 24 * SECOND_US


async def test_replay_beside_new_sample_counted_once(db: Database) -> None:
    await _write(db, [_share("a", "job-a", 0, 60, 500)])

    result = await _write(
        db,
        [
            _share("a", "job-a", 0, 60, 500, sequence=2),
            _share("b", "job-b", 0, 60, 500, sequence=3),
        ],
    )

    assert (result.inserted, result.duplicates, result.dead_lettered) == (1, 1, 0)
    assert await _stored_micros(db) == 60 * SECOND_US


async def test_reused_id_in_batch_not_counted(db: Database) -> None:
    """A sample id stored for other times is a dead letter, and its share in the batch does not
    count against the samples after it."""
    await _write(db, [_share("a", "job-a", 0, 60, 500)])

    result = await _write(
        db,
        [
            _share("a", "job-a", 60, 120, 500, sequence=2),
            _share("b", "job-b", 60, 120, 600, sequence=3),
        ],
    )

    assert (result.inserted, result.duplicates, result.dead_lettered) == (1, 0, 1)
    assert await _stored_ids(db) == ["a", "b"]
    assert list(await _reasons(db)) == ["reused-id:prov-a/a/2"]


def test_split_adds_up_shares() -> None:
    samples = [
        _share("a", "job-a", 0, 60, 300, sequence=1),
        _share("b", "job-b", 30, 90, 300, sequence=2),
        _share("c", "job-c", 50, 70, 500, sequence=3),
        _share("d", "job-d", 60, 120, 400, sequence=4),
    ]
    stored = {("prov-a", "d"): [_stored("x", 80, 100, 400)]}

    accepted, rejected, compared_with_batch = split_overlapping(samples, stored)

    assert [sample.sample_id for sample in accepted] == ["a", "b"]
    assert [rejection.sample_id for rejection in rejected] == ["c", "d"]
    assert "add up to 1.1 of the accelerator" in rejected[0].reason
    # d fits beside b alone and beside x alone, but from 80 s to 90 s both run beside it.
    assert "sample x of job job-x attempt 0" in rejected[1].reason
    assert "sample b of job job-b attempt 0" in rejected[1].reason
    assert compared_with_batch


async def test_ended_attempt_frees_its_share(db: Database) -> None:
    """The next attempt on the accelerator is added up only with what runs at its times."""
    await _write(
        db,
        [
            _share("o0", "job-o", 0, 60, 600, sequence=1),
            _share("o1", "job-o", 60, 120, 600, sequence=2, attempt=1),
        ],
    )

    fits = await _write(db, [_share("p", "job-p", 0, 60, 400, sequence=3)])
    too_much = await _write(db, [_share("q", "job-q", 60, 120, 600, sequence=4)])

    assert (fits.inserted, fits.dead_lettered) == (1, 0)
    assert (too_much.inserted, too_much.dead_lettered) == (0, 1)
    reason = (await _reasons(db))["overlap:prov-a/q"]
    assert "sample o1 of job job-o attempt 1" in reason
    assert "sample o0" not in reason


async def test_concurrent_batches_add_up(db: Database) -> None:
    """Batches that store overlapping shares at once take turns, so one of three is rejected."""
    samples = [
        _share(name, f"job-{name}", 0, 60, 400, sequence=index) for index, name in enumerate("abc")
    ]

    results = await asyncio.wait_for(asyncio.gather(*(_write(db, [item]) for item in samples)), 20)

    assert sum(result.inserted for result in results) == 2
    assert sum(result.dead_lettered for result in results) == 1
    assert await _stored_micros(db) == 2 * 24 * SECOND_US


async def _lock_waits(db: Database) -> int:
    return await count(
        db,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
    )


async def test_concurrent_share_waits_for_commit(db: Database) -> None:
    """A batch waits for a concurrent batch of the same times and adds up its shares."""
    uncommitted = _share("a", "job-a", 0, 60, 600)
    async with db.pool.acquire() as holder:
        await raise_coverage(holder, [uncommitted], batch_token())
        transaction = holder.transaction()
        await transaction.start()
        try:
            await lock_sample_times(holder, [uncommitted])
            await holder.execute(
                """
                INSERT INTO metering.usage_samples
                    (sample_id, job_id, attempt, task_id, provider, region, node,
                     accelerator_id, accelerator_model, share_millis, start_time, end_time,
                     accelerator_micros, utilization, period_start, stream_sequence,
                     received_at)
                VALUES ('a', 'job-a', 0, 'job-a/0/0', 'prov-a', 'r1', 'node-1', 'GPU-0',
                        $1, 600, $2, $3, 36000000, 0.5, $2, 1, now())
                """,
                MODEL,
                T0,
                T0 + timedelta(seconds=60),
            )
            writer = asyncio.create_task(
                _write(db, [_share("b", "job-b", 30, 90, 600, sequence=2)])
            )

            async def waiting() -> bool:
                return await _lock_waits(db) == 1

            await wait_until(waiting)
            assert not writer.done()
        finally:
            await transaction.commit()
    result = await asyncio.wait_for(writer, 10)

    assert (result.inserted, result.dead_lettered) == (0, 1)
    assert await _stored_ids(db) == ["a"]


async def test_ingested_shares_charged_up_to_whole(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """Three jobs that each report 0.4 of one accelerator are charged 0.8 of it in all."""
    jobs = ["job-x", "job-y", "job-z"]
    items = [
        sample(f"node-1/{job}/{minute}", job, T0 + timedelta(minutes=minute), share_millis=400)
        for minute in range(5)
        for job in jobs
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))

        async def stored() -> bool:
            return ingest.counters.messages >= 1

        await wait_until(stored)
    for job in jobs:
        await admit(
            db,
            job,
            ended_at=T0 + timedelta(minutes=5),
            end_reason="completed",
            providers=("prov-a",),
        )

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))

    assert ingest.counters.dead_lettered == 5
    assert_priced(ledger.total_charged(), exact_price(MODEL, 2 * 5 * 24), charges=2)
    rejected = await count(
        db, "SELECT count(*) FROM metering.dead_letters WHERE sample_id LIKE 'node-1/job-z/%'"
    )
    assert rejected == 5
