"""Samples that report time already stored under another id are dead-lettered, not charged."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from acsp.subjects import usage_subject
from services.metering.ingest import UsageIngest
from services.metering.ingest_store import BatchResult, write_batch
from services.metering.overlaps import (
    NODE_LOCK_CLASS,
    TIME_LOCK_CLASS,
    StoredSample,
    batch_token,
    lock_sample_times,
    raise_coverage,
    sample_time_locks,
    split_overlapping,
)
from services.metering.samples import UsageSample
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


def _usage(
    sample_id: str,
    start_s: int,
    end_s: int,
    *,
    sequence: int = 1,
    accelerator_id: str = "GPU-0",
    node: str = "node-1",
    provider: str = "prov-a",
    attempt: int = 0,
    task: int = 0,
    share_millis: int = 1000,
) -> UsageSample:
    """Return a sample of job-o from T0 + start_s to T0 + end_s."""
    return UsageSample(
        sample_id,
        "job-o",
        attempt,
        f"job-o/{attempt}/{task}",
        provider,
        "r1",
        node,
        accelerator_id,
        MODEL,
        share_millis,
        T0_US + start_s * SECOND_US,
        T0_US + end_s * SECOND_US,
        (end_s - start_s) * share_millis * 1000,
        0.5,
        sequence,
    )


async def _write(db: Database, samples: list[UsageSample]) -> BatchResult:
    async with db.acquire() as conn:
        return await write_batch(
            conn, samples, [], period_seconds=300, received_at=datetime.now(UTC)
        )


async def _stored_ids(db: Database) -> list[str]:
    async with db.acquire() as conn:
        rows = await conn.fetch("SELECT sample_id FROM metering.usage_samples ORDER BY start_time")
    return [row["sample_id"] for row in rows]


async def _stored_micros(db: Database) -> int:
    return await count(
        db, "SELECT coalesce(sum(accelerator_micros), 0) FROM metering.usage_periods"
    )


def test_split_keeps_first_arrival() -> None:
    first = _usage("a", 0, 60, sequence=1)
    overlapping = _usage("b", 30, 90, sequence=2)
    # Overlaps only the rejected sample, so it is kept.
    after_rejected = _usage("c", 60, 120, sequence=3)
    other_accelerator = _usage("d", 0, 60, sequence=4, accelerator_id="GPU-1")
    # Another attempt may share an accelerator only in fractions, and "a" uses it whole.
    other_attempt = _usage("e", 0, 60, sequence=5, attempt=1)

    accepted, rejected, _ = split_overlapping(
        [after_rejected, overlapping, first, other_accelerator, other_attempt], {}
    )

    assert [s.sample_id for s in accepted] == ["a", "c", "d"]
    assert [r.sample_id for r in rejected] == ["b", "e"]
    assert rejected[0].dedupe_key == "overlap:prov-a/b"
    assert "overlaps sample a" in rejected[0].reason
    assert rejected[0].subject == usage_subject("prov-a", "r1", "node-1")
    assert rejected[1].dedupe_key == "overlap:prov-a/e"
    assert "overlaps sample a of job job-o attempt 0" in rejected[1].reason


def test_split_rejects_stored_overlap_first() -> None:
    # "a" overlaps a stored sample, so "b", which overlaps only "a", is kept.
    overlapping_stored = _usage("a", 0, 60, sequence=1)
    after = _usage("b", 50, 120, sequence=2)
    stored = {("prov-a", "a"): [StoredSample("old", T0_US - 10 * SECOND_US, T0_US + SECOND_US)]}

    accepted, rejected, _ = split_overlapping([overlapping_stored, after], stored)

    assert [s.sample_id for s in accepted] == ["b"]
    assert [r.sample_id for r in rejected] == ["a"]
    assert "overlaps sample old" in rejected[0].reason


def test_split_adjacent_samples_kept() -> None:
    samples = [_usage(str(i), i * 60, (i + 1) * 60, sequence=i) for i in (3, 1, 0, 2)]

    accepted, rejected, _ = split_overlapping(samples, {})

    assert len(accepted) == 4
    assert rejected == []


def test_split_other_task_checks_each_overlap() -> None:
    """A fractional sample is compared with every earlier sample of another task it overlaps,
    not only the last one, because that task's share may change."""
    whole = _usage("a", 0, 10)
    fraction = _usage("b", 10, 60, sequence=2, share_millis=500)
    other_fraction = _usage("c", 0, 60, sequence=3, task=1, share_millis=500)
    other_later = _usage("d", 60, 70, sequence=4, task=1)

    accepted, rejected, _ = split_overlapping([whole, fraction, other_fraction, other_later], {})

    assert [s.sample_id for s in accepted] == ["a", "b", "d"]
    assert [r.sample_id for r in rejected] == ["c"]
    assert "overlaps sample a of job job-o attempt 0 (task job-o/0/0" in rejected[0].reason


def test_time_locks_shared_by_overlaps() -> None:
    first = set(sample_time_locks([_usage("a", 0, 60)]))
    overlapping = set(sample_time_locks([_usage("b", 59, 61)]))
    next_minute = set(sample_time_locks([_usage("c", 60, 120)]))

    exclusive = {lock for lock in first if lock[2]}
    assert exclusive & overlapping
    assert not exclusive & next_minute
    # Both take their node shared, which lets them run side by side.
    assert {lock for lock in first if lock[0] == NODE_LOCK_CLASS} == {
        lock for lock in next_minute if lock[0] == NODE_LOCK_CLASS
    }


def test_time_locks_long_sample_locks_node() -> None:
    locks = sample_time_locks([_usage("long", 0, 3600), _usage("short", 0, 60, node="node-2")])

    assert [lock[0] for lock in locks] == [NODE_LOCK_CLASS, NODE_LOCK_CLASS, TIME_LOCK_CLASS]
    assert sorted(lock[2] for lock in locks if lock[0] == NODE_LOCK_CLASS) == [False, True]
    node_keys = [lock[1] for lock in locks if lock[0] == NODE_LOCK_CLASS]
    assert node_keys == sorted(node_keys)


async def test_reused_id_dead_lettered(db: Database) -> None:
    """A sample id stored for another accelerator is a dead letter, and it hides no time."""
    await _write(db, [_usage("a", 0, 60)])

    result = await _write(
        db,
        [
            _usage("a", 0, 60, sequence=2, accelerator_id="GPU-1"),
            _usage("b", 30, 90, sequence=3, accelerator_id="GPU-1"),
        ],
    )

    assert result.inserted == 1
    assert result.duplicates == 0
    assert result.dead_lettered == 1
    assert sorted(await _stored_ids(db)) == ["a", "b"]
    assert await _stored_micros(db) == 120 * SECOND_US
    reasons = await count(
        db,
        "SELECT count(*) FROM metering.dead_letters WHERE dedupe_key = 'reused-id:prov-a/a/2' "
        "AND sample_id = 'a' AND reason LIKE '%already stored for job job-o attempt 0 on "
        "accelerator GPU-0%' AND reason LIKE '%own id'",
    )
    assert reasons == 1


async def test_reused_id_and_overlap_counted(db: Database) -> None:
    result = await _write(
        db,
        [
            _usage("a", 0, 60),
            _usage("a", 0, 60, sequence=2, accelerator_id="GPU-1"),
            _usage("b", 30, 90, sequence=3),
        ],
    )

    assert result.inserted == 1
    assert result.duplicates == 0
    assert result.dead_lettered == 2


async def test_reused_id_in_one_batch(db: Database) -> None:
    """The first sample of an id in a batch is stored, and a later one with other usage is a
    dead letter, as when they come in two batches."""
    result = await _write(
        db,
        [
            _usage("a", 0, 60),
            _usage("a", 0, 60, sequence=2),
            _usage("a", 0, 60, sequence=3, accelerator_id="GPU-1"),
        ],
    )

    assert result.inserted == 1
    assert result.duplicates == 1
    assert result.dead_lettered == 1
    assert await _stored_micros(db) == 60 * SECOND_US
    stored = await count(
        db, "SELECT count(*) FROM metering.usage_samples WHERE accelerator_id = 'GPU-0'"
    )
    assert stored == 1
    reasons = await count(
        db,
        "SELECT count(*) FROM metering.dead_letters WHERE dedupe_key = 'reused-id:prov-a/a/3' "
        "AND reason LIKE '%used earlier in its batch for job job-o attempt 0 on accelerator "
        "GPU-0%'",
    )
    assert reasons == 1


async def test_reused_id_redelivery_changes_nothing(db: Database) -> None:
    await _write(db, [_usage("a", 0, 60)])
    longer = [_usage("a", 0, 120, sequence=2)]

    first = await _write(db, longer)
    second = await _write(db, longer)

    assert (first.inserted, first.duplicates, first.dead_lettered) == (0, 0, 1)
    assert (second.inserted, second.duplicates, second.dead_lettered) == (0, 0, 1)
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 1
    assert await _stored_micros(db) == 60 * SECOND_US


async def test_replayed_sample_is_duplicate(db: Database) -> None:
    await _write(db, [_usage("a", 0, 60)])

    result = await _write(db, [_usage("a", 0, 60, sequence=2)])

    assert (result.inserted, result.duplicates, result.dead_lettered) == (0, 1, 0)
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 0


async def test_overlap_with_stored_dead_lettered(db: Database) -> None:
    await _write(db, [_usage("a", 0, 60), _usage("b", 60, 120)])

    result = await _write(db, [_usage("x", 90, 150, sequence=2), _usage("y", 120, 180)])

    assert result.inserted == 1
    assert result.duplicates == 0
    assert result.dead_lettered == 1
    assert await _stored_ids(db) == ["a", "b", "y"]
    assert await _stored_micros(db) == 180 * SECOND_US
    reasons = await count(
        db,
        "SELECT count(*) FROM metering.dead_letters WHERE dedupe_key = 'overlap:prov-a/x' "
        "AND sample_id = 'x' AND reason LIKE '%overlaps sample b%'",
    )
    assert reasons == 1


async def test_out_of_order_samples_checked(db: Database) -> None:
    """A sample older than the latest stored one is compared with the one it falls beside."""
    await _write(db, [_usage("late", 600, 660)])
    await _write(db, [_usage("early", 0, 60)])

    # Inside the gap between the two: stored. Across the first one's end: rejected.
    result = await _write(db, [_usage("gap", 60, 600, sequence=2), _usage("x", 30, 61)])

    assert result.inserted == 1
    assert result.dead_lettered == 1
    assert await _stored_ids(db) == ["early", "gap", "late"]

    # Covering stored samples entirely: rejected.
    result = await _write(db, [_usage("wide", 0, 700)])
    assert result.dead_lettered == 1
    assert await _stored_micros(db) == 660 * SECOND_US


async def test_overlap_redelivery_changes_nothing(db: Database) -> None:
    batch = [_usage("a", 0, 60), _usage("b", 30, 90, sequence=2)]

    first = await _write(db, batch)
    second = await _write(db, batch)

    assert (first.inserted, first.duplicates, first.dead_lettered) == (1, 0, 1)
    # "a" is a replay of its own id, not an overlap with itself.
    assert (second.inserted, second.duplicates, second.dead_lettered) == (0, 1, 1)
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 1
    assert await _stored_micros(db) == 60 * SECOND_US


async def test_other_node_or_provider_not_overlap(db: Database) -> None:
    await _write(db, [_usage("a", 0, 60)])

    result = await _write(
        db, [_usage("a", 0, 60, provider="prov-b"), _usage("n2", 0, 60, node="node-2")]
    )

    assert result.inserted == 2
    assert result.dead_lettered == 0


async def test_tasks_sharing_accelerator_kept(db: Database) -> None:
    """Two tasks of one fractional job may share an accelerator over the same time."""
    shared = [
        _usage("t0", 0, 60, task=0, share_millis=500),
        _usage("t1", 0, 60, task=1, share_millis=500, sequence=2),
    ]

    result = await _write(db, shared)
    again = await _write(db, [_usage("t1-again", 30, 60, task=1, share_millis=500)])

    assert result.inserted == 2
    assert result.dead_lettered == 0
    assert again.dead_lettered == 1
    assert await _stored_micros(db) == 60 * SECOND_US


def _other_job(
    sample_id: str, start_s: int, end_s: int, *, sequence: int = 1, share_millis: int = 1000
) -> UsageSample:
    """Return a sample of job-p on job-o's accelerator from T0 + start_s to T0 + end_s."""
    return _usage(sample_id, start_s, end_s, sequence=sequence, share_millis=share_millis)._replace(
        job_id="job-p", task_id="job-p/0/0"
    )


async def _reasons(db: Database, dedupe_key: str) -> list[str]:
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT reason FROM metering.dead_letters WHERE dedupe_key = $1", dedupe_key
        )
    return [row["reason"] for row in rows]


@pytest.mark.parametrize(
    ("stored", "new"),
    [
        ((0, 60, 1000), (30, 90, 1000)),
        ((30, 90, 1000), (0, 60, 1000)),
        ((0, 60, 500), (30, 90, 1000)),
        ((0, 60, 1000), (30, 90, 500)),
        ((20, 40, 1000), (0, 60, 500)),
        ((0, 600, 1000), (60, 120, 250)),
    ],
    ids=[
        "whole-later",
        "whole-earlier",
        "whole-over-fraction",
        "fraction-over-whole",
        "whole-inside-fraction",
        "fraction-inside-whole",
    ],
)
async def test_other_job_on_whole_accelerator_dead_lettered(
    db: Database, stored: tuple[int, int, int], new: tuple[int, int, int]
) -> None:
    """A sample that overlaps another job's sample on its accelerator, where either uses the
    whole accelerator, is a dead letter that names both."""
    await _write(db, [_usage("o", stored[0], stored[1], share_millis=stored[2])])

    result = await _write(db, [_other_job("p", new[0], new[1], sequence=2, share_millis=new[2])])

    assert (result.inserted, result.duplicates, result.dead_lettered) == (0, 0, 1)
    assert await _stored_ids(db) == ["o"]
    reasons = await _reasons(db, "overlap:prov-a/p")
    assert len(reasons) == 1
    assert "sample p of job job-p attempt 0" in reasons[0]
    assert "overlaps sample o of job job-o attempt 0" in reasons[0]
    assert "more than the whole of it" in reasons[0]


async def test_other_job_whole_in_batch_dead_lettered(db: Database) -> None:
    result = await _write(
        db,
        [
            _usage("o", 0, 60),
            _other_job("p", 30, 90, sequence=2),
            _other_job("q", 60, 120, sequence=3, share_millis=500),
        ],
    )

    assert (result.inserted, result.duplicates, result.dead_lettered) == (2, 0, 1)
    assert await _stored_ids(db) == ["o", "q"]
    reasons = await _reasons(db, "overlap:prov-a/p")
    assert len(reasons) == 1
    assert "overlaps sample o of job job-o attempt 0" in reasons[0]
    assert "received earlier in its batch" in reasons[0]


async def test_fractions_of_accelerator_kept(db: Database) -> None:
    """Jobs that each hold a fraction may share an accelerator over the same time."""
    first = await _write(db, [_usage("o1", 0, 60, share_millis=400)])
    second = await _write(
        db,
        [
            _other_job("p1", 0, 60, share_millis=600),
            _usage("o2", 60, 120, sequence=2, share_millis=400),
            _other_job("p2", 50, 110, sequence=3, share_millis=600),
        ],
    )

    assert first.inserted == 1
    assert (second.inserted, second.dead_lettered) == (2, 1)
    assert await _stored_ids(db) == ["o1", "p1", "o2"]
    # p2 overlaps p1 of its own task, so it is rejected for that overlap.
    reasons = await _reasons(db, "overlap:prov-a/p2")
    assert len(reasons) == 1
    assert "overlaps sample p1 (" in reasons[0]
    assert await _stored_micros(db) == (24 + 36 + 24) * SECOND_US


async def test_whole_accelerator_after_other_job_kept(db: Database) -> None:
    await _write(db, [_usage("o", 0, 60), _usage("o2", 60, 120, sequence=2)])

    result = await _write(
        db, [_other_job("p", 120, 180, sequence=3), _other_job("p2", 180, 240, sequence=4)]
    )
    late = await _write(db, [_other_job("p0", -60, 0, sequence=5)])

    assert (result.inserted, result.dead_lettered) == (2, 0)
    assert (late.inserted, late.dead_lettered) == (1, 0)
    assert await _stored_micros(db) == 300 * SECOND_US


async def test_other_job_overlap_redelivery_changes_nothing(db: Database) -> None:
    await _write(db, [_usage("o", 0, 60)])
    batch = [_other_job("p", 30, 90, sequence=2)]

    first = await _write(db, batch)
    second = await _write(db, batch)

    assert (first.inserted, first.dead_lettered) == (0, 1)
    assert (second.inserted, second.dead_lettered) == (0, 1)
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 1
    assert await _stored_micros(db) == 60 * SECOND_US


async def test_coverage_raised_per_accelerator(db: Database) -> None:
    samples = [
        _usage("o", 0, 60, share_millis=500),
        _other_job("p", 0, 30),
        _usage("g1", 0, 90, accelerator_id="GPU-1", share_millis=250),
    ]
    async with db.acquire() as conn:
        await raise_coverage(conn, samples, batch_token())
        rows = await conn.fetch(
            "SELECT accelerator_id, task_id, end_us FROM metering.sample_coverage "
            "ORDER BY accelerator_id, task_id"
        )

    ends = [(r["accelerator_id"], r["task_id"], r["end_us"]) for r in rows]
    assert ends == [
        ("GPU-0", "", T0_US + 60 * SECOND_US),
        ("GPU-0", "job-o/0/0", T0_US + 60 * SECOND_US),
        ("GPU-0", "job-p/0/0", T0_US + 30 * SECOND_US),
        ("GPU-1", "", T0_US + 90 * SECOND_US),
        ("GPU-1", "job-o/0/0", T0_US + 90 * SECOND_US),
    ]


async def _insert_a(conn: asyncpg.Connection) -> None:
    """Insert sample "a" (0 to 60 s) of job-o as the merge would."""
    await conn.execute(
        """
        INSERT INTO metering.usage_samples
            (sample_id, job_id, attempt, task_id, provider, region, node, accelerator_id,
             accelerator_model, share_millis, start_time, end_time, accelerator_micros,
             utilization, period_start, stream_sequence, received_at)
        VALUES ('a', 'job-o', 0, 'job-o/0/0', 'prov-a', 'r1', 'node-1', 'GPU-0',
                $1, 1000, $2, $3, 60000000, 0.5, $2, 1, now())
        """,
        MODEL,
        T0,
        T0 + timedelta(seconds=60),
    )


@asynccontextmanager
async def _uncommitted_batch(db: Database) -> AsyncIterator[None]:
    """Hold a transaction that stored sample "a" (0 to 60 s) as ingest does, until the exit."""
    async with db.pool.acquire() as holder:
        await raise_coverage(holder, [_usage("a", 0, 60)], batch_token())
        transaction = holder.transaction()
        await transaction.start()
        try:
            await lock_sample_times(holder, [_usage("a", 0, 60)])
            await _insert_a(holder)
            yield
        finally:
            await transaction.commit()


async def _lock_waits(db: Database) -> int:
    return await count(
        db,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
    )


@pytest.mark.parametrize(
    ("start_s", "end_s"), [(30, 90), (-600, 600)], ids=["same-minute", "long-sample"]
)
async def test_concurrent_overlap_waits_for_commit(db: Database, start_s: int, end_s: int) -> None:
    """A batch waits for a concurrent batch of the same times and then reads its rows."""
    async with _uncommitted_batch(db):
        writer = asyncio.create_task(_write(db, [_usage("b", start_s, end_s, sequence=2)]))

        async def waiting() -> bool:
            return await _lock_waits(db) == 1

        await wait_until(waiting)
        assert not writer.done()
    result = await asyncio.wait_for(writer, 10)

    assert result.inserted == 0
    assert result.dead_lettered == 1
    assert await _stored_ids(db) == ["a"]


async def test_concurrent_other_job_waits_for_commit(db: Database) -> None:
    """A batch of another job on the accelerator waits for the first batch and reads its rows."""
    async with _uncommitted_batch(db):
        writer = asyncio.create_task(_write(db, [_other_job("p", 30, 90, sequence=2)]))

        async def waiting() -> bool:
            return await _lock_waits(db) == 1

        await wait_until(waiting)
        assert not writer.done()
    result = await asyncio.wait_for(writer, 10)

    assert result.inserted == 0
    assert result.dead_lettered == 1
    assert await _stored_ids(db) == ["a"]


@pytest.mark.parametrize("share_millis", [1000, 500], ids=["whole", "fraction"])
async def test_concurrent_other_job_raised_later_found(db: Database, share_millis: int) -> None:
    """A batch that raised the accelerator's coverage before a concurrent batch of another job
    still finds that batch's sample once it commits."""
    async with db.pool.acquire() as holder, db.pool.acquire() as raiser:
        transaction = holder.transaction()
        await transaction.start()
        try:
            await lock_sample_times(holder, [_usage("a", 0, 60)])
            late = _other_job("p", 30, 90, sequence=2, share_millis=share_millis)
            writer = asyncio.create_task(_write(db, [late]))

            async def waiting() -> bool:
                return await _lock_waits(db) == 1

            # The writer waits on the time lock, so it has raised the coverage already.
            await wait_until(waiting)
            await raise_coverage(raiser, [_usage("a", 0, 60)], batch_token())
            await _insert_a(holder)
        finally:
            await transaction.commit()
    result = await asyncio.wait_for(writer, 10)

    assert result.inserted == 0
    assert result.dead_lettered == 1
    assert await _stored_ids(db) == ["a"]


async def test_concurrent_other_minute_not_blocked(db: Database) -> None:
    async with _uncommitted_batch(db):
        result = await asyncio.wait_for(_write(db, [_usage("c", 60, 120, sequence=2)]), 10)

    assert result.inserted == 1
    assert result.dead_lettered == 0
    assert await _stored_ids(db) == ["a", "c"]


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_restarted_agent_charged_once(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """An agent that lost its state reports the same half hour again under new ids."""
    items = [sample(f"node-1/{i}", "job-r", T0 + timedelta(minutes=i)) for i in range(30)]
    again = [sample(f"node-1/b2/{i}", "job-r", T0 + timedelta(minutes=i)) for i in range(30)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(again))
        await wait_until(functools.partial(_done, ingest, 2))
    await admit(
        db,
        "job-r",
        ended_at=T0 + timedelta(minutes=30),
        end_reason="completed",
        providers=("prov-a",),
    )

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))

    assert ingest.counters.dead_lettered == 30
    assert_priced(ledger.total_charged(), exact_price(MODEL, 30 * 60), charges=30)
    overlaps = await count(
        db, "SELECT count(*) FROM metering.dead_letters WHERE dedupe_key LIKE 'overlap:%'"
    )
    assert overlaps == 30
