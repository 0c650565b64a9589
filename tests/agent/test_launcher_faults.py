"""Faults around the task launcher: bad requests, stalls and losses, with real processes."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from agents.model import TaskSpec, TaskState
from agents.runner import TaskRunner
from agents.state import StateStore
from agents.task_process import TaskLauncher, process_start_ticks
from tests.agent.test_runner import (
    Recorder,
    close_launchers,  # noqa: F401 (closes the launchers of make_runner after each test)
    make_runner,
    python_command,
    wait_for,
)


async def start_and_wait(runner: TaskRunner, recorder: Recorder, spec: TaskSpec) -> None:
    await runner.start(spec)
    await wait_for(lambda: len(recorder.states(spec.task_id)) > 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])
async def test_bad_variable_name_fails_task_only(tmp_path: Path, record_exit_status: bool) -> None:
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await start_and_wait(
            runner, recorder, TaskSpec("e", "e/1/0", ("GPU-0",), ("true",), env=(("A=B", "x"),))
        )
        await start_and_wait(
            runner, recorder, TaskSpec("k", "k/1/0", ("GPU-1",), ("true",), env=(("", "x"),))
        )
        # The runner goes on starting tasks.
        await runner.start(TaskSpec("t", "t/1/0", ("GPU-2",), ("true",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("t/1/0"))
    for task_id in ("e/1/0", "k/1/0"):
        failed = recorder.last(task_id)
        assert failed.state is TaskState.FAILED
        assert failed.exit_code == 126
        assert "environment variable name" in failed.reason


@pytest.mark.timeout(30)
@pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])
async def test_start_after_task_folder_removed(tmp_path: Path, record_exit_status: bool) -> None:
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("a", "a/1/0", ("GPU-0",), ("true",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
        # An operator cleaning up removes the folder of the logs and exit status files.
        shutil.rmtree(tmp_path / "tasks")
        await runner.start(TaskSpec("b", "b/1/0", ("GPU-0",), ("sh", "-c", "exit 3")))
        await wait_for(lambda: recorder.states("b/1/0") not in ([], [TaskState.RUNNING]))
    assert recorder.states("b/1/0") == [TaskState.RUNNING, TaskState.FAILED]
    assert recorder.last("b/1/0").exit_code == 3


@pytest.mark.timeout(30)
async def test_launch_error_names_cause_once(tmp_path: Path) -> None:
    launcher = TaskLauncher()
    try:
        missing = tmp_path / "missing"
        launch = launcher.launch(
            "/bin/true", ["true"], {}, missing, tmp_path / "t.log", tmp_path / "t.exit", ""
        )
        with pytest.raises(FileNotFoundError) as caught:
            await launch
    finally:
        launcher.close()
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(missing)
    assert str(caught.value) == f"[Errno 2] No such file or directory: '{missing}'"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])
async def test_redelivered_start_of_ended_task_ignored(
    tmp_path: Path, record_exit_status: bool
) -> None:
    # An agent acknowledges a batch of start commands once every start in it has settled, so a
    # task of a large batch can end and be reported before the agent crashes, unacknowledged.
    runs = tmp_path / "runs.txt"
    spec = TaskSpec("q", "q/1/0", ("GPU-0",), python_command(append_line(runs, "ran")))
    first = Recorder()
    runner = make_runner(tmp_path, first, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        runner.prepare_start(spec)
        runner._state.save_intents()
        await runner.start(spec)
        await wait_for(lambda: TaskState.SUCCEEDED in first.states("q/1/0"))

    second = Recorder()
    restarted = make_runner(tmp_path, second, record_exit_status)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        restarted.prepare_start(spec)
        await restarted.start(spec)  # the redelivered command
    assert second.events == []
    assert restarted.running == []
    assert runs.read_text() == "ran\n"
    assert StateStore(tmp_path / "state.json").node("acme.eu-1.node-1").intents == {}


def append_line(path: Path, line: str) -> str:
    """Return Python code that appends ``line`` to ``path``."""
    return f"open({str(path)!r}, 'a').write({line + chr(10)!r})"


async def stalled_launcher(launcher: TaskLauncher, tmp_path: Path) -> int:
    """Start ``launcher`` with one quick task, then stop its process with SIGSTOP."""
    await launcher.launch(
        "/bin/true", ["true"], {}, tmp_path, tmp_path / "w.log", tmp_path / "w.exit", ""
    )
    pid = launcher.identity[0]
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.timeout(30)
async def test_launcher_starts_nothing_after_agent_left(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    launcher = TaskLauncher()
    pid = await stalled_launcher(launcher, tmp_path)
    try:
        launch = launcher.launch(
            sys.executable,
            [sys.executable, "-c", append_line(runs, "ran")],
            {},
            tmp_path,
            tmp_path / "late.log",
            tmp_path / "late.exit",
            "",
        )
        await wait_for(lambda: not launcher._outgoing)
        # The agent goes away while its request waits in the socket, unread.
        launcher.close()
        assert launch.cancelled()
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_for(lambda: process_start_ticks(pid) is None)
    assert not (tmp_path / "late.log").exists()
    assert not runs.exists()


@pytest.mark.timeout(30)
async def test_start_unsettled_at_close_runs_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    spec = TaskSpec("u", "u/1/0", ("GPU-0",), python_command(append_line(runs, "ran")))
    first = Recorder()
    runner = make_runner(tmp_path, first)
    launcher = runner._launcher
    assert launcher is not None
    pid = await stalled_launcher(launcher, tmp_path)
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            runner.prepare_start(spec)
            runner._state.save_intents()
            starting = asyncio.create_task(runner.start(spec))
            await wait_for(lambda: "u/1/0" in runner._launching and not launcher._outgoing)
            # The agent stops: its settle wait ran out, and it closes the launcher.
            launcher.close()
            await starting
        runner._state.save()
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_for(lambda: process_start_ticks(pid) is None)
    # Whether the task started is unknown here, so nothing is reported and the intent stays.
    assert first.events == []
    saved = StateStore(tmp_path / "state.json").node("acme.eu-1.node-1")
    assert list(saved.intents) == ["u/1/0"]

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        await restarted.start(spec)  # the unacknowledged command, redelivered
        await wait_for(lambda: TaskState.SUCCEEDED in second.states("u/1/0"))
    assert second.states("u/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]
    assert runs.read_text() == "ran\n"


@pytest.mark.timeout(30)
async def test_stalled_launcher_is_replaced(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    launcher = runner._launcher
    assert launcher is not None
    launcher._reply_timeout_s = 1.0
    ending = python_command("import sys, time; time.sleep(2); sys.exit(5)")
    late = TaskSpec("l", "l/1/0", ("GPU-1",), python_command(append_line(runs, "ran")))

    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("e", "e/1/0", ("GPU-0",), ending))
        stalled = launcher.identity[0]
        os.kill(stalled, signal.SIGSTOP)
        try:
            # The start settles once the launcher has not replied in time, not when it resumes.
            await asyncio.wait_for(runner.start(late), 5.0)
        finally:
            os.kill(stalled, signal.SIGCONT)

        assert recorder.states("l/1/0") == [TaskState.START_FAILED]
        assert "no reply" in recorder.last("l/1/0").reason
        # The next start gets a new launcher.
        await runner.start(TaskSpec("n", "n/1/0", ("GPU-2",), ("sh", "-c", "exit 4")))
        await wait_for(lambda: TaskState.FAILED in recorder.states("n/1/0"))
        assert launcher.identity[0] not in (0, stalled)
        # The resumed launcher still records the status of its task, and then exits.
        await wait_for(lambda: len(recorder.states("e/1/0")) == 2)
    assert recorder.last("e/1/0").state is TaskState.FAILED
    assert recorder.last("e/1/0").exit_code == 5
    await wait_for(lambda: process_start_ticks(stalled) is None)
    assert not runs.exists()
    # The agent reaps it, so it leaves no zombie behind.
    await wait_for(lambda: not Path(f"/proc/{stalled}").exists())


@pytest.mark.timeout(30)
async def test_held_agent_keeps_launcher(tmp_path: Path) -> None:
    launcher = TaskLauncher(reply_timeout_s=0.5)
    try:
        launch = launcher.launch(
            "/bin/sh",
            ["sh", "-c", "exit 3"],
            {},
            tmp_path,
            tmp_path / "h.log",
            tmp_path / "h.exit",
            "",
        )
        first = launcher.identity
        # The agent's own loop is held past the timeout (stopped, or busy), not the launcher.
        time.sleep(1.5)  # noqa: ASYNC251 (the loop is held on purpose)
        process = await asyncio.wait_for(launch, 5.0)
        assert await asyncio.wait_for(process.wait(), 5.0) == 3
        assert launcher.identity == first
    finally:
        launcher.close()
