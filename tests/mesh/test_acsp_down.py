"""acsp down and acsp up against the process that a mesh file names, without any server."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from acsp.cli import main
from acsp.mesh.endpoints import MESH_FILE_NAME, MeshInfo
from acsp.mesh.supervisor import LocalMesh, MeshConfig, MeshStartError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def write_mesh_file(data_dir: Path, supervisor_pid: int) -> None:
    MeshInfo(
        data_dir=data_dir,
        endpoints={"grant": "127.0.0.1:1"},
        ca_cert=data_dir / "ca.pem",
        token_key=data_dir / "token" / "signing.key",
        database_url="postgresql://127.0.0.1:1/unused",
        nats_url="nats://127.0.0.1:1",
        supervisor_pid=supervisor_pid,
    ).write()


def test_down_not_permitted_is_error(
    tmp_path: Path,
    sleeper: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The supervisor of a mesh that another user started: kill(2) fails with EPERM.
    real_kill = os.kill

    def kill(pid: int, signum: int) -> None:
        if signum == signal.SIGTERM:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", kill)
    write_mesh_file(tmp_path, sleeper.pid)

    code = main.main(["down", "--data-dir", str(tmp_path)])

    error = capsys.readouterr().err
    assert code == 1
    assert f"pid {sleeper.pid}" in error
    assert "not permitted" in error
    assert "user that ran acsp up" in error
    assert sleeper.poll() is None


def test_up_claims_dir_of_reused_pid(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    # The supervisor that wrote the mesh file died, and its pid now belongs to a process that
    # started an hour after the file was written. acsp down leaves that process alone as no
    # mesh, so acsp up must not take it for a running mesh either.
    write_mesh_file(tmp_path, sleeper.pid)
    mesh_file = tmp_path / MESH_FILE_NAME
    an_hour_ago = mesh_file.stat().st_mtime - 3600
    os.utime(mesh_file, (an_hour_ago, an_hour_ago))

    LocalMesh(MeshConfig(data_dir=tmp_path))._claim_data_dir()

    assert not mesh_file.exists()
    assert sleeper.poll() is None


def test_up_rejects_dir_of_running_mesh(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    write_mesh_file(tmp_path, sleeper.pid)

    with pytest.raises(MeshStartError, match=f"supervisor pid {sleeper.pid}"):
        LocalMesh(MeshConfig(data_dir=tmp_path))._claim_data_dir()

    assert (tmp_path / MESH_FILE_NAME).exists()
