"""The task runner with real processes: visibility, wall time, stop, restart."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agents.model import TaskEvent, TaskSpec, TaskState
from agents.runner import TaskRunner
from agents.state import StateStore
from agents.task_process import (
    SPAWN_ID_ENV,
    TaskLauncher,
    TaskProcess,
    find_task_leaders,
    process_start_ticks,
)

ACCELERATORS = [f"GPU-{i}" for i in range(8)]


def _visible(uuids: object) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(uuids)}  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    def __call__(self, event: TaskEvent) -> None:
        self.events.append(event)

    def states(self, task_id: str) -> list[TaskState]:
        return [e.state for e in self.events if e.task_id == task_id]

    def last(self, task_id: str) -> TaskEvent:
        return [e for e in self.events if e.task_id == task_id][-1]


_launchers: list[TaskLauncher] = []


@pytest.fixture(autouse=True)
async def close_launchers() -> AsyncIterator[None]:
    """Close the launchers a test made, on its event loop, as a stopping agent does."""
    yield
    for launcher in _launchers:
        launcher.close()
    _launchers.clear()


def make_runner(tmp_path: Path, recorder: Recorder, record_exit_status: bool = True) -> TaskRunner:
    launcher = None
    if record_exit_status:
        launcher = TaskLauncher()
        _launchers.append(launcher)
    return TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        time.time,
        ACCELERATORS,
        _visible,
        launcher=launcher,
    )


async def restart_until_ended(
    directory: Path, task_id: str, record_exit_status: bool = True
) -> Recorder:
    """Restart a runner on ``directory`` and wait until the adopted ``task_id`` has ended."""
    recorder = Recorder()
    restarted = make_runner(directory, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        await wait_for(lambda: len(recorder.states(task_id)) == 2)
    return recorder


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def python_command(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


async def run_with_group(
    tmp_path: Path,
    body: Callable[[TaskRunner, Recorder], Awaitable[None]],
    record_exit_status: bool = True,
) -> Recorder:
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await body(runner, recorder)
    return recorder


async def test_task_sees_exactly_its_two_accelerators(tmp_path: Path) -> None:
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec(
            job_id="job-1",
            task_id="job-1/1/0",
            accelerators=("GPU-3", "GPU-6"),
            command=python_command("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"),
        )
        await runner.start(spec)
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("job-1/1/0"))

    recorder = await run_with_group(tmp_path, body)
    final = recorder.last("job-1/1/0")
    assert final.exit_code == 0
    assert final.output_tail.strip() == "GPU-3,GPU-6"
    assert recorder.states("job-1/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]


async def test_task_sees_its_task_index(tmp_path: Path) -> None:
    code = "import os; print(os.environ.get('ACSP_TASK_INDEX', 'absent'))"

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        for accelerator, task_id in (
            ("GPU-0", "job-3/2/1"),
            ("GPU-1", "job-3/2/0"),
            ("GPU-2", "job-3"),
        ):
            spec = TaskSpec(
                job_id="job-3",
                task_id=task_id,
                accelerators=(accelerator,),
                command=python_command(code),
            )
            await runner.start(spec)

            def succeeded(started: str = task_id) -> bool:
                return TaskState.SUCCEEDED in recorder.states(started)

            await wait_for(succeeded)

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("job-3/2/1").output_tail.strip() == "1"
    assert recorder.last("job-3/2/0").output_tail.strip() == "0"
    assert recorder.last("job-3").output_tail.strip() == "absent"


async def test_agent_credentials_are_not_passed_to_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACSP_NATS_PASSWORD", "secret")

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec(
            job_id="job-2",
            task_id="job-2/1/0",
            accelerators=("GPU-0",),
            command=python_command(
                "import os; print(os.environ.get('ACSP_NATS_PASSWORD', 'absent'))"
            ),
        )
        await runner.start(spec)
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("job-2/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("job-2/1/0").output_tail.strip() == "absent"


async def test_task_past_wall_time_is_stopped(tmp_path: Path) -> None:
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec(
            job_id="job-3",
            task_id="job-3/1/0",
            accelerators=("GPU-1",),
            command=python_command("import time; print('working', flush=True); time.sleep(60)"),
            wall_time_s=1.0,
            grace_period_s=2.0,
        )
        await runner.start(spec)
        await wait_for(lambda: TaskState.TIMED_OUT in recorder.states("job-3/1/0"))

    started = time.monotonic()
    recorder = await run_with_group(tmp_path, body)
    final = recorder.last("job-3/1/0")
    assert final.state is TaskState.TIMED_OUT
    assert final.exit_code == -15
    assert "working" in final.output_tail
    assert time.monotonic() - started < 10


async def test_cancel_in_grace_period_exits_cleanly(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "def done(*_):\n"
        "    print('checkpoint saved', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, done)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec(
            job_id="job-4",
            task_id="job-4/1/0",
            accelerators=("GPU-2",),
            command=python_command(code),
            grace_period_s=20.0,
        )
        await runner.start(spec)
        log = tmp_path / "tasks" / "job-4_1_0.log"
        await wait_for(lambda: log.exists() and "ready" in log.read_text())
        await runner.stop("job-4/1/0", "cancelled")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("job-4/1/0"))

    recorder = await run_with_group(tmp_path, body)
    final = recorder.last("job-4/1/0")
    assert final.exit_code == 0
    assert final.reason == "cancelled"
    assert "checkpoint saved" in final.output_tail
    assert recorder.states("job-4/1/0") == [
        TaskState.RUNNING,
        TaskState.STOPPING,
        TaskState.STOPPED,
    ]


async def test_task_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('x', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec("job-5", "job-5/1/0", ("GPU-4",), python_command(code), grace_period_s=0.5)
        await runner.start(spec)
        log = tmp_path / "tasks" / "job-5_1_0.log"
        await wait_for(lambda: log.exists() and "x" in log.read_text())
        await runner.stop("job-5/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("job-5/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("job-5/1/0").exit_code == -9


async def test_start_rejects_foreign_or_busy_accelerators(tmp_path: Path) -> None:
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        sleeper = python_command("import time; time.sleep(30)")
        await runner.start(TaskSpec("a", "a/1/0", ("GPU-0",), sleeper))
        await runner.start(TaskSpec("b", "b/1/0", ("GPU-0",), sleeper))
        await runner.start(TaskSpec("c", "c/1/0", ("GPU-99",), sleeper))
        await runner.start(TaskSpec("d", "d/1/0", ("GPU-1",), ()))
        await runner.stop("a/1/0", "done")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("a/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("b/1/0").state is TaskState.START_FAILED
    assert "in use" in recorder.last("b/1/0").reason
    assert "not on this node" in recorder.last("c/1/0").reason
    assert "no command" in recorder.last("d/1/0").reason


async def test_redelivered_start_runs_task_once(tmp_path: Path) -> None:
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec("e", "e/1/0", ("GPU-5",), python_command("print('once')"))
        await runner.start(spec)
        await runner.start(spec)
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("e/1/0"))
        await runner.start(spec)

    recorder = await run_with_group(tmp_path, body)
    assert recorder.states("e/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]


async def test_restart_adopts_and_reports_ended(tmp_path: Path) -> None:
    first = Recorder()
    runner = make_runner(tmp_path, first)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(
            TaskSpec("f", "f/1/0", ("GPU-0",), python_command("import time; time.sleep(30)"))
        )
        await runner.start(
            TaskSpec("g", "g/1/0", ("GPU-1",), python_command("import time; time.sleep(1)"))
        )
        # The agent dies here: its supervisors stop, the processes go on.
        for task in runner._tasks.values():
            assert task.supervisor is not None
            task.supervisor.cancel()

    survivor_pid = runner._tasks["f/1/0"].record.pid
    short_pid = runner._tasks["g/1/0"].record.pid
    # Reap the short one as init would, once it ends, so its pid no longer matches.
    for process in (t.process for t in runner._tasks.values()):
        assert process is not None
    await runner._tasks["g/1/0"].process.wait()  # type: ignore[union-attr]

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        # The task that ended while the agent was down is reported with its recorded status.
        assert second.states("g/1/0") == [TaskState.SUCCEEDED]
        assert second.last("g/1/0").exit_code == 0
        assert second.last("f/1/0").state is TaskState.RUNNING
        assert "found again" in second.last("f/1/0").reason
        assert [r.pid for r in restarted.running] == [survivor_pid]
        await restarted.stop("f/1/0", "cleanup")
        await wait_for(lambda: TaskState.STOPPED in second.states("f/1/0"))
    assert short_pid != survivor_pid
    assert StateStore(tmp_path / "state.json").node("acme.eu-1.node-1").tasks == {}


async def start_then_lose_agent(tmp_path: Path, spec: TaskSpec) -> TaskProcess:
    """Start ``spec`` and stop supervising it, as an agent that dies does; return its process."""
    runner = make_runner(tmp_path, Recorder())
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(spec)
        task = runner._tasks[spec.task_id]
        assert task.supervisor is not None and task.process is not None
        task.supervisor.cancel()
    return task.process


@pytest.mark.timeout(30)
async def test_adopted_task_exit_code_read(tmp_path: Path) -> None:
    code = "import sys, time; time.sleep(1.5); sys.exit(3)"
    first = await start_then_lose_agent(
        tmp_path, TaskSpec("k", "k/1/0", ("GPU-3",), python_command(code))
    )

    second = await restart_until_ended(tmp_path, "k/1/0")
    # The restarted runner is not the parent of the process, but its launcher wrote exit code 3.
    assert second.states("k/1/0") == [TaskState.RUNNING, TaskState.FAILED]
    assert second.last("k/1/0").exit_code == 3
    assert await first.wait() == 3


@pytest.mark.timeout(30)
async def test_adopted_task_without_status_lost(tmp_path: Path) -> None:
    first = await start_then_lose_agent(
        tmp_path,
        TaskSpec("n", "n/1/0", ("GPU-6",), python_command("import time; time.sleep(30)")),
    )

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert second.states("n/1/0") == [TaskState.RUNNING]
        # The launcher dies before the task, so no exit status is recorded. The task must not
        # pass as succeeded, and what is left of it is killed.
        launcher_pid = restarted.running[0].launcher_pid
        assert launcher_pid > 0
        os.kill(launcher_pid, signal.SIGKILL)
        await wait_for(lambda: process_start_ticks(launcher_pid) is None)
        os.kill(first.pid, signal.SIGKILL)
        await wait_for(lambda: len(second.states("n/1/0")) == 2)
    assert second.last("n/1/0").state is TaskState.LOST
    assert second.last("n/1/0").exit_code is None
    assert "without a recorded exit status" in second.last("n/1/0").reason
    await first.wait()
    await wait_for(lambda: not group_alive(first.pid))


@pytest.mark.timeout(30)
async def test_adopted_exit_relative_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent started with a relative state folder, as `--state-dir agent` gives it, while
    # the launcher starts each task in the tasks folder below it.
    monkeypatch.chdir(tmp_path)
    relative = Path("agent")
    code = "import sys, time; time.sleep(1.5); sys.exit(3)"
    first = await start_then_lose_agent(
        relative, TaskSpec("r", "r/1/0", ("GPU-5",), python_command(code))
    )

    second = await restart_until_ended(relative, "r/1/0")
    assert second.states("r/1/0") == [TaskState.RUNNING, TaskState.FAILED]
    assert second.last("r/1/0").exit_code == 3
    assert await first.wait() == 3
    assert "cannot create" not in second.last("r/1/0").output_tail


def write_script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


async def test_relative_command_with_relative_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Path("agent")
    write_script(relative / "run.sh", "#!/bin/sh\necho ran\n")

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        # A relative command is found from the task's working directory, the tasks folder.
        await runner.start(TaskSpec("u", "u/1/0", ("GPU-4",), ("../run.sh",)))
        await wait_for(lambda: len(recorder.states("u/1/0")) == 2)

    recorder = await run_with_group(relative, body)
    assert recorder.states("u/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]
    assert recorder.last("u/1/0").output_tail == "ran\n"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_shares_of_one_accelerator_add_up_to_one(tmp_path: Path) -> None:
    recorder = Recorder()
    clock = [1000.0]
    runner = TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        lambda: clock[0],
        ACCELERATORS,
        _visible,
        allow_played_tasks=True,
    )

    def played(job: str, millis: int) -> TaskSpec:
        return TaskSpec(
            job,
            f"{job}/1/0",
            ("GPU-0",),
            ("true",),
            simulated_run_time_s=60.0,
            accelerator_millis=(millis,),
        )

    await runner.start(played("a", 500))
    await runner.start(played("b", 250))
    await runner.start(played("c", 500))
    await runner.start(played("d", 250))
    clock[0] += 10.0
    intervals = {i.task_id: i for i in runner.intervals(1000.0, clock[0])}

    assert recorder.last("a/1/0").state is TaskState.RUNNING
    assert recorder.last("b/1/0").state is TaskState.RUNNING
    assert recorder.last("c/1/0").state is TaskState.START_FAILED
    assert "in use" in recorder.last("c/1/0").reason
    assert recorder.last("d/1/0").state is TaskState.RUNNING
    assert runner.used_millis() == {"GPU-0": 1000}
    assert intervals["b/1/0"].share_of("GPU-0") == 250
    assert set(intervals) == {"a/1/0", "b/1/0", "d/1/0"}


async def test_exit_reported_before_any_deadline(tmp_path: Path) -> None:
    # A supervisor sleeps up to 5 s unless the exit wakes it. The bound here is shorter.
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        for index in range(3):
            task_id = f"quick/1/{index}"
            command = ("sleep", "0.3")
            spec = TaskSpec("quick", task_id, ("GPU-7",), command, wall_time_s=600.0)
            await runner.start(spec)
            await wait_for(lambda t=task_id: TaskState.SUCCEEDED in recorder.states(t), 3.0)

    recorder = await run_with_group(tmp_path, body)
    for index in range(3):
        assert recorder.states(f"quick/1/{index}") == [TaskState.RUNNING, TaskState.SUCCEEDED]


async def test_exit_seen_without_pidfds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before Linux 5.3 have no pidfd_open; the supervisor then polls the process.
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open is not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        await runner.start(TaskSpec("p", "p/1/0", ("GPU-4",), ("sleep", "0.2"), wall_time_s=600))
        await runner.start(
            TaskSpec(
                "q",
                "q/1/0",
                ("GPU-5",),
                python_command("import time; time.sleep(60)"),
                wall_time_s=0.5,
                grace_period_s=1.0,
            )
        )
        assert all(task.process is not None for task in runner._tasks.values())
        assert all(task.process.polled for task in runner._tasks.values())  # type: ignore[union-attr]
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("p/1/0"), 3.0)
        await wait_for(lambda: TaskState.TIMED_OUT in recorder.states("q/1/0"), 5.0)

    # The tasks are the agent's own children here: a launcher reports exits without pidfds.
    recorder = await run_with_group(tmp_path, body, record_exit_status=False)
    assert recorder.last("p/1/0").exit_code == 0
    assert recorder.last("q/1/0").exit_code == -15


STATE_FILES = ("state.json", "state.json.intents")


def snapshot_state(directory: Path) -> dict[str, bytes | None]:
    """Return the state files as a crash now would leave them."""
    return {
        name: (directory / name).read_bytes() if (directory / name).exists() else None
        for name in STATE_FILES
    }


def restore_state(directory: Path, files: dict[str, bytes | None]) -> None:
    for name, data in files.items():
        if data is None:
            (directory / name).unlink(missing_ok=True)
        else:
            (directory / name).write_bytes(data)


async def test_intent_of_running_process_is_adopted(tmp_path: Path) -> None:
    first = Recorder()
    runner = make_runner(tmp_path, first)
    spec = TaskSpec("h", "h/1/0", ("GPU-2",), python_command("import time; time.sleep(30)"))
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        runner.prepare_start(spec)
        runner._state.save_intents()
        spawn_id = runner._state.node("acme.eu-1.node-1").intents["h/1/0"].spawn_id
        starting = asyncio.create_task(runner.start(spec))
        # Two turns send the request. Then the loop is held until the launcher has started
        # the process, so the agent cannot have read the reply: it dies here, after the
        # spawn and before the state records the task.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while not (leaders := find_task_leaders(SPAWN_ID_ENV, {spawn_id})):
            assert time.monotonic() < deadline, "the launcher started no process"
            time.sleep(0.01)  # noqa: ASYNC251 (the loop is held on purpose)
        crashed_state = snapshot_state(tmp_path)
        pid = leaders[spawn_id]
        await starting
        assert runner._tasks["h/1/0"].record.pid == pid
        for task in runner._tasks.values():
            assert task.supervisor is not None
            task.supervisor.cancel()
    restore_state(tmp_path, crashed_state)
    saved = StateStore(tmp_path / "state.json").node("acme.eu-1.node-1")
    assert list(saved.intents) == ["h/1/0"]
    assert saved.tasks == {}

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert [r.pid for r in restarted.running] == [pid]
        assert second.states("h/1/0") == [TaskState.RUNNING]
        await restarted.start(spec)  # the redelivered command
        assert [r.pid for r in restarted.running] == [pid]
        await restarted.stop("h/1/0", "cleanup")
        await wait_for(lambda: TaskState.STOPPED in second.states("h/1/0"))
    saved = StateStore(tmp_path / "state.json").node("acme.eu-1.node-1")
    assert saved.intents == {}
    assert saved.tasks == {}


async def test_intent_without_process_or_log_is_dropped(tmp_path: Path) -> None:
    first = Recorder()
    runner = make_runner(tmp_path, first)
    spec = TaskSpec("k", "k/1/0", ("GPU-3",), python_command("print('ran')"))
    runner.prepare_start(spec)
    runner._state.save_intents()
    # The agent dies before the spawn.

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert second.events == []
        assert restarted.running == []
        await restarted.start(spec)  # the redelivered command starts it once
        await wait_for(lambda: TaskState.SUCCEEDED in second.states("k/1/0"))
    assert second.states("k/1/0") == [TaskState.RUNNING, TaskState.SUCCEEDED]
    assert (tmp_path / "tasks" / "k_1_0.log").read_text() == "ran\n"


async def crash_after_quick_task(tmp_path: Path, spec: TaskSpec) -> None:
    """Run ``spec`` to its end, then restore the state files as they were right after its spawn."""
    runner = make_runner(tmp_path, Recorder())
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        runner.prepare_start(spec)
        runner._state.save_intents()
        await runner.start(spec)
        crashed_state = snapshot_state(tmp_path)
        process = runner._tasks[spec.task_id].process
        assert process is not None
        for task in runner._tasks.values():
            assert task.supervisor is not None
            task.supervisor.cancel()
        await process.wait()
    # With the agent gone and its task ended, the launcher exits too.
    await close_launcher_of(runner)
    restore_state(tmp_path, crashed_state)


async def close_launcher_of(runner: TaskRunner) -> None:
    launcher = runner._launcher
    assert launcher is not None
    pid = launcher.identity[0]
    launcher.close()
    await wait_for(lambda: process_start_ticks(pid) is None)


async def test_ended_intent_reports_exit(tmp_path: Path) -> None:
    spec = TaskSpec("m", "m/1/0", ("GPU-4",), python_command("print('quick')"))
    await crash_after_quick_task(tmp_path, spec)

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert second.states("m/1/0") == [TaskState.SUCCEEDED]
        assert second.last("m/1/0").exit_code == 0
        assert second.last("m/1/0").output_tail == "quick\n"
        await restarted.start(spec)  # the redelivered command does not run it again
    assert second.states("m/1/0") == [TaskState.SUCCEEDED]
    assert (tmp_path / "tasks" / "m_1_0.log").read_text() == "quick\n"


async def test_ended_intent_without_status_lost(tmp_path: Path) -> None:
    spec = TaskSpec("m", "m/1/0", ("GPU-4",), python_command("print('quick')"))
    await crash_after_quick_task(tmp_path, spec)
    # As an agent without the exit recorder leaves it.
    (tmp_path / "tasks" / "m_1_0.exit").unlink()

    second = Recorder()
    restarted = make_runner(tmp_path, second)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert second.states("m/1/0") == [TaskState.LOST]
        assert second.last("m/1/0").output_tail == "quick\n"
        await restarted.start(spec)
    assert second.states("m/1/0") == [TaskState.LOST]


async def test_task_killed_by_signal(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        await runner.start(TaskSpec("s", "s/1/0", ("GPU-7",), python_command(code)))
        await wait_for(lambda: TaskState.FAILED in recorder.states("s/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("s/1/0").exit_code == -signal.SIGKILL


async def test_command_runs_program_not_builtin(tmp_path: Path) -> None:
    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        # dash's builtin echo would turn the backslash sequence into a tab.
        await runner.start(TaskSpec("e", "e/1/0", ("GPU-0",), ("echo", "a\\tb")))
        await runner.start(TaskSpec("x", "x/1/0", ("GPU-1",), ("no-such-program-here",)))
        await runner.start(TaskSpec("t", "t/1/0", ("GPU-2",), ("../tasks",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("e/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("e/1/0").output_tail == "a\\tb\n"
    # A command that names no program fails as under a shell, so the job is not requeued.
    missing = recorder.last("x/1/0")
    assert missing.state is TaskState.FAILED
    assert missing.exit_code == 127
    assert missing.reason.startswith(
        "cannot run no-such-program-here: no executable file of that name on the task's PATH ("
    )
    # A directory named by a relative path (from the task's working directory) is not a program.
    directory = recorder.last("t/1/0")
    assert directory.state is TaskState.FAILED
    assert directory.exit_code == 126
    assert directory.reason == "cannot run ../tasks: it is a directory, not a program"


@pytest.mark.timeout(30)
async def test_no_recorder_loses_adopted_exit(tmp_path: Path) -> None:
    code = "import sys, time; time.sleep(1.5); sys.exit(3)"
    first_events = Recorder()
    first = make_runner(tmp_path, first_events, record_exit_status=False)
    async with asyncio.TaskGroup() as group:
        first.attach(group)
        await first.start(TaskSpec("c", "c/1/0", ("GPU-1",), ("false",)))
        await wait_for(lambda: TaskState.FAILED in first_events.states("c/1/0"))
        await first.start(TaskSpec("w", "w/1/0", ("GPU-2",), python_command(code)))
        task = first._tasks["w/1/0"]
        assert task.supervisor is not None and task.process is not None
        task.supervisor.cancel()
    # The agent's own child reports its exit code, without a shell in between.
    assert first_events.last("c/1/0").exit_code == 1
    assert list((tmp_path / "tasks").glob("*.exit")) == []

    second = await restart_until_ended(tmp_path, "w/1/0", record_exit_status=False)
    assert second.states("w/1/0") == [TaskState.RUNNING, TaskState.LOST]
    assert await task.process.wait() == 3


async def test_relative_path_entry_found(tmp_path: Path) -> None:
    tools = tmp_path / "tasks" / "bin"
    tools.mkdir(parents=True)
    program = tools / "hello-task"
    program.write_text("#!/bin/sh\necho from-task-bin\n")
    program.chmod(0o755)

    async def body(runner: TaskRunner, recorder: Recorder) -> None:
        spec = TaskSpec("b", "b/1/0", ("GPU-4",), ("hello-task",), env=(("PATH", "bin:/usr/bin"),))
        await runner.start(spec)
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("b/1/0"))

    recorder = await run_with_group(tmp_path, body)
    assert recorder.last("b/1/0").output_tail == "from-task-bin\n"
