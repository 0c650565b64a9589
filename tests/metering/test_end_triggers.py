"""Only a provider that runs an attempt may name the health event that ended its work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import cast

import asyncpg
from nats.aio.msg import Msg

from acsp import subjects
from acsp.v1 import agent_pb2
from services.metering.attempts import AttemptFacts, record_attempts
from services.metering.end_triggers import EndTrigger, record_end_triggers, take_placed_candidates
from services.metering.events import FactConsumers
from services.metering.ingest_store import write_batch
from services.metering.samples import UsageSample
from services.runtime.db import Database
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    admit,
    count,
    drain,
    make_charger,
    wait_until,
)

MODEL = "A100-SXM4-80GB"


class _Message:
    """The part of a NATS message that the fact handlers read."""

    def __init__(self, data: bytes, subject: str) -> None:
        self.data = data
        self.subject = subject


def _task_failed(provider: str, node: str, health_event_id: str, job_id: str = "job-t") -> Msg:
    event = agent_pb2.TaskEvent(
        event_id=f"{node}/boot-1/{health_event_id}",
        node=agent_pb2.NodeRef(provider_id=provider, region_id="r1", node_id=node),
        task_id=f"{job_id}/0/0",
        job_id=job_id,
        state=agent_pb2.TASK_STATE_FAILED_HARDWARE,
        health_event_id=health_event_id,
    )
    data = event.SerializeToString()
    return cast(Msg, _Message(data, subjects.task_subject(provider, "r1", node)))


def _task_event(provider: str, node: str, state: agent_pb2.TaskState) -> Msg:
    event = agent_pb2.TaskEvent(
        event_id=f"{node}/boot-1/{state}",
        task_id="job-t/0/0",
        job_id="job-t",
        state=state,
    )
    data = event.SerializeToString()
    return cast(Msg, _Message(data, subjects.task_subject(provider, "r1", node)))


def _fatal_health(
    provider: str, node: str, event_id: str, time: datetime, task_ids: list[str]
) -> Msg:
    event = agent_pb2.HealthEvent(
        event_id=event_id,
        node=agent_pb2.NodeRef(provider_id=provider, region_id="r1", node_id=node),
        accelerator_id="GPU-0",
        condition="xid",
        xid=79,
        severity=agent_pb2.HEALTH_SEVERITY_FATAL,
        task_ids=task_ids,
    )
    event.time.FromDatetime(time)
    data = event.SerializeToString()
    return cast(Msg, _Message(data, subjects.health_subject(provider, "r1", node)))


async def _trigger(db: Database) -> tuple[str, str | None]:
    async with db.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT end_trigger, end_trigger_provider FROM metering.jobs "
            "WHERE job_id = 'job-t' AND attempt = 0"
        )
    assert row is not None
    return row["end_trigger"], row["end_trigger_provider"]


async def _unplaced_letters(db: Database) -> int:
    return await count(
        db,
        "SELECT count(*) FROM metering.dead_letters "
        "WHERE dedupe_key LIKE 'unplaced-trigger:job-t/0/prov-b/%' AND reason LIKE '%prov-b%'",
    )


async def test_unplaced_task_event_ignored(db: Database, ledger: LedgerDouble) -> None:
    await admit(db, "job-t", providers=("prov-a",))
    facts = FactConsumers(db, ledger)

    await facts.handle_tasks([_task_failed("prov-b", "node-9", "b-1")])
    assert await _trigger(db) == ("", None)
    assert await _unplaced_letters(db) == 1

    await facts.handle_tasks([_task_failed("prov-a", "node-1", "a-1")])
    assert await _trigger(db) == ("health:a-1", "prov-a")


async def test_placed_trigger_wins_in_batch(db: Database, ledger: LedgerDouble) -> None:
    await admit(db, "job-t", providers=("prov-a",))
    facts = FactConsumers(db, ledger)

    await facts.handle_tasks(
        [
            _task_failed("prov-b", "node-9", "b-1"),
            _task_failed("prov-a", "node-1", "a-1"),
            _task_failed("prov-a", "node-1", "a-2"),
        ]
    )

    assert await _trigger(db) == ("health:a-1", "prov-a")
    assert await _unplaced_letters(db) == 1


async def test_early_unplaced_trigger_cleared(db: Database, ledger: LedgerDouble) -> None:
    """A trigger stored before the placements were known goes once they show another provider."""
    facts = FactConsumers(db, ledger)
    await facts.handle_tasks([_task_failed("prov-b", "node-9", "b-1")])
    assert await _trigger(db) == ("health:b-1", "prov-b")

    await admit(db, "job-t", providers=("prov-a",))
    assert await _trigger(db) == ("", None)

    await facts.handle_tasks([_task_failed("prov-a", "node-1", "a-1")])
    assert await _trigger(db) == ("health:a-1", "prov-a")


async def test_early_placed_trigger_survives_foreign(db: Database, ledger: LedgerDouble) -> None:
    """A placed provider's trigger that came after another's, before the placements, is kept."""
    facts = FactConsumers(db, ledger)
    await facts.handle_tasks([_task_failed("prov-b", "node-9", "b-1")])
    await facts.handle_tasks([_task_failed("prov-a", "node-1", "a-1")])
    assert await _trigger(db) == ("health:b-1", "prov-b")

    await admit(db, "job-t", providers=("prov-a",))

    assert await _trigger(db) == ("health:a-1", "prov-a")


async def test_early_triggers_in_batch_keep_order(db: Database, ledger: LedgerDouble) -> None:
    facts = FactConsumers(db, ledger)
    await facts.handle_tasks(
        [
            _task_failed("prov-b", "node-9", "b-1"),
            _task_failed("prov-c", "node-5", "c-1"),
            _task_failed("prov-a", "node-1", "a-1"),
            _task_failed("prov-c", "node-5", "c-2"),
        ]
    )

    await admit(db, "job-t", providers=("prov-a", "prov-c"))

    assert await _trigger(db) == ("health:c-1", "prov-c")


async def test_batch_during_placements_keeps_placed(db: Database) -> None:
    """Placements that commit while a batch of triggers waits on the row lose no trigger."""
    triggers = [
        EndTrigger("job-t", 0, "health:b-1", "prov-b", "acsp.task.prov-b.r1.node-9", b""),
        EndTrigger("job-t", 0, "health:a-1", "prov-a", "acsp.task.prov-a.r1.node-1", b""),
    ]
    async with db.acquire() as placing, db.acquire() as recording:
        transaction = placing.transaction()
        await transaction.start()
        try:
            await record_attempts(
                placing, [AttemptFacts("job-t", 0, "hold-t", "grant-1", providers=("prov-a",))]
            )
            batch = asyncio.create_task(record_end_triggers(recording, triggers))
            await wait_until(_lock_awaited(db), timeout_s=10)
        finally:
            await transaction.commit()
        await asyncio.wait_for(batch, 10)

    assert await _trigger(db) == ("health:a-1", "prov-a")


def _lock_awaited(db: Database):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        waiting = await count(
            db,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        return waiting > 0

    return check


async def test_early_placed_trigger_kept(db: Database, ledger: LedgerDouble) -> None:
    facts = FactConsumers(db, ledger)
    await facts.handle_tasks([_task_failed("prov-a", "node-1", "a-1")])

    async with db.acquire() as conn:
        # Facts of two job events in one batch: the first names no placement.
        await record_attempts(
            conn,
            [
                AttemptFacts("job-t", 0, "hold-t", "grant-1"),
                AttemptFacts("job-t", 0, "hold-t", "grant-1", providers=("prov-a", "prov-c")),
            ],
        )

    assert await _trigger(db) == ("health:a-1", "prov-a")


async def test_unplaced_health_event_names_no_trigger(db: Database, ledger: LedgerDouble) -> None:
    await admit(db, "job-t", providers=("prov-a",))
    facts = FactConsumers(db, ledger)

    await facts.handle_health([_fatal_health("prov-b", "node-9", "b-1", T0, ["job-t/0/0"])])

    assert await _trigger(db) == ("", None)
    assert await _unplaced_letters(db) == 1
    # The event itself is stored: it is a fact about prov-b's own accelerator.
    assert await count(db, "SELECT count(*) FROM metering.health_events") == 1


class _NoDatabase:
    """A database that fails the test when a handler requests a connection."""

    @asynccontextmanager
    async def acquire(self, timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        raise AssertionError("the handler used the database")
        yield


async def test_task_batch_without_failure_skips_database(ledger: LedgerDouble) -> None:
    facts = FactConsumers(cast(Database, _NoDatabase()), ledger)
    # The last one names a node of another provider than its subject, so it is skipped.
    forged = agent_pb2.TaskEvent(
        task_id="job-t/0/0",
        node=agent_pb2.NodeRef(provider_id="prov-a", node_id="node-1"),
        state=agent_pb2.TASK_STATE_FAILED_HARDWARE,
        health_event_id="a-1",
    )
    forged_message = cast(
        Msg,
        _Message(forged.SerializeToString(), subjects.task_subject("prov-b", "r1", "node-9")),
    )

    await facts.handle_tasks(
        [
            _task_event("prov-a", "node-1", agent_pb2.TASK_STATE_STARTED),
            _task_event("prov-b", "node-9", agent_pb2.TASK_STATE_EXITED),
            forged_message,
        ]
    )


def _usage(index: int) -> UsageSample:
    start_us = int((T0 + timedelta(minutes=index)).timestamp()) * 1_000_000
    return UsageSample(
        f"node-1/{index}",
        "job-t",
        0,
        "job-t/0/0",
        "prov-a",
        "r1",
        "node-1",
        "GPU-0",
        MODEL,
        1000,
        start_us,
        start_us + 60_000_000,
        60_000_000,
        0.9,
        index + 1,
    )


async def test_unplaced_trigger_refunds_nothing(db: Database, ledger: LedgerDouble) -> None:
    """Another provider cannot turn a fault on the attempt's accelerator into a refund.

    prov-a's accelerator reported a fatal fault during the attempt that did not stop its task,
    and the attempt completed, so prov-a is paid in full. A task event from prov-b that names
    a fault as the attempt's end would make the refund check blame prov-a's fault.
    """
    async with db.acquire() as conn:
        await write_batch(
            conn,
            [_usage(i) for i in range(30)],
            [],
            period_seconds=300,
            received_at=datetime.now(UTC),
        )
    await admit(
        db,
        "job-t",
        ended_at=T0 + timedelta(minutes=30),
        end_reason="completed",
        providers=("prov-a",),
    )
    facts = FactConsumers(db, ledger)
    await facts.handle_health(
        [_fatal_health("prov-a", "node-1", "a-1", T0 + timedelta(minutes=10), [])]
    )
    await facts.handle_tasks([_task_failed("prov-b", "node-9", "a-1")])

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))

    assert len(ledger.charges) > 0
    assert ledger.refund_calls == []
    assert await count(db, "SELECT count(*) FROM metering.refunds") == 0


async def test_placement_waiting_on_batch_keeps_placed(db: Database) -> None:
    """Placements that wait on a batch of triggers still give the attempt a placed trigger."""
    triggers = [
        EndTrigger("job-t", 0, "health:b-1", "prov-b", "acsp.task.prov-b.r1.node-9", b""),
        EndTrigger("job-t", 0, "health:a-1", "prov-a", "acsp.task.prov-a.r1.node-1", b""),
    ]
    placed = AttemptFacts("job-t", 0, "hold-t", "grant-1", providers=("prov-a",))
    async with db.acquire() as recording, db.acquire() as placing:
        transaction = recording.transaction()
        await transaction.start()
        try:
            await record_end_triggers(recording, triggers)
            placement = asyncio.create_task(record_attempts(placing, [placed]))
            await wait_until(_lock_awaited(db), timeout_s=10)
        finally:
            await transaction.commit()
        await asyncio.wait_for(placement, 10)

    assert await _trigger(db) == ("health:a-1", "prov-a")


_KEY_ORDER_PLAN = ("enable_hashjoin", "enable_mergejoin", "enable_seqscan")
"""Planner settings that make a nested loop visit the attempts in key order."""
_PHYSICAL_ORDER_PLAN = (
    "enable_nestloop",
    "enable_mergejoin",
    "enable_indexscan",
    "enable_bitmapscan",
)
"""Planner settings that make a hash join visit the jobs table in physical order."""


async def _take_with_plan(
    db: Database, disabled: tuple[str, ...], job_ids: list[str], started: asyncio.Event
) -> None:
    async with db.acquire() as conn, conn.transaction():
        for setting in disabled:
            await conn.execute(f"SET LOCAL {setting} = off")
        started.set()
        await take_placed_candidates(conn, job_ids, [0] * len(job_ids))


async def test_concurrent_candidate_batches_no_deadlock(db: Database) -> None:
    """Two batches lock the same attempts in key order, whatever plan each statement gets.

    The jobs are stored in reverse key order, so one plan visits job-a first and the other
    job-z first. A third transaction locks job-m, which both batches reach second, so each
    batch has locked its first row when that transaction commits.
    """
    job_ids = ["job-a", "job-m", "job-z"]
    for round_index in range(3):
        async with db.acquire() as conn:
            await conn.execute("TRUNCATE metering.jobs, metering.end_trigger_candidates")
            for job_id in reversed(job_ids):
                await conn.execute(
                    "INSERT INTO metering.jobs (job_id, attempt, hold_id, grant_id, providers) "
                    "VALUES ($1, 0, 'hold', 'grant-1', ARRAY['prov-a'])",
                    job_id,
                )
                await conn.execute(
                    "INSERT INTO metering.end_trigger_candidates "
                    "(job_id, attempt, provider, end_trigger, position) "
                    "VALUES ($1, 0, 'prov-a', $2, 1)",
                    job_id,
                    f"health:{job_id}-{round_index}",
                )
        async with db.acquire() as holder:
            transaction = holder.transaction()
            await transaction.start()
            try:
                await holder.execute(
                    "SELECT 1 FROM metering.jobs WHERE job_id = 'job-m' FOR UPDATE"
                )
                started = [asyncio.Event(), asyncio.Event()]
                batches = [
                    asyncio.create_task(_take_with_plan(db, _KEY_ORDER_PLAN, job_ids, started[0])),
                    asyncio.create_task(
                        _take_with_plan(db, _PHYSICAL_ORDER_PLAN, job_ids, started[1])
                    ),
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
                await wait_until(_lock_waits_at_least(db, 2), timeout_s=10)
            finally:
                await transaction.commit()
            await asyncio.wait_for(asyncio.gather(*batches), 20)

        async with db.acquire() as conn:
            rows = await conn.fetch("SELECT job_id, end_trigger FROM metering.jobs ORDER BY job_id")
        assert [(r["job_id"], r["end_trigger"]) for r in rows] == [
            (job_id, f"health:{job_id}-{round_index}") for job_id in job_ids
        ]


def _lock_waits_at_least(db: Database, waiting: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        found = await count(
            db,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        return found >= waiting

    return check
