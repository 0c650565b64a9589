"""One acsp up per data directory, also while the first one is still starting."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from acsp.mesh import LocalMesh
from acsp.mesh.endpoints import MESH_FILE_NAME
from acsp.mesh.servers import NATS_PORT_FILE
from acsp.mesh.supervisor import MeshStartError
from tests.conftest import make_mesh_dir, nats_only_mesh

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir("acsp-lock-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def test_second_mesh_rejected_while_first_starts(data_dir: Path) -> None:
    async with LocalMesh(nats_only_mesh(data_dir)) as first:
        port_file = data_dir / "run" / NATS_PORT_FILE
        port_record = port_file.read_text()
        # As while the first mesh starts: it writes the mesh file only once all serve.
        (data_dir / MESH_FILE_NAME).unlink()
        second = LocalMesh(nats_only_mesh(data_dir))

        with pytest.raises(MeshStartError, match="another mesh") as raised:
            await second.start()

        assert f"pid {first.info.supervisor_pid}" in str(raised.value)
        assert second._servers.nats is None
        assert port_file.read_text() == port_record


async def test_data_dir_free_after_stop(data_dir: Path) -> None:
    async with LocalMesh(nats_only_mesh(data_dir)):
        pass
    async with LocalMesh(nats_only_mesh(data_dir)) as again:
        assert again.info.nats_url
