"""The usage ingest through a database outage: no empty batches, one log line at each end."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import pytest

from acsp.subjects import usage_subject
from services.metering.ingest import IngestConfig, UsageIngest, declare_usage_stream
from services.metering.ratecard import default_rate_card
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from tests.metering.helpers import T0, count, report, sample, wait_until

SUBJECT = usage_subject("prov-a", "r1", "node-1")
INGEST_LOGGER = "services.metering.ingest"

pytestmark = pytest.mark.timeout(60)


class _Outage:
    """A Database that raises Unavailable on every acquire while ``down`` is set, and counts
    the acquires it was asked for."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.down = False
        self.acquires = 0

    def acquire(self, timeout_s: float | None = None) -> Any:
        self.acquires += 1
        if self.down:
            raise Unavailable("cannot connect to the database: connection refused; retry later")
        return self._db.acquire(timeout_s)


async def test_empty_batch_skips_database(db: Database) -> None:
    outage = _Outage(db)
    outage.down = True
    card = default_rate_card()
    ingest = UsageIngest(None, outage, IngestConfig(), lambda: card.rates)  # type: ignore[arg-type]

    result = await ingest.process([])

    assert outage.acquires == 0
    assert result.inserted == 0
    assert ingest.counters.batches == 0


async def test_outage_logged_once_each_end(
    nats_url: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=INGEST_LOGGER)
    config = IngestConfig(period_seconds=300, retry_delay_s=0.05, fetch_timeout_s=0.2)
    outage = _Outage(db)
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, config)
        card = default_rate_card()
        ingest = UsageIngest(js, outage, config, lambda: card.rates)  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(ingest.run(stop))
        try:
            # The first acquire loads the node registry at start.
            await wait_until(lambda: _true(outage.acquires >= 1))
            outage.down = True
            await js.publish(SUBJECT, report([sample("node-1/1", "job-o", T0)]))
            await wait_until(lambda: _true(ingest.counters.failed_batches >= 5))
            outage.down = False
            await wait_until(lambda: _true(ingest.counters.inserted == 1))
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    finally:
        await client.close()

    records = [record for record in caplog.records if record.name == INGEST_LOGGER]
    failed = [record for record in records if record.levelno >= logging.WARNING]
    recovered = [record for record in records if "works again" in record.getMessage()]
    assert len(failed) == 1, [record.getMessage() for record in failed]
    assert failed[0].levelno == logging.ERROR
    assert "connection refused" in failed[0].getMessage()
    assert len(recovered) == 1, [record.getMessage() for record in recovered]
    assert f"{ingest.counters.failed_batches} failed" in recovered[0].getMessage()
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == 1


async def _true(value: bool) -> bool:
    return value
