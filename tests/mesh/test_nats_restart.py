"""The embedded NATS: restarted on its port with its JetStream store, and the same port again."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from acsp.mesh import LocalMesh, MeshInfo
from tests.conftest import make_mesh_dir, nats_only_mesh

pytestmark = pytest.mark.timeout(120)

STREAM = "RESTART_CHECK"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir("acsp-nats-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def _connect(info: MeshInfo) -> nats.NATS:
    assert info.nats_user is not None
    assert info.nats_password_file is not None
    return await nats.connect(
        info.nats_url,
        user=info.nats_user,
        password=info.nats_password_file.read_text().strip(),
        connect_timeout=2,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
    )


async def _stream_subjects(client: nats.NATS) -> list[str] | None:
    try:
        info = await client.jetstream(timeout=2).stream_info(STREAM)
    except NotFoundError:
        return None
    return list(info.config.subjects or [])


async def test_killed_nats_restarts_on_same_port(data_dir: Path) -> None:
    async with LocalMesh(nats_only_mesh(data_dir, restart_delay_s=0.1)) as mesh:
        client = await _connect(mesh.info)
        try:
            await client.jetstream(timeout=5).add_stream(name=STREAM, subjects=["restart.>"])
            killed_pid = mesh.pids["nats-server"]

            os.kill(killed_pid, signal.SIGKILL)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            subjects = None
            while subjects is None:
                assert loop.time() < deadline, "NATS did not serve the stream again in 30 s"
                await asyncio.sleep(0.1)
                try:
                    subjects = await _stream_subjects(client)
                except (nats.errors.Error, TimeoutError):
                    continue
            assert subjects == ["restart.>"]
            assert mesh.pids["nats-server"] != killed_pid
            restarted_pid = mesh.pids["nats-server"]
            written = (data_dir / "mesh.json").read_text()
            assert f'"nats-server": {restarted_pid}' in written
        finally:
            await client.close()
        failure = asyncio.ensure_future(mesh.wait_failure())
        await asyncio.sleep(0.2)
        assert not failure.done()
        failure.cancel()


async def test_mesh_started_again_keeps_nats_port(data_dir: Path) -> None:
    async with LocalMesh(nats_only_mesh(data_dir, restart_delay_s=0.1)) as mesh:
        first_url = mesh.info.nats_url

    async with LocalMesh(nats_only_mesh(data_dir, restart_delay_s=0.1)) as mesh:
        assert mesh.info.nats_url == first_url
