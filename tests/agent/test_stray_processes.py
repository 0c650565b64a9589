"""Processes that leave a task's process group (daemons, new sessions) end with the task."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agents import stray_processes
from agents.model import TaskSpec, TaskState
from agents.runner import TaskRunner
from agents.stray_processes import find_task_processes
from tests.agent.test_runner import (
    Recorder,
    close_launchers,  # noqa: F401 - the fixture closes the launchers the runners start
    make_runner,
    python_command,
    run_with_group,
    wait_for,
)

# Forks a daemon (fork, setsid, fork) that writes its pid to the file in argv[1], then sleeps.
DAEMON = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if len(sys.argv) > 2:
            signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[2], "w").close(), os._exit(0)))
        with open(sys.argv[1] + ".tmp", "w") as file:
            file.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(30)
    os._exit(0)
"""

# A daemon that starts a new session in a fresh child every 20 ms, 40 times at most.
SPREADING = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    open(sys.argv[1], "w").close()
    for _ in range(40):
        if os.fork() == 0:
            os.setsid()
            time.sleep(30)
            os._exit(0)
        time.sleep(0.02)
    time.sleep(30)
    os._exit(0)
"""

# Forks a child in the task's group and a daemon outside it. Each takes 0.3 s to clean up on
# SIGTERM and then creates the file argv[1] + ".member" or ".daemon". The leader dies at once.
SLOW_CLEANUP = """
import os, signal, sys, time
def clean_up_into(path):
    def handle(*_):
        time.sleep(0.3)
        open(path, "w").close()
        os._exit(0)
    signal.signal(signal.SIGTERM, handle)
    open(path + ".ready", "w").close()
    time.sleep(30)
    os._exit(0)
if os.fork() == 0:
    clean_up_into(sys.argv[1] + ".member")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        clean_up_into(sys.argv[1] + ".daemon")
    os._exit(0)
"""

# Forks a daemon that, 0.2 s after a SIGTERM, forks a child that ignores SIGTERM and writes its
# pid to the file in argv[1], then exits. The daemon writes argv[1] + ".ready" once its handler
# is set.
HANDS_OVER = """
import os, signal, sys, time
def hand_over(*_):
    time.sleep(0.2)
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(sys.argv[1] + ".tmp", "w") as file:
            file.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(30)
    os._exit(0)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, hand_over)
        open(sys.argv[1] + ".ready", "w").close()
        time.sleep(30)
    os._exit(0)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _command(code: str, *args: str, then: str = "time.sleep(30)") -> tuple[str, ...]:
    return (*python_command(f"{code}\nimport time\n{then}\n"), *args)


async def test_stop_kills_daemonized_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    terminated = tmp_path / "daemon.terminated"
    spawn_ids: list[str] = []

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        command = _command(DAEMON, str(pid_file), str(terminated))
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command, grace_period_s=2.0))
        spawn_ids.append(runner._tasks["j/1/0"].record.spawn_id)
        await wait_for(pid_file.exists)
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    assert not _alive(int(pid_file.read_text()))
    assert terminated.exists(), "the daemon got no SIGTERM before the SIGKILL"
    assert find_task_processes(spawn_ids[0]) == []


async def test_stop_grace_covers_group_and_strays(tmp_path: Path) -> None:
    base = tmp_path / "cleaned"
    member = tmp_path / "cleaned.member"
    daemon = tmp_path / "cleaned.daemon"
    spawn_ids: list[str] = []

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        command = _command(SLOW_CLEANUP, str(base))
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command, grace_period_s=10.0))
        spawn_ids.append(runner._tasks["j/1/0"].record.spawn_id)
        await wait_for(lambda: Path(f"{member}.ready").exists())
        await wait_for(lambda: Path(f"{daemon}.ready").exists())
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    # The leader's exit on SIGTERM does not cut the grace period of the task's other processes.
    assert member.exists(), "the group member was killed before it finished its cleanup"
    assert daemon.exists(), "the daemon was killed before it finished its cleanup"
    assert find_task_processes(spawn_ids[0]) == []


async def test_stop_kills_child_of_stopped_daemon(tmp_path: Path) -> None:
    heir_file = tmp_path / "heir.pid"
    spawn_ids: list[str] = []

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        command = _command(HANDS_OVER, str(heir_file))
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command, grace_period_s=1.0))
        spawn_ids.append(runner._tasks["j/1/0"].record.spawn_id)
        await wait_for(lambda: Path(f"{heir_file}.ready").exists())
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    # The heir passed to the launcher when the daemon exited, after the leader's exit.
    assert not _alive(int(heir_file.read_text()))
    assert find_task_processes(spawn_ids[0]) == []


async def test_exit_kills_daemon_left_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        wait_for_daemon = (
            "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
        )
        command = _command(DAEMON, str(pid_file), then=wait_for_daemon)
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    assert not _alive(int(pid_file.read_text()))


async def test_exit_reads_only_launcher_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scan_everything(spawn_id: str, outside_group: int = 0) -> list[int]:
        raise AssertionError("an ended task's strays were searched in all of /proc")

    monkeypatch.setattr(stray_processes, "find_task_processes", scan_everything)
    pid_file = tmp_path / "daemon.pid"

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        wait_for_daemon = (
            "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
        )
        command = _command(DAEMON, str(pid_file), then=wait_for_daemon)
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    assert not _alive(int(pid_file.read_text()))


async def test_stop_kills_spreading_daemon(tmp_path: Path) -> None:
    started = tmp_path / "started"
    spawn_ids: list[str] = []

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        command = _command(SPREADING, str(started))
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command, grace_period_s=0.2))
        spawn_ids.append(runner._tasks["j/1/0"].record.spawn_id)
        await wait_for(started.exists)
        await wait_for(lambda: len(find_task_processes(spawn_ids[0])) > 5)
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))

    await run_with_group(tmp_path, body)
    assert find_task_processes(spawn_ids[0]) == []


def test_no_spawn_id_finds_nothing() -> None:
    assert find_task_processes("") == []
    assert os.getpid() not in find_task_processes("no-such-spawn-id")


async def test_restart_kills_daemon_of_ended_task(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    wait_for_daemon = (
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
    )
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        command = _command(DAEMON, str(pid_file), then=wait_for_daemon)
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command))
        # The agent dies here: its supervisors stop, the task goes on and ends.
        task = runner._tasks["j/1/0"]
        assert task.supervisor is not None
        task.supervisor.cancel()
    assert task.process is not None
    await task.process.wait()
    daemon = int(pid_file.read_text())
    assert _alive(daemon)

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        await wait_for(lambda: second.states("j/1/0") != [])
    assert second.states("j/1/0") == [TaskState.SUCCEEDED]
    assert not _alive(daemon)


def test_kill_waits_for_exiting_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    # The killed parent 100 hides its environment while it exits, and its child 101 passes to
    # the adopter only once the parent is a zombie.
    parent_state = iter([b"R", b"R", b"Z"])
    states: dict[int, bytes] = {}
    killed: list[int] = []

    def children(adopter: int, spawn_id: str, leaders: object) -> list[int]:
        if 100 not in killed:
            return [100]
        if states.get(100) == b"Z" and 101 not in killed:
            return [101]
        return []

    def stat(pid: int) -> tuple[bytes, ...] | None:
        if pid == 100 and 100 in killed:
            states[100] = next(parent_state, b"Z")
            return (states[100], b"1", b"100")
        return None

    def kill(pid: int, signum: int) -> bool:
        killed.append(pid)
        return True

    monkeypatch.setattr(stray_processes, "adopted_processes", children)
    monkeypatch.setattr(stray_processes, "stat_fields", stat)
    monkeypatch.setattr(stray_processes, "_signal", kill)

    assert stray_processes.kill_task_processes("spawn", adopter=1) == 2
    assert killed == [100, 101]
