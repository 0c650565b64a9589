"""acsp down finds the supervisor through the data directory's lock, whatever mesh.json holds.

Each test runs a real supervisor (the code of acsp up, with the embedded NATS alone) in a
process of its own, on free ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acsp.cli import _common, main
from acsp.mesh.data_dir_lock import LOCK_FILE_NAME, DataDirLock
from acsp.mesh.endpoints import MESH_FILE_NAME
from tests.conftest import make_mesh_dir

pytestmark = pytest.mark.timeout(120)

START_TIMEOUT_S = 60.0

SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from acsp.cli.mesh import _serve
from tests.conftest import nats_only_mesh

sys.exit(asyncio.run(_serve(nats_only_mesh(Path(sys.argv[1])))))
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir("acsp-down-lock-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def supervisor(data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a supervisor on ``data_dir`` and wait until its mesh file names it."""
    log = (data_dir / "supervisor.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(data_dir)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _poll(
            lambda: (data_dir / MESH_FILE_NAME).exists() or process.poll() is not None,
            START_TIMEOUT_S,
            "the supervisor to write its mesh file",
        )
        assert process.poll() is None, (data_dir / "supervisor.out").read_text()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _poll(condition: Callable[[], bool], timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{description} took over {timeout_s:g} s"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _nats_pid(data_dir: Path) -> int:
    text = (data_dir / MESH_FILE_NAME).read_text()
    return int(json.loads(text)["pids"]["nats-server"])


@pytest.mark.parametrize("content", ["", "[]", '{"format_version": 1}'])
def test_down_stops_mesh_with_damaged_file(
    data_dir: Path,
    supervisor: subprocess.Popen[bytes],
    capsys: pytest.CaptureFixture[str],
    content: str,
) -> None:
    nats_pid = _nats_pid(data_dir)
    (data_dir / MESH_FILE_NAME).write_text(content)

    code = main.main(["down", "--data-dir", str(data_dir), "--timeout", "30"])

    error = capsys.readouterr().err
    assert code == _common.EXIT_OK, error
    assert f"pid {supervisor.pid}" in error
    assert "mesh stopped" in error
    assert supervisor.wait(timeout=10) == 0
    assert not _alive(nats_pid)
    # The lock is free, so a new mesh can start in the directory.
    DataDirLock.acquire(data_dir).release()


def test_down_stops_mesh_without_file(
    data_dir: Path, supervisor: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    # As while the mesh starts: the supervisor writes its mesh file once every service serves.
    (data_dir / MESH_FILE_NAME).unlink()

    code = main.main(["down", "--data-dir", str(data_dir), "--timeout", "30"])

    error = capsys.readouterr().err
    assert code == _common.EXIT_OK, error
    assert supervisor.wait(timeout=10) == 0


def test_down_force_stops_mesh_and_removes_damaged_file(
    data_dir: Path, supervisor: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    mesh_file = data_dir / MESH_FILE_NAME
    mesh_file.write_text("")

    code = main.main(["down", "--force", "--data-dir", str(data_dir), "--timeout", "30"])

    error = capsys.readouterr().err
    assert code == _common.EXIT_OK, error
    assert supervisor.wait(timeout=10) == 0
    assert not mesh_file.exists()

    code = main.main(["down", "--data-dir", str(data_dir)])

    error = capsys.readouterr().err
    assert code == _common.EXIT_NO_MESH
    assert "no mesh runs" in error


def test_damaged_file_error_names_working_fix(
    data_dir: Path, supervisor: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    (data_dir / MESH_FILE_NAME).write_text("")

    code = main.main(["status", "--data-dir", str(data_dir)])

    error = capsys.readouterr().err
    assert code == _common.EXIT_NO_MESH
    assert f"acsp down --force --data-dir {data_dir}" in error
    # The suggested command works while the mesh runs.
    code = main.main(["down", "--force", "--data-dir", str(data_dir), "--timeout", "30"])
    assert code == _common.EXIT_OK
    assert supervisor.wait(timeout=10) == 0


HOLDER = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_down_spares_process_reusing_lock_pid(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lock is held, but the pid recorded in it belongs to a process that started an hour
    # after the holder wrote it: another program took the pid of the process that locked it.
    sleeper = subprocess.Popen(["sleep", "60"])
    lock_file = data_dir / LOCK_FILE_NAME
    lock_file.write_text(f"{sleeper.pid}\n")
    an_hour_ago = time.time() - 3600
    os.utime(lock_file, (an_hour_ago, an_hour_ago))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_file)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"

        code = main.main(["down", "--data-dir", str(data_dir), "--timeout", "2"])

        error = capsys.readouterr().err
        assert code == _common.EXIT_NO_MESH, error
        assert sleeper.poll() is None
        assert holder.poll() is None
    finally:
        for process in (sleeper, holder):
            process.send_signal(signal.SIGKILL)
            process.wait()


def test_up_refusal_suggests_down(
    data_dir: Path, supervisor: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    (data_dir / MESH_FILE_NAME).write_text("")

    code = main.main(["up", "--agents", "0", "--data-dir", str(data_dir)])

    error = capsys.readouterr().err
    assert code == _common.EXIT_FAILURE
    assert f"acsp down --data-dir {data_dir}" in error
    assert "once it is up" not in error
    code = main.main(["down", "--data-dir", str(data_dir), "--timeout", "30"])
    assert code == _common.EXIT_OK
    assert supervisor.wait(timeout=10) == 0
