"""The task launcher: batches of starts, stops while a start is under way, and its loss."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.model import TaskSpec, TaskState
from agents.runner import TaskRunner
from agents.state import StateStore
from agents.task_process import TaskLauncher, TaskProcess, process_start_ticks
from tests.agent.test_runner import Recorder, python_command, wait_for


@pytest.fixture
async def launcher() -> AsyncIterator[TaskLauncher]:
    launcher = TaskLauncher()
    yield launcher
    launcher.close()


def runner_on(
    tmp_path: Path, recorder: Recorder, launcher: TaskLauncher, accelerators: list[str]
) -> TaskRunner:
    return TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        time.time,
        accelerators,
        lambda uuids: {"CUDA_VISIBLE_DEVICES": ",".join(uuids)},
        launcher=launcher,
    )


@pytest.mark.timeout(60)
async def test_batch_larger_than_socket_buffer(tmp_path: Path, launcher: TaskLauncher) -> None:
    # Each request carries the task's whole environment, about 1 KB or more; 400 of them do
    # not fit in one write to the socket, so the rest waits for it to drain.
    accelerators = [f"GPU-{index}" for index in range(400)]
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, accelerators)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        specs = [
            TaskSpec("b", f"b/1/{index}", (uuid,), ("true",), env=(("PAD", "x" * 2000),))
            for index, uuid in enumerate(accelerators)
        ]
        await asyncio.gather(*(runner.start(spec) for spec in specs))
        await wait_for(
            lambda: all(TaskState.SUCCEEDED in recorder.states(s.task_id) for s in specs), 30.0
        )
    assert {recorder.last(s.task_id).exit_code for s in specs} == {0}
    assert len({task_id for task_id in (e.task_id for e in recorder.events)}) == len(specs)


@pytest.mark.timeout(30)
async def test_stop_during_launch_stops_task(tmp_path: Path, launcher: TaskLauncher) -> None:
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0"])
    sleeper = python_command("import time; time.sleep(60)")
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        starting = asyncio.create_task(runner.start(TaskSpec("s", "s/1/0", ("GPU-0",), sleeper)))
        await asyncio.sleep(0)
        # The launcher has not replied yet: the stop waits for the reply, then applies.
        assert runner._launching
        await runner.stop("s/1/0", "cancelled")
        await starting
        await wait_for(lambda: TaskState.STOPPED in recorder.states("s/1/0"))
    assert recorder.states("s/1/0") == [TaskState.RUNNING, TaskState.STOPPING, TaskState.STOPPED]
    assert recorder.last("s/1/0").exit_code == -signal.SIGTERM


@pytest.mark.timeout(30)
async def test_lost_launcher_reports_task_and_is_replaced(
    tmp_path: Path, launcher: TaskLauncher
) -> None:
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0", "GPU-1"])
    sleeper = python_command("import time; time.sleep(60)")
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("a", "a/1/0", ("GPU-0",), sleeper))
        first_launcher = launcher.identity[0]
        task_pid = runner.running[0].pid
        os.kill(first_launcher, signal.SIGKILL)
        await wait_for(lambda: launcher.identity == (0, 0))
        # The task runs on, watched by its pidfd, and no one records how it ends.
        assert TaskState.RUNNING in recorder.states("a/1/0")
        os.kill(task_pid, signal.SIGKILL)
        await wait_for(lambda: TaskState.LOST in recorder.states("a/1/0"))
        # The next start gets a new launcher.
        await runner.start(TaskSpec("c", "c/1/0", ("GPU-1",), ("sh", "-c", "exit 4")))
        await wait_for(lambda: TaskState.FAILED in recorder.states("c/1/0"))
    assert launcher.identity[0] not in (0, first_launcher)
    assert recorder.last("c/1/0").exit_code == 4


@pytest.mark.timeout(30)
async def test_launcher_outlives_agent_then_exits(tmp_path: Path, launcher: TaskLauncher) -> None:
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0"])
    code = "import sys, time; time.sleep(1); sys.exit(5)"
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("o", "o/1/0", ("GPU-0",), python_command(code)))
        for supervisor in runner.detach():
            await asyncio.wait((supervisor,))
    launcher_pid, task_pid = launcher.identity[0], runner.running[0].pid
    launcher.close()
    exit_file = tmp_path / "tasks" / "o_1_0.exit"
    # The launcher stays for its task, records its status, then exits.
    assert process_start_ticks(launcher_pid) is not None
    await wait_for(lambda: exit_file.exists(), 10.0)
    assert exit_file.read_text() == "5\n"
    await wait_for(lambda: process_start_ticks(launcher_pid) is None, 10.0)
    assert process_start_ticks(task_pid) is None


@pytest.mark.timeout(30)
async def test_adopted_exit_waits_for_live_recorder(tmp_path: Path) -> None:
    # The task ends before its launcher has written the status: the status is awaited while
    # the launcher (here, this test's process) lives.
    exit_file = tmp_path / "late.exit"
    child = subprocess.Popen(["sleep", "0.1"])  # noqa: ASYNC220 (its pid is what matters)
    me = (os.getpid(), process_start_ticks(os.getpid()) or 0)
    process = TaskProcess(child.pid, exit_path=exit_file, recorder=me)
    await wait_for(lambda: child.poll() is not None, 5.0)
    await asyncio.sleep(0.3)
    assert not process.exited.done()
    exit_file.write_text("137\n")
    assert await asyncio.wait_for(process.wait(), 5.0) == -signal.SIGKILL


def read_environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.timeout(30)
async def test_launcher_gets_no_agent_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACSP_NATS_PASSWORD", "secret-of-the-agent")
    launcher = TaskLauncher()
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0"])
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(TaskSpec("e", "e/1/0", ("GPU-0",), ("true",)))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("e/1/0"))
        environ = read_environ(launcher.identity[0])
    finally:
        launcher.close()
    assert b"secret-of-the-agent" not in environ
    assert b"ACSP_" not in environ


@pytest.mark.timeout(30)
async def test_nul_in_command_fails_task_only(tmp_path: Path, launcher: TaskLauncher) -> None:
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0", "GPU-1"])
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("n", "n/1/0", ("GPU-0",), ("echo", "a\0b")))
        await runner.start(TaskSpec("v", "v/1/0", ("GPU-1",), ("true",), env=(("X", "a\0b"),)))
        await runner.start(TaskSpec("t", "t/1/0", ("GPU-0",), ("true",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("t/1/0"))
        first_launcher = launcher.identity[0]
    for task_id in ("n/1/0", "v/1/0"):
        failed = recorder.last(task_id)
        assert failed.state is TaskState.FAILED
        assert failed.exit_code == 126
        assert "NUL character" in failed.reason
    # The launcher still runs: no request it got could stop it.
    assert process_start_ticks(first_launcher) is not None


@pytest.mark.timeout(30)
async def test_launcher_survives_bad_request(tmp_path: Path, launcher: TaskLauncher) -> None:
    recorder = Recorder()
    runner = runner_on(tmp_path, recorder, launcher, ["GPU-0"])
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("a", "a/1/0", ("GPU-0",), ("true",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
        # Sent past the agent's own checks, as a bug would send it.
        bad = launcher.launch(
            "/bin/echo", ["echo", "a\0b"], {}, tmp_path, tmp_path / "b.log", tmp_path / "b.exit", ""
        )
        with pytest.raises(OSError, match="null"):
            await bad
        assert launcher.identity != (0, 0)


IGNORING_AGENT = """
import asyncio, ctypes, os, sys
from pathlib import Path
from agents.launcher import _RT_SIGACTION
from agents.task_process import spawn

# What glibc's posix_spawn leaves behind: signals 32 and 33 ignored (SIG_IGN is 1).
libc = ctypes.CDLL(None, use_errno=True)
for number in (32, 33):
    action = (ctypes.c_ulong * 4)(1, 0, 0, 0)
    if libc.syscall(_RT_SIGACTION[os.uname().machine], number, ctypes.byref(action), None, 8):
        sys.exit(f"rt_sigaction failed: {os.strerror(ctypes.get_errno())}")
log = Path(sys.argv[1])

async def main() -> None:
    command = ["/bin/sh", "-c", "grep SigIgn /proc/self/status"]
    spawn(command, dict(os.environ), log.parent, log)
    while "SigIgn" not in log.read_text():
        await asyncio.sleep(0.01)

asyncio.run(main())
"""
SIGNALS_32_AND_33 = 0b11 << 31
"""Bits of signals 32 and 33 in a SigIgn mask of ``/proc/<pid>/status`` (bit N-1 is signal N)."""


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    os.uname().machine not in ("x86_64", "aarch64"), reason="rt_sigaction number unknown"
)
def test_task_of_ignoring_agent_gets_default_signals(tmp_path: Path) -> None:
    # An agent that a posix_spawn started ignores 32 and 33, and its tasks must not.
    log = tmp_path / "task.log"
    repository = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", IGNORING_AGENT, str(log)], cwd=repository, check=True, timeout=30
    )

    mask = int(log.read_text().split()[1], 16)
    assert mask & SIGNALS_32_AND_33 == 0


# Starts a child in a new session that writes its pid to argv[1] and sleeps, then exits.
LEAVES_DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    with open(sys.argv[1] + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(30)
    os._exit(0)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
"""


@pytest.mark.timeout(30)
async def test_exit_names_processes_task_left(tmp_path: Path, launcher: TaskLauncher) -> None:
    pid_file = tmp_path / "daemon.pid"
    program = python_command(LEAVES_DAEMON)
    started = launcher.launch(
        program[0],
        [*program, str(pid_file)],
        dict(os.environ),
        tmp_path,
        tmp_path / "t.log",
        tmp_path / "t.exit",
        "spawn-1",
    )
    process = await asyncio.wait_for(started, 10)
    try:
        assert await asyncio.wait_for(process.wait(), 10) == 0
        daemon = int(pid_file.read_text())

        assert launcher.adopts_orphans
        assert process.adopted is not None
        assert daemon in process.adopted
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
