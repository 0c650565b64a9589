"""The shared embedded mesh: health, reflection, authentication, ``acsp status``."""

from __future__ import annotations

import asyncio
import shutil
import sys

import grpc
import pytest

from acsp.client import AsyncClient
from acsp.mesh.credentials import prepare
from acsp.mesh.health import check_health
from acsp.v1 import grant_pb2, metering_pb2, scheduler_pb2
from tests.conftest import MESH_AGENTS, RunningMesh, make_mesh_dir
from tests.mesh.checks import SERVICE_FULL_NAMES, reflected_services

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _list_calls(client: AsyncClient) -> dict[str, object]:
    """Make one read call on each service and return its response or error, by service."""
    calls = {
        "grant": client.grants.ListInstitutions(grant_pb2.ListInstitutionsRequest()),
        "scheduler": client.scheduler.ListAcceleratorModels(
            scheduler_pb2.ListAcceleratorModelsRequest()
        ),
        "metering": client.metering.ListRateCards(metering_pb2.ListRateCardsRequest()),
    }
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    return dict(zip(calls, results, strict=True))


async def test_every_service_reports_serving(mesh: RunningMesh):
    credentials = mesh.supervisor.client_credentials(token=None)
    for name, endpoint in mesh.info.endpoints.items():
        report = await check_health(name, endpoint, credentials)
        assert report.status == "SERVING", f"{name}: {report.detail}"


async def test_reflection_lists_each_service(mesh: RunningMesh):
    for name in mesh.info.endpoints:
        listed = await reflected_services(mesh.info, name)
        assert SERVICE_FULL_NAMES[name] in listed
        assert "grpc.health.v1.Health" in listed


async def test_call_without_token_is_unauthenticated(
    mesh: RunningMesh, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("ACSP_TOKEN", raising=False)
    async with mesh.async_client(token=None) as client:
        results = await _list_calls(client)
    for name, result in results.items():
        assert isinstance(result, grpc.aio.AioRpcError), f"{name} accepted a call without token"
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {result}"


async def test_token_of_another_key_is_unauthenticated(mesh: RunningMesh):
    stranger_dir = make_mesh_dir("acsp-stranger-")
    try:
        stranger = prepare(stranger_dir, services=[])
        token = stranger.mint_token(role="program_office", subject="mallory")
    finally:
        shutil.rmtree(stranger_dir)
    async with mesh.async_client(token=token) as client:
        results = await _list_calls(client)
    for name, result in results.items():
        assert isinstance(result, grpc.aio.AioRpcError), f"{name} accepted a foreign token"
        assert result.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {result}"


async def test_authenticated_call_reaches_handler(mesh: RunningMesh):
    async with mesh.async_client(token=mesh.token("program_office")) as client:
        results = await _list_calls(client)
    for name, result in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result}"


async def test_client_deadline_applies_to_streams(mesh: RunningMesh):
    async with mesh.async_client(token=mesh.token("program_office"), timeout_s=0.5) as client:
        stream = client.scheduler.WatchJobs(scheduler_pb2.WatchJobsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stream:
                pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_fleet_process_runs(mesh: RunningMesh):
    assert MESH_AGENTS > 0
    assert "agents" in mesh.supervisor.pids


def _environment_names(pid: int) -> set[str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().split(b"\0")
    return {entry.split(b"=", 1)[0].decode() for entry in entries if entry}


async def test_fleet_gets_no_database_password(mesh: RunningMesh):
    pids = mesh.supervisor.pids
    fleet = _environment_names(pids["agents"])
    scheduler = _environment_names(pids["scheduler"])
    assert "ACSP_DATABASE_URL" not in fleet
    assert "ACSP_NATS_PASSWORD" in fleet
    assert "ACSP_DATABASE_URL" in scheduler


async def test_acsp_status_exits_0_when_serving(mesh: RunningMesh):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "acsp.cli.main",
        "status",
        "--data-dir",
        str(mesh.info.data_dir),
        "--format",
        "csv",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert lines[0] == "service,endpoint,status,detail"
    statuses = {line.split(",")[0]: line.split(",")[2] for line in lines[1:]}
    assert statuses == {
        "grant": "SERVING",
        "scheduler": "SERVING",
        "metering": "SERVING",
        "postgres": "RUNNING",
        "nats-server": "RUNNING",
        "agents": "RUNNING",
    }
