"""Fixtures shared by every test folder: a running local mesh.

``mesh`` starts one local mesh for the whole session in the embedded configuration (its own
PostgreSQL and NATS on free loopback ports), with the real grant, scheduler and metering
services and a simulated fleet of two nodes. A start costs seconds on a small machine, so tests
share it and must leave it usable: create your own institutions, projects and jobs with unique
names instead of relying on an empty database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from acsp.client import AsyncClient, Client
from acsp.mesh import LocalMesh, MeshConfig, MeshInfo

MESH_AGENTS = 2


@dataclass(frozen=True)
class RunningMesh:
    """A started local mesh as tests see it."""

    info: MeshInfo
    """Endpoints, credential paths and the servers' URLs."""
    supervisor: LocalMesh
    """The in-process supervisor, for tests of the supervisor itself."""

    def token(
        self,
        role: str = "program_office",
        subject: str = "test-admin",
        *,
        institution: str | None = None,
        provider: str | None = None,
    ) -> str:
        """Mint a bearer token signed by the mesh's key."""
        return self.supervisor.token(role, subject, institution=institution, provider=provider)

    def client(self, token: str | None = None, timeout_s: float = 10.0) -> Client:
        """Open a blocking client; close it with ``with``."""
        return Client.from_mesh(self.info, token=token, timeout_s=timeout_s)

    def async_client(self, token: str | None = None, timeout_s: float = 10.0) -> AsyncClient:
        """Open an asyncio client; close it with ``async with``."""
        return AsyncClient.from_mesh(self.info, token=token, timeout_s=timeout_s)


def make_mesh_dir(prefix: str = "acsp-mesh-") -> Path:
    """Create a data directory that PostgreSQL's unprivileged user can reach when run as root."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    data_dir.chmod(0o755)
    return data_dir


def nats_only_mesh(data_dir: Path, restart_delay_s: float = 0.5) -> MeshConfig:
    """Return a mesh of the embedded NATS alone: no services, fleet or PostgreSQL."""
    return MeshConfig(
        data_dir=data_dir,
        agents=0,
        processes=(),
        database_url="postgresql://127.0.0.1:1/unused",
        nats_url=None,
        restart_delay_s=restart_delay_s,
        start_timeout_s=60,
    )


@pytest.fixture(scope="session")
def mesh_data_dir() -> Iterator[Path]:
    data_dir = make_mesh_dir()
    yield data_dir
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh(mesh_data_dir: Path) -> AsyncIterator[RunningMesh]:
    """One embedded local mesh for the whole test session."""
    config = MeshConfig(
        data_dir=mesh_data_dir,
        agents=MESH_AGENTS,
        # ACSP_DATABASE_URL or ACSP_NATS_URL set for other tests must not redirect this mesh.
        database_url=None,
        nats_url=None,
        start_timeout_s=float(os.environ.get("ACSP_TEST_MESH_START_TIMEOUT_S", "90")),
    )
    async with LocalMesh(config) as supervisor:
        yield RunningMesh(supervisor.info, supervisor)
