"""The pledge copy a settlement waits for: bounded, and never older than what it settles.

The scheduler here is a TCP listener that accepts connections and never replies, as a hung
scheduler does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.metering.pledges import PledgeSync
from services.metering.scheduler_replicas import SchedulerReplicas
from services.metering.settings import MeteringSettings
from services.metering.settlement_copy import (
    COPY_DELAY,
    RECALL_LEEWAY,
    copy_covers,
    copy_for_settlement,
)
from services.runtime.db import Database
from services.runtime.errors import Unavailable
from services.runtime.settings import SettingsError

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2026, 12, 6, 12, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("copied_at", "end", "covers"),
    [
        (None, NOW - DAY, False),
        (NOW - DAY, NOW - DAY, False),
        (NOW - DAY + COPY_DELAY - timedelta(microseconds=1), NOW - DAY, False),
        (NOW - DAY + COPY_DELAY, NOW - DAY, True),
        (NOW, NOW - DAY, True),
        # A period still running is settled up to now, which a stored copy never reaches.
        (NOW - timedelta(seconds=1), NOW + DAY, False),
    ],
)
def test_copy_covers_period(copied_at: datetime | None, end: datetime, covers: bool) -> None:
    assert copy_covers(copied_at, end, NOW) is covers


def test_copy_covers_slow_recall_store() -> None:
    end = NOW - DAY
    # RecallCapacity accepts this effective time, the last one inside the period, from a
    # request made RECALL_LEEWAY after it, and then stores the recall 30 s later.
    requested_at = end - timedelta(microseconds=1) + RECALL_LEEWAY
    stored_at = requested_at + timedelta(seconds=30)
    copied_before_store = stored_at - timedelta(seconds=1)
    assert copy_covers(copied_before_store, end, NOW) is False


def test_pledge_copy_wait_setting() -> None:
    assert MeteringSettings.from_env({}).pledge_copy_wait_s == 15.0
    settings = MeteringSettings.from_env({"ACSP_METERING_PLEDGE_COPY_WAIT_S": "2.5"})
    assert settings.pledge_copy_wait_s == 2.5


@pytest.mark.parametrize(
    ("value", "reason"), [("0", "below the minimum 0.1"), ("soon", "'soon' is invalid")]
)
def test_bad_pledge_copy_wait_rejected(value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        MeteringSettings.from_env({"ACSP_METERING_PLEDGE_COPY_WAIT_S": value})
    assert caught.value.variable == "ACSP_METERING_PLEDGE_COPY_WAIT_S"
    assert reason in str(caught.value)


@pytest.fixture
async def hung_scheduler() -> AsyncIterator[str]:
    """Accept TCP connections and never reply; return the address."""
    connections: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


def _sync(db: Database, address: str) -> tuple[PledgeSync, SchedulerReplicas]:
    replicas = SchedulerReplicas([address], lambda target, host: grpc.aio.insecure_channel(target))
    # The per-call timeout is far longer than the settlement's wait, so only that wait ends it.
    return PledgeSync(db, replicas, timeout_s=60), replicas


async def _store_copy_time(db: Database, provider: str, copied_at: datetime) -> None:
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO metering.pledge_copies (provider, copied_at) VALUES ($1, $2)",
            provider,
            copied_at,
        )


async def test_hung_copy_fails_running_period(db: Database, hung_scheduler: str) -> None:
    copied_at = datetime.now(UTC) - timedelta(minutes=5)
    await _store_copy_time(db, "", copied_at)
    sync, replicas = _sync(db, hung_scheduler)
    began = time.monotonic()
    try:
        with pytest.raises(Unavailable) as caught:
            await copy_for_settlement(sync, db, "prov-a", datetime.now(UTC) + DAY, wait_s=0.5)
    finally:
        await replicas.close()
    message = str(caught.value)
    assert time.monotonic() - began < 10
    assert "prov-a" in message
    assert "0.5 s" in message
    assert copied_at.isoformat() in message
    assert "ACSP_SCHEDULER_ADDRESS" in message


async def test_hung_copy_without_stored_copy_fails(db: Database, hung_scheduler: str) -> None:
    sync, replicas = _sync(db, hung_scheduler)
    try:
        with pytest.raises(Unavailable) as caught:
            await copy_for_settlement(sync, db, "prov-a", datetime.now(UTC) - DAY, wait_s=0.5)
    finally:
        await replicas.close()
    assert "never copied" in str(caught.value)


async def test_hung_copy_uses_covering_copy(
    db: Database, hung_scheduler: str, caplog: pytest.LogCaptureFixture
) -> None:
    copied_at = datetime.now(UTC) - timedelta(minutes=5)
    await _store_copy_time(db, "prov-a", copied_at)
    sync, replicas = _sync(db, hung_scheduler)
    try:
        used = await copy_for_settlement(sync, db, "prov-a", copied_at - DAY, wait_s=0.5)
    finally:
        await replicas.close()
    assert used == copied_at
    assert "uses the pledges copied at" in caplog.text
