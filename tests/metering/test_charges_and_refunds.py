"""Charging, refunds and settlements through the real ingest and PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import nats
import pytest

from acsp.subjects import usage_subject
from services.metering.attempts import AttemptFacts, record_attempt, record_health_event
from services.metering.charger import Charger, ChargerConfig
from services.metering.ingest import IngestConfig, UsageIngest, declare_usage_stream
from services.metering.pledges import PledgeRecord, RecallRecord, store_pledges
from services.metering.queries import Grouping, UsageFilter, query_usage
from services.metering.ratecard import RateCardHistory, RatePolicy, default_rate_card
from services.metering.refunds import HealthFact
from services.metering.settlement import build_settlement, settlement_csv
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    admit,
    assert_priced,
    drain,
    exact_price,
    make_charger,
    report,
    running_ingest,
    sample,
    wait_until,
)

CARD = default_rate_card()


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_quarter_gpu_hour_costs_quarter_rate(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [
        sample(f"node-1/{i}", "job-q", T0 + timedelta(minutes=i), share_millis=250)
        for i in range(60)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    await admit(db, "job-q", ended_at=T0 + timedelta(hours=1), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))
    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 900), charges=60)


async def test_sum_of_charges_equals_priced_usage_exactly(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    models = ["T4", "H800", "MI300X", "Ascend-910B", "P100", "G2"]
    shares = [1000, 333, 125, 1, 999, 500]
    items = [
        sample(
            f"node-1/{i}",
            f"job-{i % 7}",
            T0 + timedelta(seconds=37 * i),
            seconds=7 + i % 53,
            model=models[i % len(models)],
            share_millis=shares[i % len(shares)],
            accelerator_id=f"GPU-{i % 8}",
        )
        for i in range(600)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        for start in range(0, 600, 50):
            await js.publish(
                usage_subject("prov-a", "r1", "node-1"), report(items[start : start + 50])
            )
        await wait_until(functools.partial(_done, ingest, 12))
    for job in range(7):
        await admit(db, f"job-{job}", ended_at=T0 + timedelta(hours=7), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=9))))

    expected = Decimal(0)
    for item in items:
        expected += CARD.charge(item.model, Decimal(item.accelerator_seconds.value))
    assert ledger.total_charged() == expected
    async with db.acquire() as conn:
        stored = await conn.fetchval("SELECT sum(amount) FROM metering.charges")
        lines = await conn.fetchval("SELECT sum(amount) FROM metering.charge_lines")
    assert stored == expected
    assert lines == expected


async def test_fatal_xid_refunds_lost_time_and_reduces_settlement(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # Two hours on one H800; checkpoint at 1:30, XID 79 at 1:59; the bound is one hour.
    items = [
        sample(f"node-1/{i}", "job-x", T0 + timedelta(minutes=i), model="H800") for i in range(120)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    fault = T0 + timedelta(minutes=119, seconds=30)
    async with db.acquire() as conn:
        await record_health_event(
            conn,
            HealthFact("node-1/boot-1/7", "GPU-0", "node-1", "xid", 79, True, fault),
            "prov-a",
            "r1",
            "GPU has fallen off the bus",
        )
    await admit(
        db,
        "job-x",
        ended_at=T0 + timedelta(minutes=120),
        end_reason="failed",
        last_checkpoint_at=T0 + timedelta(minutes=90),
    )
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=3)), max_refund_s=3600.0))

    assert_priced(ledger.total_charged(), exact_price("H800", 120 * 60), charges=120)
    # Samples that started at 1:30 up to the fault: 30 one-minute samples.
    assert list(ledger.refunds) == ["refund/job-x/0"]
    hold, amount, reason = ledger.refunds["refund/job-x/0"]
    assert hold == "hold-job-x-0"
    # They are priced as their six five-minute periods were charged, each rounded once.
    assert amount == 6 * CARD.charge("H800", Decimal(300))
    assert "xid 79 on GPU-0" in reason

    async with db.acquire() as conn:
        settlement = await build_settlement(conn, "prov-a", T0, T0 + timedelta(days=1))
    assert settlement.delivered_pf_days == ledger.total_charged()
    assert settlement.refunded_pf_days == amount
    assert settlement.net_pf_days == ledger.total_charged() - amount
    assert "TOTAL" in settlement_csv(settlement)


async def test_other_providers_fault_refunds_nothing(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """A fatal event that another provider reports for this job's accelerator is not its cause."""
    items = [sample(f"node-1/{i}", "job-f", T0 + timedelta(minutes=i)) for i in range(30)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    fault = T0 + timedelta(minutes=29)
    forged = HealthFact("node-1/boot-9/1", "GPU-0", "node-1", "xid", 79, True, fault, "prov-b")
    async with db.acquire() as conn:
        await record_health_event(conn, forged, "prov-b", "r1", "named another provider's GPU")
    await admit(db, "job-f", ended_at=T0 + timedelta(minutes=30), end_reason="failed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=3))))
    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 30 * 60), charges=30)
    assert ledger.refunds == {}


async def test_refund_bounded_by_policy_without_checkpoint(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [sample(f"node-1/{i}", "job-b", T0 + timedelta(minutes=i)) for i in range(60)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    await admit(
        db,
        "job-b",
        ended_at=T0 + timedelta(minutes=60),
        end_reason="preempted",
        end_trigger="recall:r-12",
    )
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2)), max_refund_s=600.0))
    _, amount, reason = ledger.refunds["refund/job-b/0"]
    # The last ten minutes, priced as their two five-minute periods were charged.
    assert amount == 2 * CARD.charge("A100-SXM4-80GB", Decimal(300))
    assert "recall r-12" in reason


async def test_refund_after_mid_job_rate_rise(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # One hour on one H800. The first half hour is charged at version 1, then version 2
    # doubles the H800's price. The checkpoint at 0:20 leaves 10 lost minutes charged at the
    # old rate and 30 at the new one.
    items = [
        sample(f"node-1/{i}", "job-rise", T0 + timedelta(minutes=i), model="H800")
        for i in range(60)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    doubled = [
        replace(m, peak_dense_tflops=m.peak_dense_tflops * 2) if m.name == "H800" else m
        for m in CARD.models.values()
    ]
    histories = [RateCardHistory((CARD,))]
    clock = Clock(T0 + timedelta(minutes=31))
    charger = Charger(db, ledger, lambda: histories[-1], ChargerConfig(period_seconds=300), clock)
    await admit(db, "job-rise")
    await drain(charger)
    assert_priced(ledger.total_charged(), exact_price("H800", 30 * 60), charges=6)

    histories.append(histories[-1].with_version(doubled, T0 + timedelta(minutes=30)))
    await admit(
        db,
        "job-rise",
        ended_at=T0 + timedelta(minutes=60),
        end_reason="preempted",
        end_trigger="recall:r-7",
        last_checkpoint_at=T0 + timedelta(minutes=20),
    )
    clock.now = T0 + timedelta(hours=2)
    await drain(charger)

    new_card = histories[-1].current
    _, amount, _ = ledger.refunds["refund/job-rise/0"]
    # Each five-minute period is priced, and rounded, as its charge was.
    old_periods = [CARD.charge("H800", Decimal(300))] * 2
    new_periods = [new_card.charge("H800", Decimal(300))] * 6
    assert amount == sum(old_periods + new_periods, Decimal(0))


async def test_pool_timeouts_leave_pool_usable(db: Database) -> None:
    size = db.pool.get_max_size()
    held = [await db.pool.acquire() for _ in range(size)]
    try:

        async def try_acquire() -> None:
            async with db.acquire(timeout_s=0.05):
                raise AssertionError("acquired a connection from an exhausted pool")

        results = await asyncio.gather(*(try_acquire() for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results), results
    finally:
        for conn in held:
            await db.pool.release(conn)
    assert db.pool.get_size() <= size
    async with db.acquire(timeout_s=5) as conn:
        assert await conn.fetchval("SELECT 1") == 1
    assert db.pool.get_idle_size() == db.pool.get_size()


@pytest.mark.parametrize("bad", ["1.0000001", "-5", "abc", "61"])
async def test_invalid_accelerator_seconds_dead_lettered(
    nats_url: str, db: Database, bad: str
) -> None:
    item = sample("node-1/1", "job-v", T0)
    item.accelerator_seconds.value = bad
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report([item]))
        await wait_until(functools.partial(_done, ingest, 1))
    assert ingest.counters.dead_lettered == 1
    assert ingest.counters.inserted == 0


async def test_fixed_at_award_grant_keeps_old_rates(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # Each job has an accelerator of its own: two jobs on one whole accelerator are rejected.
    items = [
        sample(
            f"node-1/{job}-{i}",
            job,
            T0 + timedelta(minutes=i),
            model="H800",
            accelerator_id=accelerator,
        )
        for job, accelerator in (("job-fixed", "GPU-0"), ("job-current", "GPU-1"))
        for i in range(10)
    ]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    for job, policy in (("job-fixed", RatePolicy.FIXED_AT_AWARD), ("job-current", None)):
        async with db.acquire() as conn:
            await record_attempt(
                conn,
                AttemptFacts(
                    job,
                    0,
                    f"hold-{job}",
                    "grant-1",
                    rate_policy=policy or RatePolicy.CURRENT,
                    award_rate_card_version=1 if policy else None,
                    ended_at=T0 + timedelta(minutes=10),
                    end_reason="completed",
                ),
            )
    # Version 2 doubles the H800's peak figure, and so its price.
    doubled = [
        replace(m, peak_dense_tflops=m.peak_dense_tflops * 2) if m.name == "H800" else m
        for m in CARD.models.values()
    ]
    history = RateCardHistory((CARD,)).with_version(doubled, T0)
    charger = Charger(
        db,
        ledger,
        lambda: history,
        ChargerConfig(period_seconds=300),
        Clock(T0 + timedelta(hours=1)),
    )
    await drain(charger)

    def charged(job: str) -> Decimal:
        return sum(
            (c.amount for c in ledger.charges.values() if c.request_id.startswith(job)),
            Decimal(0),
        )

    assert_priced(charged("job-fixed"), exact_price("H800", 600), charges=10)
    current = exact_price("H800", 600, history.current)
    assert_priced(charged("job-current"), current, charges=10)
    versions = {c.request_id.split("/")[0]: c.rate_card_version for c in ledger.charges.values()}
    assert versions == {"job-fixed": 1, "job-current": 2}


async def test_two_replicas_share_one_consumer(nats_url: str, db: Database) -> None:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, IngestConfig())
        for m in range(40):
            items = [
                sample(f"node-1/{m}-{i}", "job-r", T0 + timedelta(seconds=m * 50 + i), 1)
                for i in range(50)
            ]
            await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
    finally:
        await client.close()
    # One message a fetch, so that neither replica can take the whole backlog at once.
    async with (
        running_ingest(nats_url, db, workers=1, batch_messages=1) as (_, first),
        running_ingest(nats_url, db, workers=1, batch_messages=1) as (_, second),
    ):

        async def all_stored() -> bool:
            return first.counters.messages + second.counters.messages >= 40

        await wait_until(all_stored)
    assert first.counters.messages > 0
    assert second.counters.messages > 0
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM metering.usage_samples") == 2000
        assert await conn.fetchval("SELECT sum(sample_count) FROM metering.usage_periods") == 2000


async def test_settlement_counts_pledged_and_recalled_hours(db: Database) -> None:
    pledge = PledgeRecord("pl-1", "prov-a", "r1", "H800", 8, 4, T0, T0 + timedelta(hours=10), T0)
    recall = RecallRecord("rc-1", "pl-1", 2, T0 + timedelta(hours=1), T0 + timedelta(hours=4))
    orphan = RecallRecord("rc-2", "pl-unknown", 1, T0, T0 + timedelta(hours=1))
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge], [recall, orphan])
        await store_pledges(conn, [pledge], [recall])
        settlement = await build_settlement(conn, "prov-a", T0, T0 + timedelta(days=1))
    (line,) = settlement.lines
    assert line.pledged_accelerator_hours == 120
    assert line.recalled_accelerator_hours == 6
    assert settlement.recall_count == 1
    assert settlement.pledge_kept
    assert settlement.delivered_pf_days == 0


async def test_version_published_elsewhere_waits(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """A charge priced at a version this replica has not loaded yet waits for the refresh."""
    items = [sample(f"node-1/{i}", "job-v", T0 + timedelta(minutes=i)) for i in range(5)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    async with db.acquire() as conn:
        await record_attempt(
            conn,
            AttemptFacts(
                job_id="job-v",
                attempt=0,
                hold_id="hold-job-v-0",
                grant_id="grant-1",
                rate_policy=RatePolicy.FIXED_AT_AWARD,
                award_rate_card_version=2,
                ended_at=T0 + timedelta(minutes=5),
                end_reason="completed",
            ),
        )
    stale = RateCardHistory((CARD,))
    fresh = stale.with_version(CARD.models.values(), T0)
    calls: list[RateCardHistory] = []

    def history() -> RateCardHistory:
        # The first pass reads the cache before it refreshed.
        calls.append(stale if not calls else fresh)
        return calls[-1]

    config = ChargerConfig(period_seconds=300, lateness_s=30.0, interval_s=0.05)
    charger = Charger(db, ledger, history, config, Clock(T0 + timedelta(hours=1)))
    stop = asyncio.Event()
    task = asyncio.create_task(charger.run(stop))

    async def charged() -> bool:
        if task.done():
            task.result()  # Raises what stopped the charger.
        return len(ledger.charges) == 1

    try:
        await wait_until(charged)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert calls[0] is stale
    async with db.acquire() as conn:
        versions = await conn.fetch("SELECT rate_card_version FROM metering.charges")
    assert [r["rate_card_version"] for r in versions] == [2]


async def test_usage_leaves_out_rejected_money(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    """Charges and refunds that the ledger rejected for good count as neither."""
    items = [sample(f"node-1/{i}", "job-u", T0 + timedelta(minutes=i)) for i in range(10)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    await admit(db, "job-u", ended_at=T0 + timedelta(minutes=10), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=1))))
    period = CARD.charge("A100-SXM4-80GB", Decimal(300))
    async with db.acquire() as conn:
        # The ledger rejected the second period's charge and a refund for good.
        await conn.execute(
            "UPDATE metering.charges SET state = 'failed' WHERE period_start = $1",
            T0 + timedelta(minutes=5),
        )
        await conn.execute(
            "INSERT INTO metering.refunds (job_id, attempt, request_id, hold_id, amount, "
            "accelerator_seconds, lost_from, lost_until, reason, cause, state) "
            "VALUES ('job-u', 0, 'refund/job-u/0', 'hold-job-u-0', $1, 300, $2, $3, 'x', 'x', "
            "'failed')",
            period,
            T0,
            T0 + timedelta(minutes=5),
        )
        await conn.execute(
            "INSERT INTO metering.refund_lines (job_id, attempt, provider, region, "
            "accelerator_model, accelerator_seconds, amount, refund_time) "
            "VALUES ('job-u', 0, 'prov-a', 'r1', 'A100-SXM4-80GB', 300, $1, $2)",
            period,
            T0 + timedelta(minutes=5),
        )
        rows = await query_usage(
            conn, Grouping.GRANT, T0, T0 + timedelta(days=1), UsageFilter(), after="", limit=10
        )
    assert [row.key for row in rows] == ["grant-1"]
    assert rows[0].charged_pf_days == period
    assert rows[0].refunded_pf_days == 0
    assert rows[0].accelerator_hours == Decimal("0.166666666667")
