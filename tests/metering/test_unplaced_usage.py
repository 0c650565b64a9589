"""Usage that a provider reports for a job it does not run is rejected, not charged."""

from __future__ import annotations

import functools
from datetime import timedelta

from acsp.subjects import usage_subject
from acsp.v1 import events_pb2, scheduler_pb2
from services.metering.attempts import AttemptFacts, merge_facts, record_attempts
from services.metering.events import _placement_providers
from services.metering.ingest import UsageIngest
from services.metering.queries import Grouping, UsageFilter, query_usage
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


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_other_providers_usage_not_charged(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    own = [sample(f"node-1/{i}", "job-p", T0 + timedelta(minutes=i)) for i in range(30)]
    forged = [sample(f"node-9/{i}", "job-p", T0 + timedelta(minutes=i)) for i in range(30)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(own))
        await js.publish(
            usage_subject("prov-b", "r1", "node-9"),
            report(forged, provider="prov-b", node="node-9"),
        )
        await wait_until(functools.partial(_done, ingest, 2))
    await admit(
        db,
        "job-p",
        ended_at=T0 + timedelta(minutes=30),
        end_reason="completed",
        providers=("prov-a",),
    )

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))

    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 30 * 60), charges=30)
    assert list(ledger.released.values()) == ["hold-job-p-0"]
    rejected = await count(
        db,
        "SELECT count(*) FROM metering.dead_letters "
        "WHERE dedupe_key LIKE 'unplaced:job-p/0/%/prov-b/%' AND reason LIKE '%prov-b%'",
    )
    assert rejected > 0
    async with db.acquire() as conn:
        rows = await query_usage(
            conn, Grouping.PROVIDER, T0, T0 + timedelta(days=1), UsageFilter(), after="", limit=10
        )
    assert [row.key for row in rows] == ["prov-a"]


async def test_attempt_without_placements_charges_all(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [sample(f"node-1/{i}", "job-n", T0 + timedelta(minutes=i)) for i in range(10)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-b", "r1", "node-1"), report(items, provider="prov-b"))
        await wait_until(functools.partial(_done, ingest, 1))
    await admit(db, "job-n", ended_at=T0 + timedelta(minutes=10), end_reason="completed")

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))

    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 10 * 60), charges=10)


def test_merged_facts_keep_every_provider() -> None:
    def fact(providers: tuple[str, ...] | None) -> AttemptFacts:
        return AttemptFacts("job-m", 1, "hold-m", "grant-m", providers=providers)

    (merged,) = merge_facts([fact(("prov-b",)), fact(None), fact(("prov-a", "prov-b"))])

    assert merged.providers == ("prov-a", "prov-b")


async def test_stored_providers_grow_by_union(db: Database) -> None:
    await admit(db, "job-s", providers=("prov-b",))
    await admit(db, "job-s")
    await admit(db, "job-s", providers=("prov-a",))

    async with db.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT providers FROM metering.jobs WHERE job_id = 'job-s' AND attempt = 0"
        )

    assert stored == ["prov-a", "prov-b"]


async def test_batched_facts_store_providers(db: Database) -> None:
    facts = [
        AttemptFacts("job-b", 1, "hold-b", "grant-b", providers=("prov-b",)),
        AttemptFacts("job-c", 1, "hold-c", "grant-c"),
    ]
    async with db.acquire() as conn:
        await record_attempts(conn, facts)
        await record_attempts(conn, [AttemptFacts("job-b", 1, "", "", providers=("prov-a",))])
        rows = await conn.fetch(
            "SELECT job_id, providers FROM metering.jobs WHERE attempt = 1 ORDER BY job_id"
        )

    assert [(row["job_id"], row["providers"]) for row in rows] == [
        ("job-b", ["prov-a", "prov-b"]),
        ("job-c", None),
    ]


def test_job_event_names_placement_providers() -> None:
    placements = [
        scheduler_pb2.TaskPlacement(task_index=index, provider_id=provider)
        for index, provider in enumerate(["prov-b", "prov-a", "prov-b"])
    ]

    assert _placement_providers(events_pb2.JobEvent(placements=placements)) == ("prov-a", "prov-b")
    assert _placement_providers(events_pb2.JobEvent()) is None
