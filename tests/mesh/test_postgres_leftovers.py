"""A mesh starts on a cluster whose PostgreSQL processes outlived a killed supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from acsp.mesh import LocalMesh, MeshConfig
from acsp.mesh.endpoints import MESH_FILE_NAME
from acsp.mesh.postgres import cluster_dir_for
from tests.conftest import make_mesh_dir

pytestmark = pytest.mark.timeout(180)

START_TIMEOUT_S = float(os.environ.get("ACSP_TEST_MESH_START_TIMEOUT_S", "90"))
BUSY_QUERY = "SELECT count(*) FROM generate_series(1, 10000000000)"

SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from acsp.mesh import LocalMesh, MeshConfig

async def main():
    config = MeshConfig(
        data_dir=Path(sys.argv[1]), agents=0, processes=(), database_url=None, nats_url=None,
        start_timeout_s=float(sys.argv[2]),
    )
    async with LocalMesh(config):
        print("up", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir("acsp-leftovers-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _servers_mesh(data_dir: Path) -> MeshConfig:
    """Return a mesh of the embedded PostgreSQL and NATS alone."""
    return MeshConfig(
        data_dir=data_dir,
        agents=0,
        processes=(),
        database_url=None,
        nats_url=None,
        start_timeout_s=START_TIMEOUT_S,
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
async def busy_backend(data_dir: Path) -> AsyncIterator[tuple[int, int]]:
    """Yield the pids of a postmaster and its busy backend whose supervisor was SIGKILLed.

    The mesh runs in another process, and the backend runs a CPU-bound query for this test.
    """
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUPERVISOR,
        str(data_dir),
        str(START_TIMEOUT_S),
        stdout=asyncio.subprocess.PIPE,
    )
    assert supervisor.stdout is not None
    try:
        line = await asyncio.wait_for(supervisor.stdout.readline(), START_TIMEOUT_S)
    except BaseException:
        supervisor.kill()
        await supervisor.wait()
        raise
    assert line == b"up\n"
    info = json.loads(await asyncio.to_thread((data_dir / MESH_FILE_NAME).read_text))
    password_file = Path(info["database_password_file"])
    password = (await asyncio.to_thread(password_file.read_text)).strip()
    postmaster = int(info["pids"]["postgres"])
    connection = await asyncpg.connect(info["database_url"], password=password, timeout=10)
    backend = connection.get_server_pid()
    busy = asyncio.ensure_future(connection.fetchval(BUSY_QUERY))
    try:
        await asyncio.sleep(0.5)
        supervisor.kill()
        await supervisor.wait()
        yield postmaster, backend
    finally:
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        connection.terminate()
        for pid in (postmaster, backend):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_start_stops_orphaned_postmaster(
    data_dir: Path, busy_backend: tuple[int, int]
) -> None:
    # The postmaster got SIGTERM, a smart shutdown, and waits for the busy backend.
    postmaster, backend = busy_backend
    assert _alive(postmaster)
    assert _alive(backend)

    async with LocalMesh(_servers_mesh(data_dir)) as mesh:
        assert mesh.pids["postgres"] != postmaster
        assert not _alive(postmaster)
        assert not _alive(backend)


async def test_start_kills_backends_of_dead_postmaster(
    data_dir: Path, busy_backend: tuple[int, int]
) -> None:
    postmaster, backend = busy_backend
    os.kill(postmaster, signal.SIGKILL)
    # Another process in the cluster's folder, not of the PostgreSQL binary, is left alone.
    bystander = await asyncio.create_subprocess_exec("sleep", "120", cwd=cluster_dir_for(data_dir))
    try:
        assert _alive(backend)

        async with LocalMesh(_servers_mesh(data_dir)) as mesh:
            assert mesh.pids["postgres"] != postmaster
            assert not _alive(backend)
            assert bystander.returncode is None
            assert _alive(bystander.pid)
    finally:
        bystander.kill()
        await bystander.wait()
