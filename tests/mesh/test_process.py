"""Child processes of the mesh: two-phase stop, exit descriptions and log tails."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from acsp.cli.mesh import _print_banner
from acsp.mesh._process import ChildProcess
from acsp.mesh.endpoints import MeshInfo
from acsp.mesh.postgres import cluster_dir_for

IGNORES_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


def _contains(log_path: Path, text: str) -> bool:
    return log_path.exists() and text in log_path.read_text()


async def _wait_for_output(log_path: Path, text: str, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not _contains(log_path, text):
        assert loop.time() < deadline, f"{text!r} never appeared in {log_path}"
        await asyncio.sleep(0.05)


async def test_stop_kills_child_that_ignores_sigterm(tmp_path: Path):
    child = ChildProcess(
        "stubborn", [sys.executable, "-c", IGNORES_SIGTERM], log_path=tmp_path / "stubborn.log"
    )
    await child.start()
    await _wait_for_output(child.log_path, "ready")
    loop = asyncio.get_running_loop()
    started = loop.time()
    returncode = await child.stop(grace_s=0.5)
    assert returncode == -signal.SIGKILL
    assert loop.time() - started >= 0.5
    assert "killed by SIGKILL" in child.describe_exit()


EXITS_ON_SIGINT = """
import signal, sys, time
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(600)
"""


async def test_stop_uses_configured_signal(tmp_path: Path):
    child = ChildProcess(
        "sleeper",
        [sys.executable, "-c", EXITS_ON_SIGINT],
        log_path=tmp_path / "sleeper.log",
        stop_signal=signal.SIGINT,
    )
    await child.start()
    await _wait_for_output(child.log_path, "ready")
    returncode = await child.stop(grace_s=10)
    assert returncode == 0
    assert "got SIGINT" in child.tail()


async def test_exit_status_and_tail_describe_failure(tmp_path: Path):
    script = "import sys; print('\\n'.join(f'line {i}' for i in range(50))); sys.exit(4)"
    child = ChildProcess("counter", [sys.executable, "-c", script], log_path=tmp_path / "c.log")
    await child.start()
    assert await asyncio.wait_for(child.wait(), 30) == 4
    assert child.describe_exit().startswith(f"counter (pid {child.pid}) exited with status 4")
    tail = child.tail(lines=3).splitlines()
    assert tail == ["line 47", "line 48", "line 49"]


def test_tail_skips_exception_group_frames(tmp_path: Path):
    log_path = tmp_path / "service.log"
    log_path.write_text(
        "  | ValueError: bad setting\n    +------------------------------------\n  |\n"
    )
    child = ChildProcess("service", ["unused"], log_path=log_path)
    assert child.tail() == "  | ValueError: bad setting"


def test_tail_of_missing_log_is_empty(tmp_path: Path):
    child = ChildProcess("never", ["unused"], log_path=tmp_path / "none.log")
    assert child.tail() == ""


def test_cluster_lives_in_reachable_data_dir():
    data_dir = Path(tempfile.mkdtemp(prefix="acsp-reachable-"))
    try:
        data_dir.chmod(0o755)
        assert cluster_dir_for(data_dir) == data_dir.resolve() / "postgres"
    finally:
        data_dir.rmdir()


def test_cluster_of_private_data_dir_as_root_moves_to_tmp():
    data_dir = Path(tempfile.mkdtemp(prefix="acsp-private-"))
    try:
        data_dir.chmod(0o700)
        cluster = cluster_dir_for(data_dir)
    finally:
        data_dir.rmdir()
    if os.geteuid() != 0:
        assert cluster == data_dir.resolve() / "postgres"
        return
    assert cluster.parent == Path(tempfile.gettempdir())
    assert cluster.name.startswith("acsp-postgres-")


def test_banner_shows_cluster_outside_data_dir(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root keeps the cluster outside a private data dir")
    data_dir = Path(tempfile.mkdtemp(prefix="acsp-private-"))
    data_dir.chmod(0o700)
    cluster = cluster_dir_for(data_dir)
    try:
        cluster.mkdir()
        info = MeshInfo(
            data_dir=data_dir.resolve(),
            endpoints={"grant": "127.0.0.1:1"},
            ca_cert=data_dir / "ca.pem",
            token_key=data_dir / "token.key",
            database_url="postgresql://127.0.0.1:2/acsp",
            nats_url="nats://127.0.0.1:3",
            supervisor_pid=1,
        )
        _print_banner(info)
    finally:
        if cluster.exists():
            cluster.rmdir()
        data_dir.rmdir()

    assert f"its files: {cluster} (outside the data dir)" in capsys.readouterr().out
