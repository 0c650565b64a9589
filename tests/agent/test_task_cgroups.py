"""A cgroup v2 per task (ACSP_AGENT_TASK_CGROUP): stops kill what no other search finds.

The tests need a writable cgroup v2 mount (root on a machine with a unified or hybrid
hierarchy) and skip without one. Each test makes its cgroups under a folder of its own there,
and removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import main as agent_main
from agents import task_cgroups, wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.backoff import CLEANUP_BACKOFF, Backoff
from agents.model import TaskSpec, TaskState
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions
from agents.runner import TaskRunner, remove_stale_cgroups
from agents.settings import AgentSettings
from agents.spool import Spool
from agents.state import StateStore, TaskRecord
from agents.task_cgroups import (
    TASK_CGROUP_ENV,
    TaskCgroupError,
    TaskCgroups,
    cgroup_name,
    check_task_cgroup,
    is_populated,
    member_pids,
    parse_task_cgroup,
)
from agents.task_process import TaskLauncher, process_start_ticks
from agents.task_user import TaskUser
from services.runtime.settings import SettingsError
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.test_runner import (
    ACCELERATORS,
    Recorder,
    make_runner,
    python_command,
    wait_for,
)

REPOSITORY = Path(__file__).resolve().parents[2]

# Forks a daemon that calls setsid, forks again, and executes a Python that runs with an empty
# environment (so no spawn id) and writes its pid to the file argv[1]. The task then sleeps.
CLEARED_DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        code = (
            "import os, sys, time\\n"
            "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\\n"
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\\n"
            "time.sleep(60)\\n"
        )
        os.execve(sys.executable, [sys.executable, "-c", code, sys.argv[1]], {})
    os._exit(0)
time.sleep(60)
"""


def _writable_cgroup2_mounts() -> list[Path]:
    mounts = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            for line in file:
                fields, _sep, rest = line.partition(" - ")
                if rest.split()[:1] == ["cgroup2"]:
                    mounts.append(Path(fields.split()[4]))
    except OSError:
        return []
    return mounts


def _remove_tree(root: Path) -> None:
    """Kill everything under ``root`` and remove it, children first."""
    if not root.exists():
        return
    (root / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    while is_populated(root) and time.monotonic() < deadline:
        time.sleep(0.01)
    for folder, _subfolders, _files in os.walk(root, topdown=False):
        os.rmdir(folder)


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    """A fresh cgroup of this test's own under a writable cgroup v2 mount."""
    reasons = []
    for mount in _writable_cgroup2_mounts():
        root = mount / f"acsp-test-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            root.mkdir()
        except OSError as error:
            reasons.append(f"{mount}: {error.strerror}")
            continue
        try:
            yield root
        finally:
            _remove_tree(root)
        return
    pytest.skip(f"no writable cgroup v2 mount ({'; '.join(reasons) or 'none mounted'})")


@pytest.fixture
async def launchers() -> AsyncIterator[list[TaskLauncher]]:
    made: list[TaskLauncher] = []
    yield made
    for launcher in made:
        launcher.close()


def contained_runner(
    tmp_path: Path,
    recorder: Recorder,
    root: Path,
    launchers: list[TaskLauncher],
    record_exit_status: bool = True,
    task_user: TaskUser | None = None,
    cleanup_backoff: Backoff = CLEANUP_BACKOFF,
) -> TaskRunner:
    cgroups = TaskCgroups(root)
    launcher = None
    if record_exit_status:
        launcher = TaskLauncher(task_user=task_user, cgroup_home=cgroups.make_launcher_home())
        launchers.append(launcher)
    return TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        time.time,
        ACCELERATORS,
        lambda uuids: {"CUDA_VISIBLE_DEVICES": ",".join(uuids)},
        launcher=launcher,
        task_user=task_user,
        task_cgroups=cgroups,
        cleanup_backoff=cleanup_backoff,
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _spec(task_id: str, code: str, *args: str, grace_period_s: float = 0.5) -> TaskSpec:
    command = (*python_command(code), *args)
    return TaskSpec("j", task_id, ("GPU-1",), command, grace_period_s=grace_period_s)


async def _start_and_stop_daemon(runner: TaskRunner, recorder: Recorder, pid_file: Path) -> int:
    """Start a task that leaves a daemon with a cleared environment, stop the task, and return
    the daemon's pid."""
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", CLEARED_DAEMON, str(pid_file)))
        await wait_for(pid_file.exists)
        daemon = int(pid_file.read_text())  # noqa: ASYNC240 - a file of a few bytes
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))
    return daemon


@pytest.mark.timeout(60)
async def test_stop_kills_cleared_daemon(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    pid_file = tmp_path / "daemon.pid"
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", CLEARED_DAEMON, str(pid_file)))
        await wait_for(pid_file.exists)
        daemon = int(pid_file.read_text())
        with open(f"/proc/{daemon}/environ", "rb") as environ:  # noqa: ASYNC230 - /proc
            assert environ.read() == b""
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))
    assert not _alive(daemon)
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()


@pytest.mark.timeout(60)
async def test_cleared_daemon_escapes_without_cgroup(tmp_path: Path) -> None:
    # The control for the test above: the spawn id search cannot find such a daemon.
    pid_file = tmp_path / "daemon.pid"
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder)
    daemon = await _start_and_stop_daemon(runner, recorder, pid_file)
    try:
        assert _alive(daemon)
    finally:
        os.kill(daemon, signal.SIGKILL)


@pytest.mark.timeout(60)
async def test_task_end_kills_and_removes_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    pid_file = tmp_path / "daemon.pid"
    # The task ends on its own once its daemon runs.
    code = CLEARED_DAEMON.rsplit("time.sleep(60)", 1)[0]
    code += "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", code, str(pid_file)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("j/1/0"))
    assert not _alive(int(pid_file.read_text()))
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()
    assert (cgroup_root / "launcher").is_dir()


@pytest.mark.timeout(60)
async def test_task_runs_in_own_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    code = "print(open('/proc/self/cgroup').read().splitlines()[-1])"
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", code))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("j/1/0"))
    output = recorder.last("j/1/0").output_tail
    assert output.strip().endswith(f"/{cgroup_root.name}/{cgroup_name('j/1/0')}")
    launcher_pid = launchers[0].identity[0]
    with open(f"/proc/{launcher_pid}/cgroup") as file:  # noqa: ASYNC230 - /proc
        launcher_cgroup = file.read().splitlines()[-1]
    assert launcher_cgroup.endswith(f"/{cgroup_root.name}/launcher")
    # cgroup.procs moves every thread of the launcher, so it must run only one.
    assert len(os.listdir(f"/proc/{launcher_pid}/task")) == 1


@pytest.mark.timeout(60)
async def test_task_user_start_joins_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to a task user needs root")
    # Root as the task user takes the launcher's subprocess.Popen path without a new user.
    user = TaskUser("root", 0, 0, (), "/root")
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers, task_user=user)
    pid_file = tmp_path / "daemon.pid"
    daemon = await _start_and_stop_daemon(runner, recorder, pid_file)
    assert not _alive(daemon)
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()


@pytest.mark.timeout(60)
async def test_start_without_launcher_joins_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    pid_file = tmp_path / "daemon.pid"
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers, record_exit_status=False)
    daemon = await _start_and_stop_daemon(runner, recorder, pid_file)
    assert not _alive(daemon)
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()


@pytest.mark.timeout(60)
async def test_start_fails_without_cgroup_folder(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    # The folder goes away after the agent checked it.
    runner._cgroups = TaskCgroups(cgroup_root / "removed")
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", "pass"))
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    assert "No such file or directory" in recorder.last("j/1/0").reason
    assert "j/1/0" not in runner._tasks
    assert runner._state.node("acme.eu-1.node-1").intents == {}


@pytest.mark.timeout(60)
async def test_restart_adopts_task_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    pid_file = tmp_path / "daemon.pid"
    runner = contained_runner(tmp_path, Recorder(), cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", CLEARED_DAEMON, str(pid_file)))
        await wait_for(pid_file.exists)
        # The agent dies here: its supervisors stop, the task goes on.
        task = runner._tasks["j/1/0"]
        assert task.supervisor is not None
        task.supervisor.cancel()
    for launcher in launchers:
        launcher.close()
    daemon = int(pid_file.read_text())

    recorder = Recorder()
    restarted = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        assert restarted._tasks["j/1/0"].cgroup == cgroup_root / cgroup_name("j/1/0")
        await restarted.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))
    assert not _alive(daemon)
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()


@pytest.mark.timeout(60)
async def test_restart_kills_ended_task_cgroup(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    pid_file = tmp_path / "daemon.pid"
    code = "import time\ntime.sleep(0.3)\n" + CLEARED_DAEMON.rsplit("time.sleep(60)", 1)[0]
    runner = contained_runner(tmp_path, Recorder(), cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", code, str(pid_file)))
        task = runner._tasks["j/1/0"]
        assert task.supervisor is not None
        task.supervisor.cancel()
    assert task.process is not None
    await task.process.wait()
    await wait_for(pid_file.exists)
    daemon = int(pid_file.read_text())
    assert _alive(daemon)

    recorder = Recorder()
    restarted = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
        await wait_for(lambda: recorder.states("j/1/0") != [])
    assert recorder.states("j/1/0") == [TaskState.SUCCEEDED]
    assert not _alive(daemon)
    assert not (cgroup_root / cgroup_name("j/1/0")).exists()


# CLEARED_DAEMON in shell, for a task user that cannot execute this interpreter: setsid(1)
# calls setsid in the background child, which is no group leader, and env -i clears the
# environment. The daemon writes its pid to the file $1 once it runs.
SHELL_DAEMON = (
    'setsid env -i /bin/sh -c \'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 60\' '
    '"$1" & sleep 60'
)

NON_ROOT_AGENT = """
import asyncio, sys
from pathlib import Path
from agents.model import TaskState
from agents.task_cgroups import check_task_cgroup
from tests.agent.test_runner import Recorder, wait_for
from agents.model import TaskSpec
from tests.agent.test_task_cgroups import SHELL_DAEMON, _alive, contained_runner

async def main():
    root, work = Path(sys.argv[1]), Path(sys.argv[2])
    check_task_cgroup(root)
    launchers, recorder = [], Recorder()
    runner = contained_runner(work, recorder, root, launchers)
    pid_file = work / "daemon.pid"
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        command = ("/bin/sh", "-c", SHELL_DAEMON, "sh", str(pid_file))
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-1",), command, grace_period_s=0.5))
        await wait_for(pid_file.exists)
        daemon = int(pid_file.read_text())  # noqa: ASYNC240 - a file of a few bytes
        await runner.stop("j/1/0", "preempted")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))
    for launcher in launchers:
        launcher.close()
    print(_alive(daemon), sorted(path.name for path in root.iterdir() if path.is_dir()))

asyncio.run(main())
"""
"""An agent that is not root, in the delegated folder as systemd's Delegate=yes puts it: it
checks the folder, starts a task whose daemon clears its environment, and stops it."""

NOBODY = 65534


def _as_nobody(command: list[str]) -> list[str]:
    # CAP_DAC_READ_SEARCH reaches this interpreter and the repository wherever they are.
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--",
        *command,
    ]


def _delegate(root: Path) -> None:
    for path in (root, root / "cgroup.procs", root / "cgroup.subtree_control"):
        os.chown(path, NOBODY, NOBODY)


@pytest.mark.timeout(60)
def test_non_root_agent_in_delegated_cgroup(tmp_path: Path, cgroup_root: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run an agent as another user")
    _delegate(cgroup_root)
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    agent = _as_nobody([sys.executable, "-c", NON_ROOT_AGENT, str(cgroup_root), str(work)])
    # The shell moves itself into the folder, then becomes the agent.
    shell = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
    command = ["sh", "-c", shell, "sh", str(cgroup_root), *agent]

    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=40)

    assert done.returncode == 0, done.stderr
    alive, folders = done.stdout.split(" ", 1)
    assert alive == "False"
    assert folders.strip() == "['launcher']"


@pytest.mark.timeout(60)
def test_non_root_agent_outside_rejected(cgroup_root: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run an agent as another user")
    _delegate(cgroup_root)
    check = f"from agents.task_cgroups import check_task_cgroup as c; c(Path({str(cgroup_root)!r}))"
    command = _as_nobody([sys.executable, "-c", f"from pathlib import Path\n{check}"])

    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=40)

    assert done.returncode != 0
    assert "TaskCgroupError" in done.stderr
    assert f"outside {cgroup_root}" in done.stderr
    assert "run the agent inside the folder" in done.stderr


@pytest.mark.timeout(60)
async def test_restart_removes_cgroup_of_unspawned_task(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    # The agent stopped after it saved the intent and made the cgroup, before the spawn.
    runner = contained_runner(tmp_path, Recorder(), cgroup_root, launchers)
    spec = _spec("j/1/0", "pass")
    runner.prepare_start(spec)
    runner._state.save_intents()
    cgroup = TaskCgroups(cgroup_root).create("j/1/0")

    recorder = Recorder()
    restarted = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        restarted.attach(group)
        restarted.recover()
    assert recorder.states("j/1/0") == []
    assert not cgroup.exists()


@pytest.mark.timeout(60)
async def test_failed_start_kills_spawned_process(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    # The launcher spawned the task, then died or fell silent before its reply, so the start
    # fails and the scheduler places the job elsewhere while the process runs on here.
    recorder = Recorder()
    runner = contained_runner(tmp_path, recorder, cgroup_root, launchers)
    launcher = launchers[0]
    real_launch = launcher.launch
    spawned: list[int] = []

    def launch_without_reply(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def fail(done: asyncio.Future[Any]) -> None:
            spawned.append(done.result().pid)
            lost.set_exception(OSError(errno.EPIPE, "the task launcher exited"))

        real_launch(*args, **kwargs).add_done_callback(fail)
        return lost

    launcher.launch = launch_without_reply  # type: ignore[method-assign]
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", "import time; time.sleep(60)"))
        await wait_for(lambda: TaskState.START_FAILED in recorder.states("j/1/0"))
    cgroup = cgroup_root / cgroup_name("j/1/0")
    await wait_for(lambda: not _alive(spawned[0]))
    assert not cgroup.exists()


def test_cgroup_names_are_safe_and_distinct() -> None:
    assert cgroup_name("job-1.0") == "task-job-1.0"
    slashed = cgroup_name("j/1/0")
    underscored = cgroup_name("j_1_0")
    assert "/" not in slashed
    assert slashed != underscored
    assert slashed.startswith("task-j_1_0-")
    assert len(cgroup_name("x" * 1000)) < 255


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("acsp.slice", "not an absolute path"),
        ("/sys/fs/cgroup/../cgroup", "contains . or .."),
        ("/sys/fs/cgroup//acsp", "contains . or .."),
    ],
)
def test_parse_rejects_bad_paths(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_task_cgroup(text)


def test_setting_names_variable_on_bad_path() -> None:
    with pytest.raises(SettingsError) as raised:
        AgentSettings.from_env({TASK_CGROUP_ENV: "relative/path"})
    assert raised.value.variable == TASK_CGROUP_ENV
    assert "not an absolute path" in str(raised.value)


def test_check_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TaskCgroupError, match="is not a folder"):
        check_task_cgroup(tmp_path / "missing")


def test_check_rejects_folder_outside_cgroup2(tmp_path: Path) -> None:
    with pytest.raises(TaskCgroupError, match="not cgroup2") as raised:
        check_task_cgroup(tmp_path)
    assert "cgroup v2 mount" in raised.value.fix


def test_check_rejects_root_cgroup() -> None:
    mounts = [mount for mount in _writable_cgroup2_mounts() if mount.is_dir()]
    roots = [mount for mount in mounts if not (mount / "cgroup.kill").exists()]
    if not roots:
        pytest.skip("no cgroup v2 mount shows a root cgroup here")
    with pytest.raises(TaskCgroupError, match=r"no cgroup\.kill file"):
        check_task_cgroup(roots[0])


def test_check_accepts_delegated_cgroup(cgroup_root: Path) -> None:
    check_task_cgroup(cgroup_root)
    assert [path.name for path in cgroup_root.iterdir() if path.is_dir()] == []


def test_agent_start_rejects_bad_cgroup(tmp_path: Path) -> None:
    settings = AgentSettings.from_env({TASK_CGROUP_ENV: str(tmp_path)})
    with pytest.raises(SettingsError) as raised:
        agent_main._task_cgroups(settings)
    assert raised.value.variable == TASK_CGROUP_ENV
    assert "not cgroup2" in str(raised.value)


def test_agent_start_makes_launcher_cgroup(cgroup_root: Path) -> None:
    settings = AgentSettings.from_env({TASK_CGROUP_ENV: str(cgroup_root)})
    cgroups = agent_main._task_cgroups(settings)
    assert cgroups is not None
    assert cgroups.launcher_home == cgroup_root / "launcher"
    assert cgroups.launcher_home.is_dir()


FAST_RETRIES = Backoff(first_s=0.05, max_s=0.2)


@pytest.mark.timeout(60)
async def test_populated_cgroup_removed_on_retry(
    tmp_path: Path,
    cgroup_root: Path,
    launchers: list[TaskLauncher],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pid_file = tmp_path / "daemon.pid"
    # The task ends on its own once its daemon runs.
    code = CLEARED_DAEMON.rsplit("time.sleep(60)", 1)[0]
    code += "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
    real_kill_members = task_cgroups.kill_members
    stuck = [True]

    def kill_unless_stuck(cgroup: Path) -> bool:
        # Stands in for processes in uninterruptible sleep, which cgroup.kill does not end.
        return cgroup.is_dir() if stuck[0] else real_kill_members(cgroup)

    monkeypatch.setattr(task_cgroups, "kill_members", kill_unless_stuck)
    monkeypatch.setattr(task_cgroups, "_EMPTY_WAIT_S", 0.2)
    recorder = Recorder()
    runner = contained_runner(
        tmp_path, recorder, cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    cgroup = cgroup_root / cgroup_name("j/1/0")
    with caplog.at_level(logging.DEBUG, logger="agents"):
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                runner.attach(group)
                await runner.start(_spec("j/1/0", code, str(pid_file)))
                await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("j/1/0"))
                daemon = int(pid_file.read_text())
                await wait_for(lambda: len(_messages(caplog, "still has processes")) >= 3)
                left_while_stuck = cgroup.is_dir() and _alive(daemon)
                stuck[0] = False
                await wait_for(lambda: not cgroup.exists())
    assert left_while_stuck
    assert not _alive(daemon)
    first = _messages(caplog, "still has processes")[0]
    assert first.levelno == logging.ERROR
    assert str(daemon) in first.getMessage()
    assert _messages(caplog, f"cgroup {cgroup} of task j/1/0 removed after")


@pytest.mark.timeout(60)
async def test_failed_start_spares_launcher_in_cgroup(
    tmp_path: Path,
    cgroup_root: Path,
    launchers: list[TaskLauncher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The launcher spawned the task and then fell silent before it moved back out of the
    # task's cgroup, as a launcher blocked there does. The start fails, and the task's
    # processes are killed, but the launcher still records the exits of its other tasks.
    recorder = Recorder()
    runner = contained_runner(
        tmp_path, recorder, cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    launcher = launchers[0]
    real_launch = launcher.launch
    spawned: list[int] = []
    cgroup = cgroup_root / cgroup_name("j/1/0")

    def launch_without_reply(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def fail(done: asyncio.Future[Any]) -> None:
            spawned.append(done.result().pid)
            (cgroup / "cgroup.procs").write_text(str(launcher.identity[0]))
            lost.set_exception(OSError(errno.EPIPE, "no reply from the task launcher"))

        real_launch(*args, **kwargs).add_done_callback(fail)
        return lost

    launcher.launch = launch_without_reply  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="agents.task_cgroups"):
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                runner.attach(group)
                await runner.start(_spec("j/1/0", "import time; time.sleep(60)"))
                launcher_pid = launcher.identity[0]
                await wait_for(lambda: TaskState.START_FAILED in recorder.states("j/1/0"))
                await wait_for(lambda: not _alive(spawned[0]))
                await wait_for(lambda: len(_messages(caplog, "still has processes")) >= 2)
                launcher_alive = _alive(launcher_pid)
                kept_while_inside = cgroup.is_dir()
                # The launcher wakes and moves itself back.
                (cgroup_root / "launcher" / "cgroup.procs").write_text(str(launcher_pid))
                await wait_for(lambda: not cgroup.exists())
    assert launcher_alive
    assert kept_while_inside
    assert _alive(launcher_pid)
    spared = _messages(caplog, f"task launcher {launcher_pid} is in cgroup")
    assert spared[0].levelno == logging.WARNING


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


@pytest.mark.timeout(60)
async def test_start_rejected_while_cgroup_retried(
    tmp_path: Path,
    cgroup_root: Path,
    launchers: list[TaskLauncher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent stopped after it made the cgroup and before the spawn, and a process stuck in
    # the kernel sits in the cgroup. The redelivered start comes while the removal retries.
    real_kill_members = task_cgroups.kill_members
    stuck = [True]

    def kill_unless_stuck(cgroup: Path) -> bool:
        return cgroup.is_dir() if stuck[0] else real_kill_members(cgroup)

    monkeypatch.setattr(task_cgroups, "kill_members", kill_unless_stuck)
    monkeypatch.setattr(task_cgroups, "_EMPTY_WAIT_S", 0.2)
    runner = contained_runner(tmp_path, Recorder(), cgroup_root, launchers)
    spec = _spec("j/1/0", "import time; time.sleep(2)")
    runner.prepare_start(spec)
    runner._state.save_intents()
    cgroup = TaskCgroups(cgroup_root).create("j/1/0")
    sleeper = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        (cgroup / "cgroup.procs").write_text(str(sleeper.pid))
        recorder = Recorder()
        restarted = contained_runner(
            tmp_path, recorder, cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
        )
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                restarted.attach(group)
                restarted.recover()
                await restarted.start(spec)
                await wait_for(lambda: bool(recorder.states("j/1/0")))
                stuck[0] = False
                await wait_for(lambda: not cgroup.exists())
                await wait_for(lambda: len(recorder.states("j/1/0")) > 1 or not restarted.running)
    finally:
        with contextlib.suppress(ProcessLookupError):
            sleeper.kill()
        await sleeper.wait()
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    assert recorder.last("j/1/0").node_busy


def test_one_by_one_kill_skips_reused_pid(
    cgroup_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A member listed in cgroup.procs exits before its SIGKILL, and its pid goes to a process
    # outside the cgroup, which the kill must not reach.
    cgroup = TaskCgroups(cgroup_root).create("j/1/0")
    launcher = subprocess.Popen(["sleep", "60"])
    member = subprocess.Popen(["sleep", "60"])
    outside = subprocess.Popen(["sleep", "60"])
    try:
        for process in (launcher, member):
            (cgroup / "cgroup.procs").write_text(str(process.pid))
        real_member_pids = task_cgroups.member_pids
        listed = [False]

        def member_pids_with_reused(path: Path) -> list[int]:
            pids = real_member_pids(path)
            if listed[0]:
                return pids
            listed[0] = True
            return [*pids, outside.pid]

        monkeypatch.setattr(task_cgroups, "member_pids", member_pids_with_reused)
        ticks = process_start_ticks(launcher.pid)
        assert ticks is not None
        task_cgroups._kill(cgroup, "j/1/0", [(launcher.pid, ticks)])
        member.wait(timeout=10)
        # SIGKILL takes effect a moment after the call that sends it returns.
        try:
            outside.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        outside_alive = outside.returncode is None
        launcher_alive = launcher.poll() is None
    finally:
        for process in (launcher, member, outside):
            process.kill()
            process.wait()
    assert outside_alive
    assert launcher_alive
    assert member.returncode == -signal.SIGKILL


async def _sleeper_in(cgroup: Path) -> asyncio.subprocess.Process:
    """Start ``sleep 60`` and move it into ``cgroup``."""
    sleeper = await asyncio.create_subprocess_exec("sleep", "60")
    (cgroup / "cgroup.procs").write_text(str(sleeper.pid))
    return sleeper


@pytest.mark.timeout(60)
async def test_restart_removes_stale_cgroup(
    tmp_path: Path,
    cgroup_root: Path,
    launchers: list[TaskLauncher],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The task ends and leaves a daemon that SIGKILL does not end at once, and the agent
    # stops while it retries the cgroup. The state file no longer lists the task.
    pid_file = tmp_path / "daemon.pid"
    code = CLEARED_DAEMON.rsplit("time.sleep(60)", 1)[0]
    code += "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
    real_kill_members = task_cgroups.kill_members
    stuck = [True]

    def kill_unless_stuck(cgroup: Path) -> bool:
        return cgroup.is_dir() if stuck[0] else real_kill_members(cgroup)

    monkeypatch.setattr(task_cgroups, "kill_members", kill_unless_stuck)
    monkeypatch.setattr(task_cgroups, "_EMPTY_WAIT_S", 0.2)
    cgroup = cgroup_root / cgroup_name("j/1/0")
    runner = contained_runner(
        tmp_path, Recorder(), cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    with caplog.at_level(logging.DEBUG, logger="agents"):
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                runner.attach(group)
                await runner.start(_spec("j/1/0", code, str(pid_file)))
                await wait_for(lambda: len(_messages(caplog, "still has processes")) >= 2)
                await asyncio.wait(runner.detach())
    daemon = int(pid_file.read_text())
    assert "j/1/0" not in runner._state.node("acme.eu-1.node-1").tasks

    restarted = contained_runner(
        tmp_path, Recorder(), cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="agents"):
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                restarted.attach(group)
                restarted.recover()
                found = remove_stale_cgroups([restarted])
                await wait_for(lambda: len(_messages(caplog, "still has processes")) >= 2)
                kept_while_stuck = cgroup.is_dir() and _alive(daemon)
                stuck[0] = False
                await wait_for(lambda: not cgroup.exists())
    assert found == 1
    assert kept_while_stuck
    assert not _alive(daemon)
    assert (cgroup_root / "launcher").is_dir()
    assert _messages(caplog, f"cgroup {cgroup} belongs to no task")


@pytest.mark.timeout(60)
async def test_stale_cgroup_spares_recording_launcher(
    tmp_path: Path, cgroup_root: Path, launchers: list[TaskLauncher]
) -> None:
    # The launcher of the agent that stopped still records the exit of a task that the
    # restarted agent adopts, and it sits in a stale cgroup, as one blocked between its moves.
    runner = contained_runner(tmp_path, Recorder(), cgroup_root, launchers)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(_spec("j/1/0", "import time; time.sleep(60)"))
        task = runner._tasks["j/1/0"]
        assert task.supervisor is not None
        task.supervisor.cancel()
    old_launcher = launchers[0].identity[0]
    for launcher in launchers:
        launcher.close()
    stale = TaskCgroups(cgroup_root).create("j/0/0")
    sleeper = await _sleeper_in(stale)
    (stale / "cgroup.procs").write_text(str(old_launcher))

    recorder = Recorder()
    restarted = contained_runner(
        tmp_path, recorder, cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    try:
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                restarted.attach(group)
                restarted.recover()
                assert remove_stale_cgroups([restarted]) == 1
                assert await sleeper.wait() == -signal.SIGKILL
                launcher_alive = _alive(old_launcher)
                kept_while_inside = stale.is_dir()
                # The launcher wakes and moves itself back.
                (cgroup_root / "launcher" / "cgroup.procs").write_text(str(old_launcher))
                await wait_for(lambda: not stale.exists())
                await restarted.stop("j/1/0", "preempted")
                await wait_for(lambda: TaskState.STOPPED in recorder.states("j/1/0"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            sleeper.kill()
        await sleeper.wait()
    assert launcher_alive
    assert kept_while_inside
    # The launcher recorded the exit of the task it started: SIGTERM.
    assert recorder.last("j/1/0").exit_code == -signal.SIGTERM


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


@pytest.mark.timeout(60)
async def test_agent_start_keeps_other_nodes_cgroups(
    tmp_path: Path, cgroup_root: Path, nats_server: NatsServer
) -> None:
    # Two nodes of one agent process share the cgroup folder. The first node's start must not
    # take the second node's running task for a stale one.
    refs = [wire.NodeRef("acme", "eu-1", f"node-{index}") for index in (1, 2)]
    cgroups = TaskCgroups(cgroup_root)
    state = StateStore(tmp_path / "state.json")
    running = await _sleeper_in(cgroups.create("j/2/0"))
    stale = cgroups.create("j/0/0")
    left = await _sleeper_in(stale)
    state.put_task(
        refs[1].key,
        TaskRecord(
            "j",
            "j/2/0",
            ["GPU-0"],
            time.time(),
            0.0,
            5.0,
            pid=running.pid,
            process_start_ticks=process_start_ticks(running.pid) or 0,
            spawn_id="spawn-j-2-0",
        ),
    )
    state.save()

    outbox = Outbox(Spool(tmp_path / "spool"), before_append=state.save_before_spool)
    nodes = [
        NodeAgent(
            ref,
            SimulatedBackend(FleetNode(ref.provider, ref.region, ref.node, "A100-SXM4-80GB", 2)),
            "simulated",
            state,
            tmp_path,
            outbox,
            "boot-1",
            time.time,
            task_cgroups=cgroups,
        )
        for ref in refs
    ]
    process = AgentProcess(
        nodes, outbox, state, ConnectionOptions(servers=[nats_server.url], reconnect_wait_s=0.2)
    )
    stop = asyncio.Event()

    try:
        async with asyncio.timeout(30):
            agent = asyncio.create_task(process.run(stop))
            await wait_for(lambda: not stale.exists())
            adopted = [record.task_id for record in nodes[1].runner.running]  # type: ignore[union-attr]
            stop.set()
            await agent

        assert await left.wait() == -signal.SIGKILL
        assert adopted == ["j/2/0"]
        assert running.returncode is None
        assert (cgroup_root / cgroup_name("j/2/0")).is_dir()
    finally:
        for sleeper in (running, left):
            with contextlib.suppress(ProcessLookupError):
                sleeper.kill()
            await sleeper.wait()


@pytest.mark.timeout(60)
async def test_start_rejected_while_stale_cgroup_removed(
    tmp_path: Path,
    cgroup_root: Path,
    launchers: list[TaskLauncher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The previous agent stopped while it retried the cgroup of a start that failed before the
    # task's log was opened, and a process stuck in the kernel keeps that cgroup. The state
    # file no longer lists the task, and its redelivered start comes while the restarted agent
    # retries the removal, which would kill the task too.
    real_kill_members = task_cgroups.kill_members
    stuck = [True]

    def kill_unless_stuck(cgroup: Path) -> bool:
        return cgroup.is_dir() if stuck[0] else real_kill_members(cgroup)

    monkeypatch.setattr(task_cgroups, "kill_members", kill_unless_stuck)
    monkeypatch.setattr(task_cgroups, "_EMPTY_WAIT_S", 0.2)
    cgroup = TaskCgroups(cgroup_root).create("j/1/0")
    left = await _sleeper_in(cgroup)
    recorder = Recorder()
    runner = contained_runner(
        tmp_path, recorder, cgroup_root, launchers, cleanup_backoff=FAST_RETRIES
    )
    try:
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                runner.attach(group)
                runner.recover()
                found = remove_stale_cgroups([runner])
                await runner.start(_spec("j/1/0", "import time; time.sleep(60)"))
                await wait_for(lambda: bool(recorder.states("j/1/0")))
                members_while_stuck = member_pids(cgroup)
                stuck[0] = False
                await wait_for(lambda: not cgroup.exists())
                running = list(runner.running)
    finally:
        with contextlib.suppress(ProcessLookupError):
            left.kill()
        await left.wait()
    assert found == 1
    assert members_while_stuck == [left.pid]
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    assert recorder.last("j/1/0").node_busy
    assert running == []


def test_agent_start_rejects_locked_cgroup(cgroup_root: Path) -> None:
    settings = AgentSettings.from_env({TASK_CGROUP_ENV: str(cgroup_root)})
    first = agent_main._task_cgroups(settings)
    assert first is not None
    try:
        with pytest.raises(SettingsError) as raised:
            agent_main._task_cgroups(settings)
        first.unlock()
        second = agent_main._task_cgroups(settings)
    finally:
        first.unlock()
    assert second is not None
    second.unlock()
    assert raised.value.variable == TASK_CGROUP_ENV
    assert f"another agent uses the task cgroups in {cgroup_root}" in str(raised.value)
