"""A scheduler's listing of pledges never replaces a newer stored copy.

The scheduler is a real gRPC server on port 0 that lists one pledge, without counting the
fleet as a standby does, or counting it as the leader does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.metering.pledges import PledgeSync
from services.metering.scheduler_replicas import SchedulerReplicas
from services.runtime.db import Database

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2026, 12, 6, 12, tzinfo=UTC)
DAY = timedelta(days=1)


def _sync(db: Database, address: str) -> tuple[PledgeSync, SchedulerReplicas]:
    replicas = SchedulerReplicas([address], lambda target, host: grpc.aio.insecure_channel(target))
    return PledgeSync(db, replicas, timeout_s=10), replicas


async def _store_copy_time(db: Database, provider: str, copied_at: datetime) -> None:
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO metering.pledge_copies (provider, copied_at) VALUES ($1, $2)",
            provider,
            copied_at,
        )


def _listed_pledge(protected: int) -> scheduler_pb2.Pledge:
    pledge = scheduler_pb2.Pledge(
        pledge_id="pl-1",
        provider_id="prov-a",
        region_id="r1",
        model="H800",
        protected_count=protected,
        recallable_count=0,
    )
    pledge.window.start_time.FromDatetime(NOW - DAY)
    pledge.window.end_time.FromDatetime(NOW + DAY)
    pledge.create_time.FromDatetime(NOW - DAY)
    return pledge


class StandbyScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Lists one pledge without counting the fleet, as a standby scheduler does, unless
    ``counted`` is set, as on the leader."""

    def __init__(self, protected: int) -> None:
        self.protected = protected
        self.counted = False

    async def ListPledges(
        self, request: scheduler_pb2.ListPledgesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListPledgesResponse:
        return scheduler_pb2.ListPledgesResponse(
            pledges=[_listed_pledge(self.protected)], fleet_counted=self.counted
        )

    async def ListRecalls(
        self, request: scheduler_pb2.ListRecallsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListRecallsResponse:
        return scheduler_pb2.ListRecallsResponse()


@pytest.fixture
async def standby() -> AsyncIterator[tuple[StandbyScheduler, str]]:
    servicer = StandbyScheduler(protected=3)  # type: ignore[abstract]
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _stored_protected(db: Database) -> int | None:
    async with db.acquire() as conn:
        return await conn.fetchval(
            "SELECT protected_count FROM metering.pledges WHERE pledge_id = 'pl-1'"
        )


async def test_standby_listing_keeps_newer_copy(
    db: Database, standby: tuple[StandbyScheduler, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = standby
    # A copy stored after this listing started, by another metering replica's sync.
    newer = datetime.now(UTC) + timedelta(minutes=1)
    await _store_copy_time(db, "prov-a", newer)
    sync, replicas = _sync(db, address)
    try:
        listed = await sync.sync_once("prov-a")
    finally:
        await replicas.close()
    async with db.acquire() as conn:
        copied_at = await conn.fetchval(
            "SELECT copied_at FROM metering.pledge_copies WHERE provider = 'prov-a'"
        )
    assert listed == (1, 0)
    assert await _stored_protected(db) is None
    assert copied_at == newer
    assert "older than the copy stored at" in caplog.text


async def test_leader_listing_keeps_newer_copy(
    db: Database, standby: tuple[StandbyScheduler, str], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, address = standby
    servicer.counted = True
    # Another metering replica's copy that listed the leader after this listing started, and
    # committed first while this one waited for the database.
    newer = datetime.now(UTC) + timedelta(minutes=1)
    await _store_copy_time(db, "", newer)
    sync, replicas = _sync(db, address)
    try:
        listed = await sync.sync_once("prov-a")
    finally:
        await replicas.close()
    async with db.acquire() as conn:
        copies = await conn.fetch("SELECT provider, copied_at FROM metering.pledge_copies")
    assert listed == (1, 0)
    assert await _stored_protected(db) is None
    assert [(row["provider"], row["copied_at"]) for row in copies] == [("", newer)]
    assert "older than the copy stored at" in caplog.text


async def test_standby_listing_replaces_older_copy(
    db: Database, standby: tuple[StandbyScheduler, str]
) -> None:
    servicer, address = standby
    await _store_copy_time(db, "", datetime.now(UTC) - timedelta(minutes=1))
    sync, replicas = _sync(db, address)
    try:
        await sync.sync_once("prov-a")
        servicer.protected = 5
        await sync.sync_once()
    finally:
        await replicas.close()
    assert await _stored_protected(db) == 5
