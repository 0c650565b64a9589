"""acsp down, acsp up and acsp status against the processes that a mesh file names, without any
server."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from acsp.cli import _common, main
from acsp.mesh._ports import free_port
from acsp.mesh.credentials import prepare
from acsp.mesh.endpoints import MESH_FILE_NAME, MeshInfo
from acsp.mesh.status import claim_data_dir
from acsp.mesh.supervisor import MeshStartError

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


def write_status_mesh_file(data_dir: Path, pid: int) -> None:
    """Write a mesh file whose supervisor and fleet are ``pid``, with credentials that acsp
    status can read and a grant service that nothing serves."""
    credentials = prepare(data_dir, services=[])
    MeshInfo(
        data_dir=data_dir.resolve(),
        endpoints={"grant": f"127.0.0.1:{free_port()}"},
        ca_cert=credentials.client_identity.ca,
        token_key=credentials.token_private_key,
        database_url="postgresql://127.0.0.1:1/unused",
        nats_url="nats://127.0.0.1:1",
        supervisor_pid=pid,
        extra={"pids": {"fleet": pid}},
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

    claim_data_dir(tmp_path).release()

    assert not mesh_file.exists()
    assert sleeper.poll() is None


def test_up_rejects_dir_of_running_mesh(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    write_mesh_file(tmp_path, sleeper.pid)

    with pytest.raises(MeshStartError, match=f"supervisor pid {sleeper.pid}"):
        claim_data_dir(tmp_path)

    assert (tmp_path / MESH_FILE_NAME).exists()


def test_status_skips_reused_pids(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # The mesh stopped without removing its mesh file, and its supervisor's and fleet's pids
    # now belong to a process that started an hour after the file was written.
    write_status_mesh_file(tmp_path, sleeper.pid)
    mesh_file = tmp_path / MESH_FILE_NAME
    an_hour_ago = mesh_file.stat().st_mtime - 3600
    os.utime(mesh_file, (an_hour_ago, an_hour_ago))

    code = main.main(["status", "--data-dir", str(tmp_path), "--format", "csv", "--timeout", "2"])

    captured = capsys.readouterr()
    fleet_line = next(line for line in captured.out.splitlines() if line.startswith("fleet,"))
    assert fleet_line.split(",")[2] == "STOPPED"
    assert f"supervisor (pid {sleeper.pid})" in captured.err
    assert "is not running" in captured.err
    assert code == _common.EXIT_NO_MESH
    assert sleeper.poll() is None


def test_status_reports_running_pids(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # A mesh file written after its processes started names a running mesh.
    write_status_mesh_file(tmp_path, sleeper.pid)

    code = main.main(["status", "--data-dir", str(tmp_path), "--format", "csv", "--timeout", "2"])

    captured = capsys.readouterr()
    fleet_line = next(line for line in captured.out.splitlines() if line.startswith("fleet,"))
    assert fleet_line.split(",")[2] == "RUNNING"
    assert "is not running" not in captured.err
    # The grant service is unreachable while the fleet runs.
    assert code == _common.EXIT_FAILURE


DAMAGED_MESH_FILES = {
    "empty": "",
    "list": "[]",
    "string": '"mesh"',
    "truncated": '{"format_version": 1, "endpoints": {',
    "missing field": '{"format_version": 1}',
    "wrong type": '{"format_version": 1, "endpoints": 5, "ca_cert": "a", "token_key": "b", '
    '"database_url": "c", "nats_url": "d", "supervisor_pid": "x"}',
}


@pytest.mark.parametrize("content", DAMAGED_MESH_FILES.values(), ids=DAMAGED_MESH_FILES.keys())
@pytest.mark.parametrize("command", [["status"], ["jobs", "list"], ["down", "--timeout", "2"]])
def test_damaged_mesh_file_exits_3_naming_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, command: list[str]
) -> None:
    mesh_file = tmp_path / MESH_FILE_NAME
    mesh_file.write_text(content)

    code = main.main([*command, "--data-dir", str(tmp_path)])

    error = capsys.readouterr().err
    assert code == _common.EXIT_NO_MESH
    assert error.startswith(f"error: {mesh_file.resolve()} is damaged")
    assert "acsp down --force" in error
    assert "Traceback" not in error
    assert mesh_file.read_text() == content


@pytest.mark.parametrize("content", ["", "[]"])
def test_down_force_removes_damaged_mesh_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    mesh_file = tmp_path / MESH_FILE_NAME
    mesh_file.write_text(content)

    code = main.main(["down", "--force", "--data-dir", str(tmp_path)])

    assert code == _common.EXIT_OK
    assert not mesh_file.exists()
    assert "removed the damaged mesh file" in capsys.readouterr().err


def test_down_force_stops_readable_mesh(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    write_mesh_file(tmp_path, sleeper.pid)

    code = main.main(["down", "--force", "--data-dir", str(tmp_path), "--timeout", "10"])

    assert code == _common.EXIT_OK
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert "mesh stopped" in capsys.readouterr().err


def test_up_uncreatable_data_dir_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("kept")

    for data_dir in (not_a_folder, not_a_folder / "sub", Path("/proc/acsp-nope")):
        code = main.main(["up", "--agents", "0", "--data-dir", str(data_dir)])

        error = capsys.readouterr().err
        assert code == _common.EXIT_USAGE, data_dir
        assert error.startswith(f"error: --data-dir {data_dir}: cannot create the folder")
        assert "name a folder you can write" in error
    assert not_a_folder.read_text() == "kept"
