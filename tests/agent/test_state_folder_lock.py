"""One agent process per state folder: a second one exits at once and changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from acsp import subjects
from acsp.cli.main import main as acsp_main
from agents.backends.simulated import SimulatedBackend
from agents.dead_letters import DEAD_LETTERS_FILE_NAME
from agents.state import StateStore
from agents.state_lock import (
    LOCK_FILE_NAME,
    PID_FILE_NAME,
    StateFolderLock,
    StateFolderLockedError,
    write_pid_file,
)
from services.runtime.errors import StartupError
from tests.agent.helpers import NODE
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.subprocess_agent import (
    REPOSITORY,
    SLEEPER,
    SPEC,
    TASK_ID,
    poll,
    recorded_task,
    start_command,
)

SECOND_AGENT_EXIT_S = 15.0
"""Seconds a second agent may take to exit: the interpreter's start, mostly."""


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


def _agent_argv(state_dir: Path, *command: str) -> list[str]:
    fleet = state_dir.parent / "fleet.csv"
    fleet.write_text(f"node,model,accelerators\n{SPEC.node},{SPEC.model},{SPEC.accelerators}\n")
    return [
        sys.executable,
        *command,
        *("--backend", "simulated", "--fleet", f"{fleet}:{NODE.provider}:{NODE.region}"),
        *("--faults", "none", "--utilization", "none", "--state-dir", str(state_dir)),
    ]


def _agent_env(url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
    env.update(ACSP_NATS_URL=url, ACSP_AGENT_STOP_TASKS_ON_EXIT="true", ACSP_LOG_LEVEL="INFO")
    return env


async def _start_agent(url: str, state_dir: Path, log_name: str) -> asyncio.subprocess.Process:
    """Start ``python -m agents`` on ``state_dir``; its output goes to ``log_name`` beside it."""
    log = os.open(state_dir.parent / log_name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return await asyncio.create_subprocess_exec(
            *_agent_argv(state_dir, "-m", "agents"),
            env=_agent_env(url),
            stdout=log,
            stderr=log,
            cwd=REPOSITORY,
        )
    finally:
        os.close(log)


def _pid_file_text(state_dir: Path) -> str | None:
    try:
        return (state_dir / PID_FILE_NAME).read_text().strip()
    except FileNotFoundError:
        return None


async def _wait_serving(agent: asyncio.subprocess.Process, state_dir: Path) -> None:
    await poll(lambda: _pid_file_text(state_dir) == str(agent.pid), 30, "the agent to start")


async def _start_task(url: str) -> None:
    accelerator = SimulatedBackend(SPEC).discover().accelerators[0].uuid
    client = await nats.connect(url)
    try:
        subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
        await client.jetstream().publish(subject, start_command(TASK_ID, accelerator, SLEEPER))
    finally:
        await client.close()


async def _stop(agent: asyncio.subprocess.Process) -> None:
    if agent.returncode is None:
        agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(agent.wait(), 20)
        except TimeoutError:
            agent.kill()
            await agent.wait()


def _kill_task(state_dir: Path) -> None:
    with contextlib.suppress(ValueError, OSError):
        record = recorded_task(state_dir)
        if record is not None and record.pid:
            os.killpg(record.pid, signal.SIGKILL)


async def _run_second(url: str, state_dir: Path, *command: str) -> tuple[int, str]:
    """Run a second agent on ``state_dir`` to its end; return its status and its output."""
    second = await asyncio.create_subprocess_exec(
        *_agent_argv(state_dir, *command),
        env=_agent_env(url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPOSITORY,
    )
    try:
        output, _ = await asyncio.wait_for(second.communicate(), SECOND_AGENT_EXIT_S)
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert second.returncode is not None
    return second.returncode, output.decode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "command", [("-m", "agents"), ("-m", "acsp.cli.main", "agent", "run")], ids=["agents", "acsp"]
)
async def test_second_agent_exits_at_once(
    tmp_path: Path, nats_server: NatsServer, command: tuple[str, ...]
) -> None:
    state_dir = tmp_path / "agent"
    first = await _start_agent(nats_server.url, state_dir, "first.log")
    try:
        await _wait_serving(first, state_dir)
        await _start_task(nats_server.url)
        await poll(lambda: recorded_task(state_dir) is not None, 30, "the task to start")

        status, output = await _run_second(nats_server.url, state_dir, *command)

        assert status == 2
        assert f"state folder {state_dir}: in use by the agent (pid {first.pid})" in output
        assert "--state-dir" in output
        assert "Traceback" not in output
        # The error is all it wrote: it opened neither the spool nor the state.
        assert len(output.strip().splitlines()) == 1
        assert first.returncode is None
        assert _pid_file_text(state_dir) == str(first.pid)
        assert list((state_dir / "spool").glob("*.corrupt*")) == []
    finally:
        await _stop(first)
        _kill_task(state_dir)
    assert first.returncode == 0
    assert _pid_file_text(state_dir) is None


@pytest.mark.timeout(120)
async def test_killed_agent_leaves_no_lock(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    first = await _start_agent(nats_server.url, state_dir, "first.log")
    second = None
    try:
        await _wait_serving(first, state_dir)
        await _start_task(nats_server.url)
        await poll(lambda: recorded_task(state_dir) is not None, 30, "the task to start")
        # The task and the task launcher outlive the agent, and must not hold its lock.
        first.kill()
        await first.wait()

        second = await _start_agent(nats_server.url, state_dir, "second.log")
        await _wait_serving(second, state_dir)

        assert second.returncode is None
        record = recorded_task(state_dir)
        assert record is not None
        assert record.pid != 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
        if second is not None:
            await _stop(second)
        _kill_task(state_dir)
    assert second.returncode == 0


@pytest.mark.timeout(60)
async def test_agent_keeps_pid_file_of_another(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    agent = await _start_agent(nats_server.url, state_dir, "agent.log")
    try:
        await _wait_serving(agent, state_dir)
        (state_dir / PID_FILE_NAME).write_text(f"{os.getpid()}\n")
    finally:
        await _stop(agent)
    assert agent.returncode == 0
    assert _pid_file_text(state_dir) == str(os.getpid())


@pytest.mark.timeout(120)
async def test_commands_fail_while_agent_runs(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "agent"
    agent = await _start_agent(nats_server.url, state_dir, "agent.log")
    try:
        await _wait_serving(agent, state_dir)
        await poll(lambda: (state_dir / "state.json").exists(), 30, "the state file")
        before = (state_dir / "state.json").read_bytes()
        capsys.readouterr()

        clear = ["agent", "clear-health", "GPU-x", "--state-dir", str(state_dir)]
        assert await asyncio.to_thread(acsp_main, clear) == 1
        error = capsys.readouterr().err
        assert f"in use by the agent (pid {agent.pid})" in error
        assert "stop the agent first" in error
        assert (state_dir / "state.json").read_bytes() == before

        spool = ["agent", "spool", "--state-dir", str(state_dir)]
        assert await asyncio.to_thread(acsp_main, spool) == 1
        error = capsys.readouterr().err
        assert f"in use by the agent (pid {agent.pid})" in error
        assert "stats.json" in error
    finally:
        await _stop(agent)
    assert agent.returncode == 0
    spool = ["agent", "spool", "--state-dir", str(state_dir), "--format", "csv"]
    assert await asyncio.to_thread(acsp_main, spool) == 0
    assert capsys.readouterr().out.startswith("pending_messages,pending_bytes")


def test_lock_names_holder(tmp_path: Path) -> None:
    lock = StateFolderLock.acquire(tmp_path, "acsp agent clear-health")
    try:
        with pytest.raises(StateFolderLockedError) as raised:
            StateFolderLock.acquire(tmp_path)
        assert raised.value.pid == os.getpid()
        assert raised.value.label == "acsp agent clear-health"
        assert raised.value.directory == tmp_path
        assert str(raised.value).startswith(f"state folder {tmp_path}: in use by acsp agent")
    finally:
        lock.release()
    assert not lock.held
    StateFolderLock.acquire(tmp_path).release()


def test_lock_without_holder_record(tmp_path: Path) -> None:
    lock = StateFolderLock.acquire(tmp_path)
    try:
        # As if read between another holder's lock and its record.
        (tmp_path / LOCK_FILE_NAME).write_bytes(b"")
        with pytest.raises(
            StateFolderLockedError, match=r"in use by another process \(pid unknown\)"
        ):
            StateFolderLock.acquire(tmp_path)
    finally:
        lock.release()


def test_clear_health_ignores_stale_pid_file(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.json")
    state.set_health(NODE.key, {"GPU-a": ["xid:79"]})
    # A pid file left by a killed agent, naming a pid that a live process has now.
    (tmp_path / PID_FILE_NAME).write_text(f"{os.getpid()}\n")
    assert acsp_main(["agent", "clear-health", "GPU-a", "--state-dir", str(tmp_path)]) == 0
    assert StateStore(tmp_path / "state.json").node(NODE.key).health == {}


def test_lock_rejects_symlink(tmp_path: Path) -> None:
    # The owner of a folder that root locks (sudo acsp agent ...) may plant a link to a
    # file of root's, which the lock would truncate and hand to that owner.
    target = tmp_path / "target"
    target.write_text("root's data\n")
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / LOCK_FILE_NAME).symlink_to(target)
    with pytest.raises(StartupError, match="is a symbolic link") as raised:
        StateFolderLock.acquire(folder)
    assert "remove it" in str(raised.value)
    assert target.read_text() == "root's data\n"


def test_lock_rejects_hard_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("root's data\n")
    folder = tmp_path / "state"
    folder.mkdir()
    os.link(target, folder / LOCK_FILE_NAME)
    with pytest.raises(StartupError, match="has other names"):
        StateFolderLock.acquire(folder)
    assert target.read_text() == "root's data\n"


def test_pid_file_replaces_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("root's data\n")
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / PID_FILE_NAME).symlink_to(target)
    path = write_pid_file(folder)
    assert target.read_text() == "root's data\n"
    assert not path.is_symlink()
    assert path.read_text() == f"{os.getpid()}\n"


def _modes(folder: Path) -> dict[str, int]:
    """Return the mode of each file and folder under ``folder`` but its task folders."""
    skipped = ("tasks", "hosts")
    return {
        str(path.relative_to(folder)): stat.S_IMODE(path.lstat().st_mode)
        for path in folder.rglob("*")
        if path.relative_to(folder).parts[0] not in skipped
    }


@pytest.mark.timeout(120)
async def test_agent_files_hidden_from_others(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    # Left by an earlier version, which created its files with the modes that the umask left.
    (state_dir / "spool").mkdir(parents=True)
    (state_dir / "spool").chmod(0o755)
    (state_dir / DEAD_LETTERS_FILE_NAME).write_bytes(b"")
    (state_dir / DEAD_LETTERS_FILE_NAME).chmod(0o644)
    agent = await _start_agent(nats_server.url, state_dir, "agent.log")
    try:
        await _wait_serving(agent, state_dir)
        await _start_task(nats_server.url)
        await poll(lambda: recorded_task(state_dir) is not None, 30, "the task to start")
        modes = _modes(state_dir)
    finally:
        await _stop(agent)
        _kill_task(state_dir)

    for name in ("state.json", PID_FILE_NAME, LOCK_FILE_NAME, DEAD_LETTERS_FILE_NAME):
        assert modes.pop(name) == 0o600, name
    assert modes.pop("spool") == 0o700
    assert any(name.endswith(".seg") for name in modes)
    for name, mode in modes.items():
        assert mode == 0o600, name
