"""The pledge copy reaches the scheduler's leader among several replicas.

In the copy tests, two real scheduler processes share one database: the first leads, the second
is a standby that lists pledges without counting the fleet. A simulated agent registers the
pledged region and its accelerators with the leader. The other tests cover the setting that
names the replicas and the channels to them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from acsp.v1 import common_pb2, scheduler_pb2
from services.metering.pledges import PledgeSync
from services.metering.scheduler_replicas import SchedulerReplicas, replica_channel_factory
from services.metering.settings import MeteringSettings
from services.runtime import tls
from services.runtime.auth import Role
from services.runtime.channel import open_channel
from services.runtime.db import Database
from services.runtime.migrations import apply_migrations
from services.runtime.settings import SettingsError
from tests.scheduler.harness import Stack, free_port, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(180)

GPUS = 8


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


@pytest.fixture
async def metering_db(stack: Stack) -> AsyncIterator[Database]:
    """Metering's schema in the scheduler's database, as one PostgreSQL serves both."""
    await apply_migrations(stack.dsn, "metering", "services.metering.migrations")
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=4, timeout=10)
    assert pool is not None
    yield Database(pool, "metering", 10.0)
    await pool.close()


async def _pledge_on_leader(stack: Stack, address: str) -> str:
    """Wait for the agent's inventory, then pledge 2 of its accelerators; return the pledge id."""
    operator = metadata(stack.token("op", Role.PROVIDER_OPERATOR, provider="prov"))
    now = int(time.time())
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(now - 60)
    window.end_time.FromSeconds(now + 86_400)
    pledge = scheduler_pb2.Pledge(
        provider_id="prov",
        region_id="reg",
        model="A100-SXM4-80GB",
        window=window,
        protected_count=1,
        recallable_count=1,
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def node_registered() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return len(nodes.nodes) == 1

        await wait_for(node_registered, 30, "the agent's inventory", 0.1)
        stored = await scheduler.SetPledge(
            scheduler_pb2.SetPledgeRequest(pledge=pledge), metadata=operator, timeout=10
        )
    return stored.pledge_id


async def _fleet_counted(stack: Stack, address: str) -> bool:
    channel, scheduler = scheduler_stub(address)
    async with channel:
        listed = await scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(),
            metadata=metadata(stack.token("metering", Role.SERVICE)),
            timeout=10,
        )
    return listed.fleet_counted


def _replicas(stack: Stack, addresses: list[str]) -> SchedulerReplicas:
    token = stack.token("metering", Role.SERVICE)
    return SchedulerReplicas(
        addresses, lambda address, host: open_channel(address, token=token, default_deadline_s=10)
    )


async def _capacity_rows(db: Database) -> list[asyncpg.Record]:
    async with db.acquire() as conn:
        return await conn.fetch(
            "SELECT pledge_id, registered_count, healthy_count FROM metering.pledge_capacity"
        )


async def test_copy_skips_standby_for_leader(stack: Stack, metering_db: Database) -> None:
    _, leader = await stack.start_scheduler("scheduler-a")
    _, standby = await stack.start_scheduler("scheduler-b", wait_leader=False)
    stack.start_agents(nodes=1, gpus=GPUS)
    pledge_id = await _pledge_on_leader(stack, leader)
    assert not await _fleet_counted(stack, standby)
    # Nothing listens on the first address, so the copy moves on from a failed replica too.
    unreachable = f"127.0.0.1:{free_port()}"
    replicas = _replicas(stack, [unreachable, standby, leader])
    sync = PledgeSync(metering_db, replicas, timeout_s=5)

    async def counted() -> bool:
        await sync.sync_once()
        rows = await _capacity_rows(metering_db)
        return bool(rows) and rows[-1]["healthy_count"] == GPUS

    try:
        await wait_for(counted, 30, "a copy with the leader's counts", 0.5)
        order = [address for address, _ in await replicas.replicas()]
    finally:
        await replicas.close()

    rows = await _capacity_rows(metering_db)
    assert rows[-1]["pledge_id"] == pledge_id
    assert rows[-1]["registered_count"] == GPUS
    assert order == [leader, unreachable, standby]


async def test_copy_from_standby_alone_uncounted(
    stack: Stack, metering_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    _, leader = await stack.start_scheduler("scheduler-a")
    _, standby = await stack.start_scheduler("scheduler-b", wait_leader=False)
    stack.start_agents(nodes=1, gpus=GPUS)
    await _pledge_on_leader(stack, leader)
    replicas = _replicas(stack, [standby])
    try:
        pledges, _ = await PledgeSync(metering_db, replicas, timeout_s=5).sync_once()
    finally:
        await replicas.close()

    assert pledges == 1
    assert await _capacity_rows(metering_db) == []
    assert f"copied from standby {standby} without counts" in caplog.text


async def test_copy_fails_without_any_replica(metering_db: Database) -> None:
    replicas = SchedulerReplicas(
        [f"127.0.0.1:{free_port()}"],
        lambda address, host: open_channel(address, default_deadline_s=5),
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await PledgeSync(metering_db, replicas, timeout_s=5).sync_once()
    finally:
        await replicas.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_replicas_resolve_each_host() -> None:
    """A host name becomes one channel per address, each checked against the host name."""
    hosts: dict[str, str] = {}

    def connect(address: str, host: str) -> grpc.aio.Channel:
        hosts[address] = host
        return grpc.aio.insecure_channel(address)

    replicas = SchedulerReplicas(["localhost:7001", "[::1]:7002", "127.0.0.1:7001"], connect)
    try:
        first = [address for address, _ in await replicas.replicas()]
        replicas.mark_leader("[::1]:7002")
        second = [address for address, _ in await replicas.replicas()]
    finally:
        await replicas.close()

    assert "127.0.0.1:7001" in first
    assert first.count("127.0.0.1:7001") == 1
    assert hosts["127.0.0.1:7001"] == "localhost"
    assert hosts["[::1]:7002"] in ("localhost", "::1")
    assert second[0] == "[::1]:7002"
    assert sorted(second) == sorted(first)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("scheduler", "is not host:port"),
        ("scheduler:http", "not a number from 1 to 65535"),
        ("a:1, ,b:x", "'b:x'"),
        (" , ", "no host:port is given"),
    ],
)
def test_bad_scheduler_address_rejected(value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        MeteringSettings.from_env({"ACSP_SCHEDULER_ADDRESS": value})
    assert caught.value.variable == "ACSP_SCHEDULER_ADDRESS"
    assert reason in str(caught.value)


def test_scheduler_address_lists_replicas() -> None:
    settings = MeteringSettings.from_env({"ACSP_SCHEDULER_ADDRESS": "a:50051, b:50051"})
    assert settings.scheduler_addresses == ("a:50051", "b:50051")
    assert MeteringSettings.from_env({}).scheduler_addresses == ()


@pytest.fixture
async def tls_replica(tmp_path: Path) -> AsyncIterator[tuple[MeteringSettings, str]]:
    """Serve gRPC health over mutual TLS on 127.0.0.1 with a certificate for sched.example only.

    Returns metering's settings, with a certificate from the same CA, and the replica's address.
    """
    ca = tls.generate_ca(tmp_path)
    server_paths = tls.issue_service_cert(tmp_path, "scheduler", hosts=["sched.example"])
    client_paths = tls.issue_service_cert(tmp_path, "metering", hosts=[])
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    credentials = tls.server_credentials(ca.ca, server_paths.cert, server_paths.key)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    settings = MeteringSettings.from_env(
        {
            "ACSP_TLS_CA": str(ca.ca),
            "ACSP_TLS_CERT": str(client_paths.cert),
            "ACSP_TLS_KEY": str(client_paths.key),
        }
    )
    try:
        yield settings, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _check_health(channel: grpc.aio.Channel) -> int:
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


async def test_replica_channel_checks_host_name(
    tls_replica: tuple[MeteringSettings, str],
) -> None:
    """A replica dialled by its IP address must present a certificate for the resolved name."""
    settings, address = tls_replica
    connect = replica_channel_factory(settings, token=None)

    status = await _check_health(connect(address, "sched.example"))
    with pytest.raises(grpc.aio.AioRpcError) as wrong_name:
        await _check_health(connect(address, "other.example"))

    assert status == health_pb2.HealthCheckResponse.SERVING
    assert wrong_name.value.code() == grpc.StatusCode.UNAVAILABLE
