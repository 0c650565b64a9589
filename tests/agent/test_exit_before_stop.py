"""A task whose process ended before a stop reached it reports its own end, with real processes.

An agent that stops with its tasks (a local mesh shutting down) sends the stop to every task it
still lists. A task that has just exited is listed until its supervisor reports the end, so the
stop may come after the exit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agents.model import TaskSpec, TaskState
from agents.runner import AGENT_EXIT, TaskRunner
from agents.task_process import process_start_ticks
from tests.agent.test_runner import (  # noqa: F401 - close_launchers is an autouse fixture
    Recorder,
    close_launchers,
    make_runner,
    python_command,
    wait_for,
)

QUICK = TaskSpec("a", "a/1/0", ("GPU-0",), python_command("print('done')"))


def block_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` without giving the event loop a turn, so no supervisor runs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


async def start_and_let_exit(runner: TaskRunner, spec: TaskSpec) -> int:
    """Start ``spec`` and return its pid once the process has exited, unseen by its supervisor."""
    await runner.start(spec)
    pid = runner._tasks[spec.task_id].record.pid
    # A zombie or a reaped process has no start time.
    block_until(lambda: process_start_ticks(pid) is None)
    return pid


@pytest.mark.timeout(30)
async def test_exit_before_agent_stop_succeeds(tmp_path: Path) -> None:
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await start_and_let_exit(runner, QUICK)
        supervisors = runner.stop_processes(AGENT_EXIT, 5.0)
        assert len(supervisors) == 1
        await asyncio.wait(supervisors, timeout=10.0)
    assert recorder.states("a/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]
    assert recorder.last("a/1/0").exit_code == 0
    assert recorder.last("a/1/0").reason == "exited"


@pytest.mark.timeout(30)
async def test_failure_before_requested_stop_fails(tmp_path: Path) -> None:
    spec = TaskSpec("b", "b/1/0", ("GPU-1",), python_command("import sys; sys.exit(4)"))
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await start_and_let_exit(runner, spec)
        await runner.stop("b/1/0", "stop requested")
        await wait_for(lambda: len(recorder.states("b/1/0")) == 2)
    assert recorder.states("b/1/0") == [TaskState.RUNNING, TaskState.FAILED]
    assert recorder.last("b/1/0").exit_code == 4


@pytest.mark.timeout(30)
async def test_exit_before_agent_stop_after_restart(tmp_path: Path) -> None:
    first = Recorder()
    runner = make_runner(tmp_path, first)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await start_and_let_exit(runner, QUICK)
        runner.stop_processes(AGENT_EXIT, 5.0)
        # The agent's stop budget runs out before the supervisor reports the end.
        runner.detach()
    runner._state.save()
    assert first.states("a/1/0") == [TaskState.RUNNING]

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        await wait_for(lambda: len(second.states("a/1/0")) == 1)
    # The launcher recorded the exit status, which the restarted agent reads.
    assert second.states("a/1/0") == [TaskState.SUCCEEDED]
    assert second.last("a/1/0").exit_code == 0


@pytest.mark.timeout(30)
async def test_exit_after_agent_stop_signal_is_lost(tmp_path: Path) -> None:
    # The task exits 0 when it gets SIGTERM, as a task that saves a checkpoint does. It did
    # not finish its work, so the scheduler must run it again.
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    spec = TaskSpec("c", "c/1/0", ("GPU-2",), python_command(code))
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    log = tmp_path / "tasks" / "c_1_0.log"
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(spec)
        await wait_for(lambda: log.exists() and "ready" in log.read_text())
        supervisors = runner.stop_processes(AGENT_EXIT, 5.0)
        await asyncio.wait(supervisors, timeout=10.0)
    assert recorder.states("c/1/0") == [TaskState.RUNNING, TaskState.STOPPING, TaskState.LOST]
    assert recorder.last("c/1/0").exit_code == 0
