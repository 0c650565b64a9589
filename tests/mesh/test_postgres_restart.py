"""The embedded PostgreSQL: restarted on its port with its data and password, or explained."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from acsp.cli.mesh import process_reports
from acsp.client import AsyncClient
from acsp.mesh import LocalMesh, MeshConfig, load_mesh
from acsp.v1 import grant_pb2, metering_pb2, scheduler_pb2
from tests.conftest import make_mesh_dir

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir("acsp-postgres-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _services_mesh(data_dir: Path, **fields: object) -> MeshConfig:
    """Return a mesh of the three services on an embedded PostgreSQL and NATS, without a fleet."""
    config = MeshConfig(
        data_dir=data_dir,
        agents=0,
        database_url=None,
        nats_url=None,
        start_timeout_s=float(os.environ.get("ACSP_TEST_MESH_START_TIMEOUT_S", "90")),
        restart_delay_s=0.1,
    )
    return dataclasses.replace(config, **fields)  # type: ignore[arg-type]


async def _services_answer(client: AsyncClient, institution_id: str) -> bool:
    """Return whether each service completes a call that reads its schema."""
    try:
        institutions = await client.grants.ListInstitutions(
            grant_pb2.ListInstitutionsRequest(), timeout=5
        )
        await client.scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), timeout=5)
        await client.metering.ListRateCards(metering_pb2.ListRateCardsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return institution_id in [item.institution_id for item in institutions.institutions]


async def test_killed_postgres_restarts_on_same_port(data_dir: Path) -> None:
    async with LocalMesh(_services_mesh(data_dir)) as mesh:
        token = mesh.token(role="program_office", subject="office")
        url_before = mesh.info.database_url
        institution_id = f"uni-{uuid.uuid4().hex[:8]}"
        async with AsyncClient.from_mesh(mesh.info, token=token) as client:
            await client.grants.CreateInstitution(
                grant_pb2.CreateInstitutionRequest(
                    request_id=uuid.uuid4().hex,
                    institution=grant_pb2.Institution(
                        institution_id=institution_id, display_name="Uni", country_code="no"
                    ),
                ),
                timeout=10,
            )
            killed_pid = mesh.pids["postgres"]

            os.kill(killed_pid, signal.SIGKILL)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while not await _services_answer(client, institution_id):
                assert loop.time() < deadline, "the services did not work again in 120 s"
                await asyncio.sleep(0.5)
        # The services may connect before the supervisor's own readiness check passes.
        written = json.loads((data_dir / "mesh.json").read_text())
        while "postgres" in written.get("exits", {}):
            assert loop.time() < deadline, f"the exit stayed in the mesh file: {written}"
            await asyncio.sleep(0.1)
            written = json.loads((data_dir / "mesh.json").read_text())
        restarted_pid = mesh.pids["postgres"]
        failure = asyncio.ensure_future(mesh.wait_failure())
        await asyncio.sleep(0.2)
        assert not failure.done()
        failure.cancel()
    assert restarted_pid != killed_pid
    assert written["pids"]["postgres"] == restarted_pid
    assert written["database_url"] == url_before
    assert "postgres" not in written.get("exits", {})


async def test_postgres_restart_failure_shown_in_status(data_dir: Path) -> None:
    # The first restart waits 2 s, so that the test takes the port before it.
    config = _services_mesh(data_dir, max_restarts=50, restart_delay_s=2.0, max_restart_delay_s=2.0)
    async with LocalMesh(config) as mesh:
        port = int(mesh.info.database_url.rsplit(":", 1)[1].split("/")[0])
        killed_pid = mesh.pids["postgres"]
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The killed server's connections leave the port in TIME_WAIT.
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            os.kill(killed_pid, signal.SIGKILL)
            # Another program takes the port while PostgreSQL is down, so every restart fails.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                try:
                    blocker.bind(("127.0.0.1", port))
                    break
                except OSError:
                    assert loop.time() < deadline, f"port {port} stayed in use for 30 s"
                    await asyncio.sleep(0.01)
            blocker.listen()

            def postgres_report() -> tuple[str, str]:
                reports = {
                    report.service: report for report in process_reports(load_mesh(data_dir))
                }
                return reports["postgres"].status, reports["postgres"].detail

            status, detail = postgres_report()
            deadline = loop.time() + 60
            while "could not" not in detail:
                assert loop.time() < deadline, f"status showed no reason in 60 s: {detail!r}"
                await asyncio.sleep(0.2)
                status, detail = postgres_report()
        finally:
            blocker.close()
    assert status == "STOPPED"
    assert "exited with status" in detail
    assert "restarting" in detail


async def test_services_outlive_postgres_outage(data_dir: Path) -> None:
    # The first restart waits 8 s, longer than the services' background loops take to
    # notice that PostgreSQL is gone.
    config = _services_mesh(data_dir, restart_delay_s=8.0, max_restart_delay_s=8.0)
    async with LocalMesh(config) as mesh:
        token = mesh.token(role="program_office", subject="office")
        services = {name: mesh.pids[name] for name in ("grant", "scheduler", "metering")}
        institution_id = f"uni-{uuid.uuid4().hex[:8]}"
        async with AsyncClient.from_mesh(mesh.info, token=token) as client:
            await client.grants.CreateInstitution(
                grant_pb2.CreateInstitutionRequest(
                    request_id=uuid.uuid4().hex,
                    institution=grant_pb2.Institution(
                        institution_id=institution_id, display_name="Uni", country_code="no"
                    ),
                ),
                timeout=10,
            )

            os.kill(mesh.pids["postgres"], signal.SIGKILL)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while not await _services_answer(client, institution_id):
                assert loop.time() < deadline, "the services did not work again in 120 s"
                await asyncio.sleep(0.5)
        after = {name: mesh.pids[name] for name in services}
    assert after == services


async def test_restart_kills_leftover_busy_backend(data_dir: Path) -> None:
    async with LocalMesh(_services_mesh(data_dir)) as mesh:
        password_file = mesh.info.database_password_file
        assert password_file is not None
        password = (await asyncio.to_thread(Path(password_file).read_text)).strip()
        connection = await asyncpg.connect(mesh.info.database_url, password=password, timeout=10)
        # A backend busy on the CPU notices the postmaster's death only once its query ends,
        # and until then it keeps the old shared memory, on which no new postmaster starts.
        busy = asyncio.ensure_future(
            connection.fetchval("SELECT count(*) FROM generate_series(1, 10000000000)")
        )
        try:
            await asyncio.sleep(0.5)
            failure = asyncio.ensure_future(mesh.wait_failure())
            killed_pid = mesh.pids["postgres"]

            os.kill(killed_pid, signal.SIGKILL)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while mesh.pids.get("postgres") in (None, killed_pid) or "postgres" in load_mesh(
                data_dir
            ).extra.get("exits", {}):
                assert not failure.done(), failure.result()
                assert loop.time() < deadline, "PostgreSQL did not serve again in 60 s"
                await asyncio.sleep(0.2)
            assert not failure.done()
            failure.cancel()
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
            connection.terminate()
