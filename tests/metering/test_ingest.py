"""Ingest against a real nats-server and PostgreSQL: exactly-once, dead letters, replicas."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import nats
import pytest

from acsp.subjects import usage_subject
from services.metering.charger import Charger, ChargerConfig
from services.metering.ingest import (
    IngestConfig,
    UsageIngest,
    consumer_config,
    declare_usage_stream,
    ingested_through,
)
from services.metering.ratecard import RateCardHistory, default_rate_card
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.migrations import load_migrations
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

SUBJECT = usage_subject("prov-a", "r1", "node-1")
MODEL = "A100-SXM4-80GB"


async def test_republished_sample_gives_one_row_and_one_charge(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    payload = report([sample("node-1/1", "job-1", T0)])
    async with running_ingest(nats_url, db) as (js, ingest):
        # The agent's spool replays the same sample at 0, 60, 120 and 180 s. Each replay is a
        # new stream message, past JetStream's duplicate window, so only the primary key in
        # PostgreSQL recognises it.
        for replay in range(4):
            await js.publish(SUBJECT, payload)
            await wait_until(functools.partial(_messages_done, ingest, replay + 1))
    assert ingest.counters.inserted == 1
    assert ingest.counters.duplicates == 3
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1

    await admit(db, "job-1", ended_at=T0 + timedelta(seconds=60), end_reason="completed")
    charger = make_charger(db, ledger, Clock(T0 + timedelta(hours=2)))
    await drain(charger)
    await drain(charger)
    assert len(ledger.charges) == 1
    assert ledger.total_charged() == default_rate_card().charge(MODEL, Decimal(60))


async def _messages_done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_redelivery_to_another_replica_gives_one_row(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    payload = report([sample(f"node-1/{i}", "job-2", T0 + timedelta(minutes=i)) for i in range(3)])
    config = IngestConfig(ack_wait_s=1.0, period_seconds=300)
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, config)
        await js.publish(SUBJECT, payload)
        # Replica A fetches the message and stalls before writing it.
        sub = await js.pull_subscribe(
            ">", durable=config.durable, stream=config.stream, config=consumer_config(config)
        )
        stalled = await sub.fetch(1, timeout=5)
        card = default_rate_card()
        replica_a = UsageIngest(js, db, config, lambda: card.rates)
        # Past the ack wait JetStream redelivers it to replica B, which commits it.
        async with running_ingest(nats_url, db, workers=1, ack_wait_s=1.0) as (_, replica_b):
            await wait_until(lambda: _messages_done(replica_b, 1))
        assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 3
        # A wakes up and writes the same batch late: nothing changes.
        late = await replica_a.process(stalled)
    finally:
        await client.close()
    assert late.inserted == 0
    assert late.duplicates == 3
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 3
    await admit(db, "job-2", ended_at=T0 + timedelta(minutes=3), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=1))))
    assert len(ledger.charges) == 1
    assert_priced(ledger.total_charged(), exact_price(MODEL, 180), charges=3)


async def test_malformed_sample_goes_to_dead_letter_rest_charged(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [
        sample(f"node-1/{i}", "job-3", T0 + timedelta(seconds=10 * i), 10) for i in range(1000)
    ]
    items[417].share_millis = 0
    async with running_ingest(nats_url, db) as (js, ingest):
        for start in range(0, 1000, 100):
            await js.publish(SUBJECT, report(items[start : start + 100]))
        await wait_until(lambda: _messages_done(ingest, 10))
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 999
    async with db.acquire() as conn:
        dead = await conn.fetch("SELECT sample_id, reason FROM metering.dead_letters")
    assert [row["sample_id"] for row in dead] == ["node-1/417"]
    assert "share_millis 0" in dead[0]["reason"]

    await admit(db, "job-3", ended_at=T0 + timedelta(seconds=10_000), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=4))))
    assert_priced(ledger.total_charged(), exact_price(MODEL, 999 * 10), charges=999)


async def test_undecodable_report_dead_lettered(
    nats_url: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.metering import ingest as ingest_module

    real = ingest_module.decode_report

    def failing_on_job_bad(data: bytes, *args: Any, **kwargs: Any) -> Any:
        if b"job-bad" in data:
            raise ValueError("a decoder bug")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "decode_report", failing_on_job_bad)
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(SUBJECT, report([sample("node-1/bad", "job-bad", T0)]))
        await js.publish(SUBJECT, report([sample("node-1/good", "job-good", T0)]))
        await wait_until(lambda: _messages_done(ingest, 2))
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1
    async with db.acquire() as conn:
        reason = await conn.fetchval("SELECT reason FROM metering.dead_letters")
    assert "could not be decoded" in reason
    assert "a decoder bug" in reason


async def test_sample_for_other_providers_node_rejected(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(SUBJECT, report([sample("node-1/1", "job-4", T0)]))
        await wait_until(lambda: _messages_done(ingest, 1))
        # Provider b publishes on its own subject but names provider a's node.
        forged = report([sample("node-1/2", "job-4", T0)], provider="prov-b", node="node-1")
        await js.publish(usage_subject("prov-b", "r9", "node-1"), forged)
        await wait_until(lambda: _messages_done(ingest, 2))
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1
    async with db.acquire() as conn:
        reason = await conn.fetchval("SELECT reason FROM metering.dead_letters")
    assert "belongs to provider 'prov-a'" in reason


async def test_invalid_sample_dead_letter_per_provider(nats_url: str, db: Database) -> None:
    shared = "node/1"
    async with running_ingest(nats_url, db) as (js, ingest):
        for done, (provider, node) in enumerate([("prov-a", "node-1"), ("prov-b", "node-9")], 1):
            item = sample(shared, "job-5", T0)
            item.share_millis = 0
            data = report([item], provider=provider, node=node)
            await js.publish(usage_subject(provider, "r1", node), data)
            await wait_until(functools.partial(_messages_done, ingest, done))
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT dedupe_key, sample_id FROM metering.dead_letters ORDER BY dedupe_key"
        )
    assert [row["dedupe_key"] for row in rows] == ["sample:prov-a/node/1", "sample:prov-b/node/1"]
    assert [row["sample_id"] for row in rows] == [shared, shared]


async def test_unregistered_node_dead_letter_per_provider(nats_url: str, db: Database) -> None:
    shared = "node/1"
    async with running_ingest(nats_url, db, require_registered_nodes=True) as (js, ingest):
        for done, provider in enumerate(["prov-a", "prov-b"], 1):
            data = report([sample(shared, "job-6", T0)], provider=provider, node="node-x")
            await js.publish(usage_subject(provider, "r1", "node-x"), data)
            await wait_until(functools.partial(_messages_done, ingest, done))
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT dedupe_key, reason FROM metering.dead_letters ORDER BY dedupe_key"
        )
    assert [row["dedupe_key"] for row in rows] == ["sample:prov-a/node/1", "sample:prov-b/node/1"]
    assert all("is not registered with any provider" in row["reason"] for row in rows)


async def test_migration_adds_provider_to_key(db: Database) -> None:
    """Keys stored as ``sample:<id>`` are rewritten so a replay still meets its row."""
    migrations = load_migrations("services.metering.migrations")
    (migration,) = [item for item in migrations if item.name == "sample_dead_letter_provider"]
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO metering.dead_letters (dedupe_key, subject, stream_sequence, reason) "
            "VALUES ('sample:node/1', $1, 3, 'invalid'), ('seq:4', $1, 4, 'undecodable')",
            usage_subject("prov-b", "r1", "node-9"),
        )
        await conn.execute(migration.sql)
        keys = await conn.fetch("SELECT dedupe_key FROM metering.dead_letters ORDER BY 1")
    assert [row["dedupe_key"] for row in keys] == ["sample:prov-b/node/1", "seq:4"]


async def test_other_providers_sample_id_kept(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """A provider that copies another's sample id does not make ingest drop that sample."""
    taken = "prov-a.r1.node-1/7"
    async with running_ingest(nats_url, db) as (js, ingest):
        forged = report([sample(taken, "job-b", T0)], provider="prov-b", node="node-9")
        await js.publish(usage_subject("prov-b", "r1", "node-9"), forged)
        await wait_until(lambda: _messages_done(ingest, 1))
        await js.publish(SUBJECT, report([sample(taken, "job-a", T0)]))
        await wait_until(lambda: _messages_done(ingest, 2))
        # A replay of provider a's sample is still recognised.
        await js.publish(SUBJECT, report([sample(taken, "job-a", T0)]))
        await wait_until(lambda: _messages_done(ingest, 3))
    assert ingest.counters.inserted == 2
    assert ingest.counters.duplicates == 1
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT provider, job_id FROM metering.usage_samples ORDER BY provider"
        )
    assert [(r["provider"], r["job_id"]) for r in rows] == [
        ("prov-a", "job-a"),
        ("prov-b", "job-b"),
    ]


async def test_job_ending_on_period_boundary_charged_once(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # Five one-minute samples fill the period [T0, T0+300 s) exactly; the job ends on the boundary.
    items = [sample(f"node-1/{i}", "job-5", T0 + timedelta(minutes=i)) for i in range(5)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(SUBJECT, report(items))
        await wait_until(lambda: _messages_done(ingest, 1))
    boundary = T0 + timedelta(seconds=300)
    await admit(db, "job-5", ended_at=boundary, end_reason="completed")
    clock = Clock(boundary + timedelta(seconds=31))
    charger = make_charger(db, ledger, clock)
    await drain(charger)
    clock.now += timedelta(hours=1)
    await drain(charger)
    assert list(ledger.charges) == [f"job-5/0/{int(T0.timestamp())}"]
    assert_priced(ledger.total_charged(), exact_price(MODEL, 300), charges=5)
    assert ledger.released == {"release/job-5/0": "hold-job-5-0"}


async def test_late_sample_charged_before_settle(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [sample(f"node-1/{i}", "job-l", T0 + timedelta(minutes=i)) for i in range(5)]
    # Published after the hold was released, as by an agent that spooled through an outage.
    late = sample("node-1/late", "job-l", T0 + timedelta(minutes=4), accelerator_id="GPU-1")
    end = T0 + timedelta(seconds=300)
    await admit(db, "job-l", ended_at=end, end_reason="completed")
    clock = Clock(end + timedelta(seconds=31))
    charger = make_charger(db, ledger, clock, settle_after_s=86_400.0)
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(SUBJECT, report(items))
        await wait_until(lambda: _messages_done(ingest, 1))
        await drain(charger)
        released = dict(ledger.released)
        await js.publish(SUBJECT, report([late]))
        await wait_until(lambda: _messages_done(ingest, 2))
    clock.now += timedelta(hours=1)
    await drain(charger)
    settled_before_delay = dict(ledger.settled)
    clock.now += timedelta(days=1)
    await drain(charger)

    assert released == {"release/job-l/0": "hold-job-l-0"}
    assert_priced(ledger.total_charged(), exact_price(MODEL, 360), charges=6)
    assert settled_before_delay == {}
    assert ledger.settled == {"settle/job-l/0": "hold-job-l-0"}
    assert await count(db, "SELECT count(*) FROM metering.charges WHERE state <> 'committed'") == 0


async def test_ingest_position_waits_for_backlog(nats_url: str, db: Database) -> None:
    config = IngestConfig(period_seconds=300)
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, config)
        await js.pull_subscribe(
            ">", durable=config.durable, stream=config.stream, config=consumer_config(config)
        )
        before = datetime.now(UTC)
        await js.publish(SUBJECT, report([sample("node-1/1", "job-w", T0)]))
        after = datetime.now(UTC)
        position = await ingested_through(js, config)
        assert before - timedelta(seconds=1) <= position <= after
        async with running_ingest(nats_url, db) as (_, ingest):
            await wait_until(functools.partial(_messages_done, ingest, 1))
        assert await ingested_through(js, config) >= after
    finally:
        await client.close()


async def test_settlement_waits_for_ingest_position(db: Database, ledger: LedgerDouble) -> None:
    await admit(db, "job-p", ended_at=T0, end_reason="completed")
    position = T0

    async def ingest_position() -> datetime:
        return position

    history = RateCardHistory((default_rate_card(),))
    charger = Charger(
        db,
        ledger,
        lambda: history,
        ChargerConfig(period_seconds=300, lateness_s=30),
        Clock(T0 + timedelta(hours=1)),
        ingested_through=ingest_position,
    )
    await drain(charger)
    assert ledger.released == {}
    position = T0 + timedelta(seconds=31)
    await drain(charger)
    assert ledger.released == {"release/job-p/0": "hold-job-p-0"}


class _FailingAcquires:
    """A Database whose acquisitions after the first ``skip`` raise Unavailable ``failures``
    times, as an exhausted pool does."""

    def __init__(self, db: Database, skip: int, failures: int) -> None:
        self._db = db
        self.skip = skip
        self.failures = failures

    def acquire(self, timeout_s: float | None = None) -> Any:
        if self.skip > 0:
            self.skip -= 1
        elif self.failures > 0:
            self.failures -= 1
            raise Unavailable("database pool exhausted (injected)")
        return self._db.acquire(timeout_s)


async def test_failed_write_is_redelivered(nats_url: str, db: Database) -> None:
    config = IngestConfig(period_seconds=300, retry_delay_s=0.1, fetch_timeout_s=0.2)
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, config)
        await js.publish(SUBJECT, report([sample("node-1/1", "job-f", T0)]))
        card = default_rate_card()
        # The first acquisition loads the node registry at start; the next two fail.
        flaky = _FailingAcquires(db, skip=1, failures=2)
        ingest = UsageIngest(js, flaky, config, lambda: card.rates)  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(ingest.run(stop))
        try:
            await wait_until(functools.partial(_messages_done, ingest, 1))
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    finally:
        await client.close()
    assert flaky.failures == 0
    assert ingest.counters.inserted == 1
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 0
