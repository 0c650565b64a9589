"""A metering process killed mid-batch and restarted loses no sample and doubles none."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import nats

from acsp.subjects import usage_subject
from services.metering.ingest import IngestConfig, declare_usage_stream
from services.runtime.db import Database
from tests.metering.conftest import free_port
from tests.metering.helpers import T0, count, report, sample, wait_until

MESSAGES = 100
PER_MESSAGE = 100


async def _start(database_url: str, nats_url: str, data_dir: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(
        ACSP_DATABASE_URL=database_url,
        ACSP_NATS_URL=nats_url,
        ACSP_GRANT_ADDRESS=f"127.0.0.1:{free_port()}",
        ACSP_METERING_INGEST_BATCH="3",
        ACSP_METERING_INGEST_WORKERS="1",
        ACSP_METERING_ACK_WAIT_S="2",
        ACSP_LOG_LEVEL="WARNING",
        ACSP_GRPC_LISTEN="127.0.0.1:0",
        ACSP_DATA_DIR=str(data_dir),
    )
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.metering", env=env, stdout=asyncio.subprocess.DEVNULL
    )


async def test_killed_process_restarts_without_loss_or_double(
    database_url: str, nats_url: str, db: Database, tmp_path: Path
) -> None:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        await declare_usage_stream(js, IngestConfig())
        subject = usage_subject("prov-a", "r1", "node-1")
        for m in range(MESSAGES):
            items = [
                sample(f"node-1/{m}-{i}", f"job-{m % 5}", T0 + timedelta(seconds=m * 100 + i), 1)
                for i in range(PER_MESSAGE)
            ]
            await js.publish(subject, report(items))
    finally:
        await client.close()

    total = MESSAGES * PER_MESSAGE
    first = await _start(database_url, nats_url, tmp_path)
    try:
        await wait_until(_rows_above(db, 0), timeout_s=30)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    at_kill = await count(db, "SELECT count(*) FROM metering.usage_samples")
    assert 0 < at_kill < total

    second = await _start(database_url, nats_url, tmp_path)
    try:
        await wait_until(_rows_above(db, total - 1), timeout_s=60)
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 20)
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == total
    async with db.acquire() as conn:
        metered = await conn.fetchval("SELECT sum(accelerator_micros) FROM metering.usage_periods")
        samples = await conn.fetchval("SELECT sum(sample_count) FROM metering.usage_periods")
    assert metered == total * 1_000_000
    assert samples == total
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 0


def _rows_above(db: Database, floor: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await count(db, "SELECT count(*) FROM metering.usage_samples") > floor

    return check
