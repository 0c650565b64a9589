"""Usage queries count metered usage; settlements count the part of it that was charged."""

from __future__ import annotations

import functools
from datetime import timedelta
from decimal import Decimal

from acsp.subjects import usage_subject
from services.metering.ingest import UsageIngest
from services.metering.queries import Grouping, UsageFilter, hours, query_usage
from services.metering.settlement import build_settlement
from services.runtime.db import Database
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    admit,
    drain,
    make_charger,
    report,
    running_ingest,
    sample,
    wait_until,
)


async def _ingested(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def _hours(db: Database) -> tuple[Decimal, Decimal, Decimal]:
    """Return the day's metered, settled and not yet charged accelerator-hours of prov-a."""
    day = (T0, T0 + timedelta(days=1))
    async with db.acquire() as conn:
        usage = await query_usage(conn, Grouping.PROVIDER, *day, UsageFilter(), after="", limit=10)
        settlement = await build_settlement(conn, "prov-a", *day)
        uncharged_micros = await conn.fetchval(
            "SELECT sum(accelerator_micros - charged_micros) FROM metering.usage_periods"
        )
    metered = sum((row.accelerator_hours for row in usage), Decimal(0))
    settled = sum((line.accelerator_hours for line in settlement.lines), Decimal(0))
    return metered, settled, hours(uncharged_micros)


async def test_settlement_hours_lag_uncharged_usage(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    items = [sample(f"node-1/{i}", "job-s", T0 + timedelta(minutes=i)) for i in range(12)]
    async with running_ingest(nats_url, db) as (js, ingest):
        await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_ingested, ingest, 1))
    await admit(db, "job-s")

    # Seven minutes in, only the first 300 s period has closed (30 s of lateness included).
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(minutes=7))))
    metered, settled, uncharged = await _hours(db)

    assert metered == Decimal("0.2")
    assert settled == hours(5 * 60 * 1_000_000)
    assert settled + uncharged == metered

    await admit(db, "job-s", ended_at=T0 + timedelta(minutes=12), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=1))))
    metered, settled, uncharged = await _hours(db)

    assert uncharged == 0
    assert settled == metered
