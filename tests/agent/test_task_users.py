"""A pool of task users (``ACSP_AGENT_TASK_USERS``): each job on a node runs as its own uid.

The process tests run real tasks as uids from :data:`POOL_UIDS`, which have no entry in the
user database and run as the group ``nogroup`` (65534). They need root, and are skipped
otherwise. The parsing, the settings and the pool's bookkeeping are checked as any user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from acsp.v1 import agent_pb2, scheduler_pb2
from agents import task_users, wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.backoff import Backoff
from agents.checkpoints import CheckpointFiles
from agents.main import check_isolation
from agents.model import TaskSpec, TaskState
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.runner import TaskRunner
from agents.scratch_folders import ScratchSweeper
from agents.settings import AgentSettings
from agents.spool import Spool
from agents.state import StateStore
from agents.task_process import TaskLauncher, process_start_ticks, stat_fields
from agents.task_user import NON_ROOT_CAPABILITIES, TaskUser, check_agent_can_switch
from agents.task_users import (
    JOB_FOLDER_MODE,
    MAX_POOL_USERS,
    POOL_TASK_FOLDER_MODE,
    TASK_USERS_ENV,
    TaskUserPool,
    job_folder,
    kill_user_processes,
    make_job_folder,
    make_jobs_folder,
    parse_task_users,
)
from services.runtime.settings import SettingsError
from tests.agent.helpers import NODE as NODE_REF
from tests.agent.helpers import ManualClock
from tests.agent.test_runner import Recorder, wait_for
from tests.agent.test_task_user import REPOSITORY, _ensure_test_user, _run_agent

pytestmark = pytest.mark.timeout(60)

POOL_UIDS = (64100, 64101)
NOGROUP = 65534
POOL_TEXT = f"{POOL_UIDS[0]}-{POOL_UIDS[-1]}:{NOGROUP}"
NODE = "acme.eu-1.node-1"
PATHS = pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _user(uid: int) -> TaskUser:
    return TaskUser(str(uid), uid, NOGROUP, (), "")


# Parsing and settings ------------------------------------------------------------------------


def test_pool_parsing_of_ranges_and_lists() -> None:
    users = parse_task_users(f"{POOL_TEXT}, 64200:{NOGROUP},nobody")
    assert [user.uid for user in users[:3]] == [64100, 64101, 64200]
    assert all(user.gid == NOGROUP for user in users[:3])
    assert users[3].name == "nobody"
    assert parse_task_users(f"64300-64300:{NOGROUP}")[0].uid == 64300


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("64100:65534,,64101:65534", "the list has an empty item"),
        ("64101-64100:65534", "range 64101-64100 is empty: 64101 is above 64100"),
        (f"1-{MAX_POOL_USERS + 1}:65534", f"range 1-{MAX_POOL_USERS + 1} has more than"),
        ("64100-64101:65534,64101:65534", "uid 64101 is listed twice"),
        ("64100-64101", "'64100': uid 64100 has no entry in the user database"),
        ("no-such-acsp-user", "'no-such-acsp-user': no user 'no-such-acsp-user'"),
        ("root", "'root': it is root (uid 0)"),
        ("64100:0", "its groups include root (gid 0)"),
    ],
)
def test_pool_parsing_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_task_users(text)
    assert reason in str(raised.value)


def test_invalid_pool_setting_names_fix() -> None:
    with pytest.raises(SettingsError) as raised:
        AgentSettings.from_env({TASK_USERS_ENV: "64101-64100:65534"})
    message = str(raised.value)
    assert f"{TASK_USERS_ENV}: '64101-64100:65534' is invalid" in message
    assert "range 64101-64100 is empty" in message
    assert "fix: set it to the pool of unprivileged users that tasks run as" in message


def test_pool_with_single_task_user_rejected() -> None:
    environ = {TASK_USERS_ENV: POOL_TEXT, "ACSP_AGENT_TASK_USER": "nobody"}
    with pytest.raises(SettingsError) as raised:
        AgentSettings.from_env(environ)
    error = raised.value
    assert error.variable == TASK_USERS_ENV
    assert "set together with ACSP_AGENT_TASK_USER=nobody" in str(error)
    assert "unset ACSP_AGENT_TASK_USER, or add that user to the pool" in str(error)


def test_invalid_pool_fails_agent_start(tmp_path: Path) -> None:
    done = _run_agent(tmp_path, {TASK_USERS_ENV: "nobody,no-such-acsp-user"})
    assert done.returncode == 2
    assert f"{TASK_USERS_ENV}: 'nobody,no-such-acsp-user' is invalid" in done.stderr
    assert "'no-such-acsp-user': no user 'no-such-acsp-user' in the user database" in done.stderr


@root_only
def test_non_root_agent_without_capabilities_fails_start(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("setpriv or useradd is not installed")
    agent = _ensure_test_user()
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, agent.uid, agent.gid)
    # As in the single task user's test: it may read the interpreter, and switch no user.
    prefix = ["setpriv", f"--reuid={agent.uid}", f"--regid={agent.gid}", "--clear-groups"]
    prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    done = _run_agent(tmp_path, {TASK_USERS_ENV: POOL_TEXT}, prefix)
    assert done.returncode == 2, done.stderr
    assert f"{TASK_USERS_ENV}: the agent runs as uid {agent.uid} without" in done.stderr
    assert "ambient CAP_SETUID, ambient CAP_SETGID" in done.stderr


@root_only
def test_pool_checks_warn_once_per_file(
    reachable_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = reachable_folder / "nats.creds"
    key.write_text("secret")
    key.chmod(0o644)
    state = reachable_folder / "state"
    state.mkdir(mode=0o711)
    environ = {
        TASK_USERS_ENV: POOL_TEXT,
        "ACSP_AGENT_STATE_DIR": str(state),
        "ACSP_NATS_CREDS": str(key),
    }
    with caplog.at_level(logging.WARNING):
        check_isolation(AgentSettings.from_env(environ))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"ACSP_NATS_CREDS={key} (mode 644) is readable")


@root_only
def test_pool_user_without_state_dir_access(reachable_folder: Path) -> None:
    state = reachable_folder / "state"
    state.mkdir(mode=0o700)
    environ = {TASK_USERS_ENV: POOL_TEXT, "ACSP_AGENT_STATE_DIR": str(state)}
    with pytest.raises(SettingsError) as raised:
        check_isolation(AgentSettings.from_env(environ))
    assert raised.value.variable == "ACSP_AGENT_STATE_DIR"
    assert f"not searchable by the task user {POOL_UIDS[0]} (uid {POOL_UIDS[0]}" in str(
        raised.value
    )


def test_pool_setting_read() -> None:
    settings = AgentSettings.from_env({TASK_USERS_ENV: POOL_TEXT})
    assert [user.uid for user in settings.task_users] == list(POOL_UIDS)
    assert settings.task_user is None
    assert AgentSettings.from_env({}).task_users == ()


def test_switch_check_names_pool_setting() -> None:
    status = "CapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n"
    with pytest.raises(SettingsError) as raised:
        check_agent_can_switch(
            _user(64100), True, euid=1000, status_text=status, variable=TASK_USERS_ENV
        )
    assert raised.value.variable == TASK_USERS_ENV
    assert str(raised.value).startswith(f"{TASK_USERS_ENV}: the agent runs as uid 1000 without")
    with pytest.raises(SettingsError) as own:
        check_agent_can_switch(_user(1000), True, euid=1000, variable=TASK_USERS_ENV)
    assert own.value.variable == TASK_USERS_ENV


# The pool's bookkeeping ----------------------------------------------------------------------


def test_pool_gives_each_job_its_user() -> None:
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS])
    first = pool.acquire("a", "a/1/0")
    second = pool.acquire("b", "b/1/0")
    assert first is not None and second is not None
    assert first.uid != second.uid
    assert pool.acquire("a", "a/1/1") == first
    assert pool.acquire("c", "c/1/0") is None
    assert pool.free_users == 0


def test_pool_frees_user_after_last_task() -> None:
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS])
    user = pool.acquire("a", "a/1/0")
    pool.acquire("a", "a/1/1")
    assert user is not None
    assert pool.release("a/1/0") is None
    assert pool.release("a/1/1") == (user.uid, "a")
    assert not pool.has_user("a")
    # Released but not yet swept: no other job gets it.
    assert pool.free_users == 1
    pool.freed(user.uid)
    assert pool.free_users == 2
    assert pool.release("a/1/1") is None


def test_pool_reuses_user_freed_longest_ago() -> None:
    pool = TaskUserPool([_user(uid) for uid in (64100, 64101, 64102)])
    for job in ("a", "b"):
        pool.acquire(job, f"{job}/1/0")
    for job in ("b", "a"):
        released = pool.release(f"{job}/1/0")
        assert released is not None
        pool.freed(released[0])
    order = [pool.acquire(job, f"{job}/1/0") for job in ("c", "d", "e")]
    assert [user.uid for user in order if user is not None] == [64102, 64101, 64100]


def test_pool_claims_recovered_user() -> None:
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS])
    assert pool.claim("a", "a/1/0", POOL_UIDS[1])
    assert not pool.claim("x", "x/1/0", 4242)
    assert pool.acquire("a", "a/1/1") == _user(POOL_UIDS[1])
    assert pool.acquire("b", "b/1/0") == _user(POOL_UIDS[0])
    assert pool.acquire("c", "c/1/0") is None


def test_pool_user_claimed_by_two_jobs() -> None:
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS])
    assert pool.claim("a", "a/1/0", POOL_UIDS[0])
    assert pool.claim("b", "b/1/0", POOL_UIDS[0])
    assert pool.acquire("b", "b/1/1") == _user(POOL_UIDS[1])
    assert pool.release("a/1/0") is None
    assert pool.release("b/1/0") == (POOL_UIDS[0], "a")
    assert pool.has_user("b")
    assert not pool.has_user("a")


class StuckProcesses:
    """Stands in for :func:`kill_user_processes` with processes that outlive SIGKILL.

    The uids in ``stuck`` keep processes, as ones in uninterruptible sleep do, until a test
    takes them out. ``calls`` counts the calls.
    """

    def __init__(self, stuck: Collection[int]) -> None:
        self.stuck = set(stuck)
        self.calls = 0

    def __call__(self, uids: Collection[int]) -> set[int]:
        self.calls += 1
        return self.stuck & set(uids)


FAST_RETRIES = Backoff(first_s=0.01, max_s=0.04)


async def test_stuck_unused_user_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A process of a user that a job left while the agent was down does not die at once.
    stuck = StuckProcesses([POOL_UIDS[0]])
    monkeypatch.setattr(task_users, "kill_user_processes", stuck)
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS], backoff=FAST_RETRIES)
    with caplog.at_level(logging.INFO, logger="agents.task_users"):
        async with asyncio.timeout(10):
            async with asyncio.TaskGroup() as group:
                await pool.sweep_once(tmp_path, group)
                held_while_stuck = pool.held_users
                free_while_stuck = pool.free_users
                await wait_for(lambda: stuck.calls >= 4)
                stuck.stuck.clear()
                await wait_for(lambda: pool.free_users == 2)
    assert held_while_stuck == 1
    assert free_while_stuck == 1
    assert pool.held_users == 0
    back = [r for r in caplog.records if "back in the pool" in r.getMessage()]
    assert len(back) == 1
    assert f"uid {POOL_UIDS[0]}" in back[0].getMessage()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1


async def test_released_stuck_user_comes_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = StuckProcesses([POOL_UIDS[0]])
    monkeypatch.setattr(task_users, "kill_user_processes", stuck)
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS[:1]], backoff=FAST_RETRIES)
    assert pool.acquire("a", "a/1/0") is not None
    released = pool.release("a/1/0")
    assert released is not None
    with caplog.at_level(logging.INFO, logger="agents.task_users"):
        async with asyncio.timeout(10):
            freeing = asyncio.create_task(pool.reclaim(released[0]))
            await wait_for(lambda: stuck.calls >= 3)
            held_while_stuck = pool.held_users
            stuck.stuck.clear()
            await freeing
    assert held_while_stuck == 1
    assert pool.free_users == 1
    assert pool.held_users == 0
    assert any("back in the pool" in r.getMessage() for r in caplog.records)


async def test_unsealed_job_folder_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_users, "kill_user_processes", StuckProcesses(()))
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS[:1]], backoff=FAST_RETRIES)
    assert pool.acquire("a", "a/1/0") is not None
    released = pool.release("a/1/0")
    assert released is not None
    failures = [OSError(errno.EIO, "Input/output error"), OSError(errno.EIO, "Input/output error")]
    calls = []

    def seal() -> None:
        calls.append(pool.held_users)
        if failures:
            raise failures.pop()

    async with asyncio.timeout(10):
        await pool.reclaim(released[0], seal)
    assert calls == [0, 1, 1]
    assert pool.free_users == 1
    assert pool.held_users == 0


async def test_lost_launcher_holds_released_user(monkeypatch: pytest.MonkeyPatch) -> None:
    # A sleep process takes the place of the launcher that went away without replying.
    stuck = StuckProcesses(())
    monkeypatch.setattr(task_users, "kill_user_processes", stuck)
    launcher = await asyncio.create_subprocess_exec("sleep", "60")
    identity = (launcher.pid, process_start_ticks(launcher.pid) or 0)
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS[:1]], backoff=FAST_RETRIES)
    assert pool.acquire("a", "a/1/0") is not None
    released = pool.release("a/1/0", identity)
    assert released is not None

    try:
        async with asyncio.timeout(10):
            freeing = asyncio.create_task(pool.reclaim(released[0]))
            await wait_for(lambda: stuck.calls >= 3)
            held_while_running = pool.held_users
            free_while_running = pool.free_users
            launcher.kill()
            await launcher.wait()
            await freeing
    finally:
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()
        await launcher.wait()

    assert held_while_running == 1
    assert free_while_running == 0
    assert pool.free_users == 1
    assert pool.held_users == 0

    # A later release without a lost launcher frees the user at once.
    assert pool.acquire("b", "b/1/0") is not None
    again = pool.release("b/1/0")
    assert again is not None
    calls = stuck.calls
    async with asyncio.timeout(10):
        await pool.reclaim(again[0])
    assert stuck.calls == calls + 1


def test_backoff_doubles_to_maximum() -> None:
    delays = Backoff(first_s=5.0, max_s=30.0).delays()
    assert [next(delays) for _ in range(6)] == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]


@pytest.mark.parametrize(
    ("first_s", "max_s", "reason"),
    [(0.0, 1.0, "first_s"), (-1.0, 1.0, "first_s"), (2.0, 1.0, "max_s")],
)
def test_backoff_rejects_bad_bounds(first_s: float, max_s: float, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Backoff(first_s=first_s, max_s=max_s)


# Tasks as pool users -------------------------------------------------------------------------


@pytest.fixture
def reachable_folder() -> Iterator[Path]:
    """A folder that other users can search, unlike pytest's temporary folders."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-task-users-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
async def no_pool_processes() -> AsyncIterator[None]:
    """Kill what the tests left running as the pool's uids, also when a test fails."""
    yield
    await asyncio.to_thread(kill_user_processes, POOL_UIDS)


def make_runner(
    folder: Path,
    recorder: Recorder,
    record_exit_status: bool,
    uids: tuple[int, ...] = POOL_UIDS,
    scratch: ScratchSweeper | None = None,
) -> tuple[TaskRunner, TaskUserPool, TaskLauncher | None]:
    pool = TaskUserPool([_user(uid) for uid in uids], scratch)
    launcher = TaskLauncher(user_per_request=True) if record_exit_status else None
    runner = TaskRunner(
        NODE,
        StateStore(folder / "state.json"),
        folder,
        recorder,
        time.time,
        ["GPU-0", "GPU-1", "GPU-2"],
        lambda uuids: {},
        launcher=launcher,
        task_users=pool,
    )
    return runner, pool, launcher


def _spec(
    job: str, accelerator: str, script: str, env: tuple[tuple[str, str], ...] = ()
) -> TaskSpec:
    return TaskSpec(job, f"{job}/1/0", (accelerator,), ("/bin/sh", "-c", script), env=env)


def _log(folder: Path, task_id: str) -> str:
    return (folder / "tasks" / f"{task_id.replace('/', '_')}.log").read_text()


SLEEPER = (
    'id -u; echo secret > ./private; env -i setsid sleep 300 & echo "$!" > ./stray; exec sleep 300'
)

PROBE = """
id -u
echo "home: $HOME"
echo "kill error: $(kill -0 "$TARGET" 2>&1)"
cat "$OTHER/private" 2>/dev/null; echo "read other: $?"
ls "$TASKS" >/dev/null 2>&1; echo "list tasks: $?"
touch "$TASKS/forged.log" 2>/dev/null; echo "write tasks: $?"
echo checkpoint-1 > "$ACSP_CHECKPOINT_FILE"; echo "checkpoint: $?"
exec sleep 300
"""


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def _fields(text: str) -> dict[str, str]:
    lines = text.splitlines()
    fields = {"uid": lines[0]}
    for line in lines[1:]:
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


@root_only
@PATHS
async def test_jobs_on_one_node_isolated(
    reachable_folder: Path, no_pool_processes: None, record_exit_status: bool
) -> None:
    folder = reachable_folder
    tasks = folder / "tasks"
    recorder = Recorder()
    runner, pool, launcher = make_runner(folder, recorder, record_exit_status)
    checkpoints = CheckpointFiles(tasks, per_job=True)
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(_spec("a", "GPU-0", SLEEPER))
            await wait_for(lambda: (job_folder(tasks, "a") / "stray").exists())
            target = runner.running[0].pid
            env = (
                ("TARGET", str(target)),
                ("OTHER", str(job_folder(tasks, "a"))),
                ("TASKS", str(tasks)),
                *checkpoints.environment("b/1/0", "", "b"),
            )
            await runner.start(_spec("b", "GPU-1", PROBE, env))
            await wait_for(lambda: "checkpoint:" in _log(folder, "b/1/0"))
            reference = checkpoints.changed("b/1/0")

            # Both users are in use, so a third job is rejected.
            await runner.start(_spec("c", "GPU-2", "true"))
            assert recorder.states("c/1/0") == [TaskState.START_FAILED]
            assert recorder.last("c/1/0").reason == pool.busy_reason
            assert recorder.last("c/1/0").node_busy

            stray = int((job_folder(tasks, "a") / "stray").read_text())
            for job in ("a", "b"):
                await runner.stop(f"{job}/1/0", "done")
                await wait_for(lambda job=job: TaskState.STOPPED in recorder.states(f"{job}/1/0"))
            await wait_for(lambda: pool.free_users == 2)
    finally:
        if launcher is not None:
            launcher.close()

    a_uid = int(_log(folder, "a/1/0").splitlines()[0])
    fields = _fields(_log(folder, "b/1/0"))
    assert {a_uid, int(fields["uid"])} == set(POOL_UIDS)
    # EPERM: the other job's process runs as another uid.
    assert fields["kill error"].endswith("Operation not permitted")
    assert fields["read other"] != "0"
    assert fields["list tasks"] != "0"
    assert fields["write tasks"] != "0"
    assert fields["checkpoint"] == "0"
    assert reference == "checkpoint-1"
    assert fields["home"] == str(job_folder(tasks, "b"))
    assert "secret" not in recorder.last("b/1/0").output_tail

    # The daemon that left job a's session and dropped its environment was swept.
    assert not _alive(stray)
    for job in ("a", "b"):
        status = job_folder(tasks, job).stat()
        # Freed: the folder is the agent's again, out of reach of the user's next job.
        assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (os.geteuid(), JOB_FOLDER_MODE)
    assert stat.S_IMODE(tasks.stat().st_mode) == POOL_TASK_FOLDER_MODE
    assert stat.S_IMODE((tasks / "jobs").stat().st_mode) == POOL_TASK_FOLDER_MODE
    assert not (tasks / "forged.log").exists()


@root_only
async def test_launcher_takes_user_per_request(reachable_folder: Path) -> None:
    tasks = reachable_folder / "tasks"
    tasks.mkdir()
    launcher = TaskLauncher(user_per_request=True)
    try:
        process = await launcher.launch(
            "/usr/bin/id",
            ["id", "-u"],
            {},
            tasks,
            tasks / "u.log",
            tasks / "u.exit",
            "spawn-u",
            _user(POOL_UIDS[1]),
        )
        assert await asyncio.wait_for(process.wait(), 10) == 0
        # Without a user the launcher starts nothing, rather than run the task as its own.
        missing = launcher.launch(
            "/usr/bin/id", ["id", "-u"], {}, tasks, tasks / "n.log", tasks / "n.exit", "spawn-n"
        )
        with pytest.raises(OSError) as raised:
            await missing
    finally:
        launcher.close()
    assert (tasks / "u.log").read_text() == f"{POOL_UIDS[1]}\n"
    assert "the request names no valid task user" in str(raised.value)
    assert not (tasks / "n.log").exists()


@root_only
async def test_job_folder_owned_by_its_user(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    tasks = reachable_folder / "tasks"
    recorder = Recorder()
    runner, pool, launcher = make_runner(reachable_folder, recorder, True)
    assert launcher is not None
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(_spec("a", "GPU-0", "exec sleep 300"))
            await runner.start(TaskSpec("a", "a/1/1", ("GPU-1",), ("/bin/sh", "-c", "id -u")))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/1"))
            status = job_folder(tasks, "a").stat()
            owner = status.st_uid
            mode = stat.S_IMODE(status.st_mode)
            free_while_running = pool.free_users
            await runner.stop("a/1/0", "done")
            await wait_for(lambda: pool.free_users == 2)
    finally:
        launcher.close()

    # Both tasks of the job ran as one user, which its folder belongs to until it ended.
    assert int(_log(reachable_folder, "a/1/1")) == owner
    assert owner in POOL_UIDS
    assert mode == JOB_FOLDER_MODE
    assert free_while_running == 1


@root_only
async def test_node_reads_checkpoint_in_job_folder(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    clock = ManualClock()
    spec = FleetNode(NODE_REF.provider, NODE_REF.region, NODE_REF.node, "A100-SXM4-80GB", 1)
    backend = SimulatedBackend(spec, clock)
    spool = Spool(reachable_folder / "spool")
    state = StateStore(reachable_folder / "state.json")
    outbox = Outbox(spool, before_append=state.save_before_spool)
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS])
    node = NodeAgent(
        NODE_REF,
        backend,
        "simulated",
        state,
        reachable_folder,
        outbox,
        "boot-1",
        clock,
        task_users=pool,
    )
    script = 'echo ref-1 > "$ACSP_CHECKPOINT_FILE"; exec sleep 60'
    message = agent_pb2.AgentCommand(
        command_id="c1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE_REF.message(),
        task_id="job-1/1/0",
        job_id="job-1",
        accelerators=[
            scheduler_pb2.AcceleratorShare(
                accelerator_id=backend.discover().accelerators[0].uuid, millis=1000
            )
        ],
        command=["/bin/sh", "-c", script],
        grace_seconds=5,
    )
    checkpoint = job_folder(reachable_folder / "tasks", "job-1") / "job-1_1_0.checkpoint"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        await node.handle(wire.parse_command(message.SerializeToString()))
        await wait_for(checkpoint.exists)
        await wait_for(lambda: checkpoint.read_text() == "ref-1\n")
        assert node.report_checkpoints() == 1
        assert node.runner is not None
        await node.runner.stop("job-1/1/0", "done")
        await wait_for(lambda: pool.free_users == 2)

    outbox.flush_to_spool()
    events = [
        agent_pb2.TaskEvent.FromString(record.payload)
        for record in spool.peek(100)
        if record.subject.startswith("acsp.task.")
    ]
    references = [e.checkpoint_reference for e in events if e.checkpoint_reference]
    assert references == ["ref-1"]
    assert not checkpoint.exists()


@root_only
async def test_recovered_task_keeps_its_user(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    first = Recorder()
    runner, _pool, launcher = make_runner(reachable_folder, first, True)
    assert launcher is not None
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            # Job "a" takes the first user, then job "b" the second, which outlives the agent.
            await runner.start(_spec("a", "GPU-0", "true"))
            await wait_for(lambda: TaskState.SUCCEEDED in first.states("a/1/0"))
            await runner.start(_spec("b", "GPU-1", "id -u; exec sleep 300"))
            await wait_for(lambda: TaskState.RUNNING in first.states("b/1/0"))
            # The agent stops here without stopping its tasks.
            for supervisor in runner.detach():
                await asyncio.wait((supervisor,))
    finally:
        launcher.close()
    await wait_for(lambda: _log(reachable_folder, "b/1/0") != "")
    b_uid = int(_log(reachable_folder, "b/1/0"))

    second = Recorder()
    restarted, pool, relauncher = make_runner(reachable_folder, second, True)
    assert relauncher is not None
    try:
        async with asyncio.TaskGroup() as group:
            restarted.attach(group)
            restarted.recover()
            assert second.last("b/1/0").state is TaskState.RUNNING
            assert pool.free_users == 1
            await restarted.start(_spec("c", "GPU-2", "id -u"))
            await wait_for(lambda: TaskState.SUCCEEDED in second.states("c/1/0"))
            # The first start gave stale job folders back to the agent, but not b's.
            b_owner = job_folder(reachable_folder / "tasks", "b").stat().st_uid
            await restarted.stop("b/1/0", "done")
            await wait_for(lambda: TaskState.STOPPED in second.states("b/1/0"))
    finally:
        relauncher.close()

    assert int(_log(reachable_folder, "c/1/0")) != b_uid
    assert b_owner == b_uid


@root_only
async def test_recovered_user_not_given_to_new_job(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    first = Recorder()
    runner, _pool, launcher = make_runner(reachable_folder, first, True, POOL_UIDS[:1])
    assert launcher is not None
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(_spec("a", "GPU-0", "exec sleep 300"))
            await wait_for(lambda: TaskState.RUNNING in first.states("a/1/0"))
            for supervisor in runner.detach():
                await asyncio.wait((supervisor,))
    finally:
        launcher.close()

    second = Recorder()
    restarted, pool, relauncher = make_runner(reachable_folder, second, True, POOL_UIDS[:1])
    assert relauncher is not None
    try:
        async with asyncio.TaskGroup() as group:
            restarted.attach(group)
            restarted.recover()
            await restarted.start(_spec("b", "GPU-1", "true"))
            assert second.states("b/1/0") == [TaskState.START_FAILED]
            assert second.last("b/1/0").reason == pool.busy_reason
            # A new task of the recovered job gets its user.
            await restarted.start(TaskSpec("a", "a/1/1", ("GPU-2",), ("/bin/sh", "-c", "id -u")))
            await wait_for(lambda: TaskState.SUCCEEDED in second.states("a/1/1"))
            await restarted.stop("a/1/0", "done")
            await wait_for(lambda: TaskState.STOPPED in second.states("a/1/0"))
    finally:
        relauncher.close()
    assert int(_log(reachable_folder, "a/1/1")) == POOL_UIDS[0]


@root_only
async def test_detach_cancels_stuck_user_freeing(
    reachable_folder: Path,
    no_pool_processes: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck: set[int] = set()

    def kill_leaving_stuck(uids: Collection[int]) -> set[int]:
        # Stands in for processes in uninterruptible sleep, which outlive SIGKILL.
        return kill_user_processes(uids) | (stuck & set(uids))

    monkeypatch.setattr(task_users, "kill_user_processes", kill_leaving_stuck)
    recorder = Recorder()
    runner, pool, launcher = make_runner(reachable_folder, recorder, True, POOL_UIDS[:1])
    assert launcher is not None
    try:
        with caplog.at_level(logging.ERROR, logger="agents.task_users"):
            async with asyncio.timeout(20):
                async with asyncio.TaskGroup() as group:
                    runner.attach(group)
                    await runner.start(_spec("a", "GPU-0", "true"))
                    # After the first start's sweep, which would keep the user from job "a".
                    stuck.add(POOL_UIDS[0])
                    await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
                    await wait_for(
                        lambda: any("survive SIGKILL" in r.getMessage() for r in caplog.records)
                    )
                    # As the agent does when it stops, before the group waits for its tasks.
                    detached = runner.detach()
                    if detached:
                        await asyncio.wait(detached, timeout=5.0)
    finally:
        launcher.close()
    # The user stays out of the pool, and a restarted agent sweeps it again.
    assert pool.free_users == 0


@root_only
async def test_first_start_sweeps_unused_users(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    # A process left as a pool user by a job that ended while the agent was down.
    leftover = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={POOL_UIDS[0]}", f"--regid={NOGROUP}", "--clear-groups", "sleep", "300"
    )
    # And the folder of that job, still its user's.
    stale = job_folder(reachable_folder / "tasks", "old")
    stale.mkdir(parents=True)
    os.chown(stale, POOL_UIDS[0], NOGROUP)
    recorder = Recorder()
    runner, _pool, launcher = make_runner(reachable_folder, recorder, True)
    assert launcher is not None
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            runner.recover()
            await runner.start(_spec("a", "GPU-0", "exec sleep 300"))
            await wait_for(lambda: TaskState.RUNNING in recorder.states("a/1/0"))
            running = job_folder(reachable_folder / "tasks", "a").stat().st_uid
            await runner.stop("a/1/0", "done")
            await wait_for(lambda: TaskState.STOPPED in recorder.states("a/1/0"))
    finally:
        launcher.close()
    assert await asyncio.wait_for(leftover.wait(), 10) == -9
    assert stale.stat().st_uid == os.geteuid()
    assert running in POOL_UIDS


NON_ROOT_PROBE = """
import asyncio, os, sys, time
from pathlib import Path
from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.checkpoints import CheckpointFiles
from agents.main import check_isolation
from agents.model import TaskSpec, TaskState
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.runner import TaskRunner
from agents.spool import Spool
from agents.state import StateStore
from agents.task_process import TaskLauncher
from agents.task_user import POOL_LAUNCHER_CAPABILITIES, check_agent_can_switch
from agents.task_users import TaskUserPool, job_folder, parse_task_users
from tests.agent.helpers import NODE as NODE_REF
from tests.agent.helpers import ManualClock
from tests.agent.test_runner import Recorder, wait_for
from tests.agent.test_task_user import REPOSITORY, _ensure_test_user, _run_agent

async def main(directory, pool_text):
    users = parse_task_users(pool_text)
    check_agent_can_switch(
        users[0], uses_launcher=True, launcher_capabilities=POOL_LAUNCHER_CAPABILITIES
    )
    pool = TaskUserPool(users)
    launcher = TaskLauncher(user_per_request=True)
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1", StateStore(directory / "state.json"), directory, recorder,
        time.time, ["GPU-0"], lambda uuids: {}, launcher=launcher, task_users=pool,
    )
    tasks = directory / "tasks"
    checkpoints = CheckpointFiles(tasks, per_job=True)
    env = checkpoints.environment("p/1/0", "", "p")
    probe = 'id -u; echo ref-1 > "$ACSP_CHECKPOINT_FILE"; exec sleep 60'
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("p", "p/1/0", ("GPU-0",), ("/bin/sh", "-c", probe), env=env))
        await wait_for(lambda: checkpoints.changed("p/1/0") == "ref-1")
        await runner.stop("p/1/0", "probed")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("p/1/0"))
        await wait_for(lambda: pool.free_users == 1)
    launcher.close()
    print(recorder.last("p/1/0").exit_code)
    print((tasks / "p_1_0.log").read_text(), end="")
    print(job_folder(tasks, "p").stat().st_uid)

asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
"""
"""An agent's runner, not root, that runs one task as a pool user and frees the user."""


@root_only
def test_non_root_agent_runs_pool(reachable_folder: Path, no_pool_processes: None) -> None:
    # The agent runs as a user that is not root, with the capabilities as ambient ones, as
    # systemd's AmbientCapabilities= grants them.
    if shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("setpriv or useradd is not installed")
    agent = _ensure_test_user()
    directory = reachable_folder / "agent"
    directory.mkdir()
    os.chown(directory, agent.uid, agent.gid)
    capabilities = ",".join(f"+{name[4:].lower()}" for name in NON_ROOT_CAPABILITIES)
    command = ["setpriv", f"--reuid={agent.uid}", f"--regid={agent.gid}", "--clear-groups"]
    command += [f"--inh-caps={capabilities}", f"--ambient-caps={capabilities}", "--"]
    command += [sys.executable, "-c", NON_ROOT_PROBE, str(directory), f"{POOL_UIDS[0]}:{NOGROUP}"]
    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Stopped by SIGTERM, which takes CAP_KILL to send to another user's process.
    assert lines == ["-15", str(POOL_UIDS[0]), str(agent.uid)]


def _start_message(job: str, accelerator: str, script: str) -> agent_pb2.AgentCommand:
    return agent_pb2.AgentCommand(
        command_id=f"start-{job}",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE_REF.message(),
        task_id=f"{job}/1/0",
        job_id=job,
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=accelerator, millis=1000)],
        command=["/bin/sh", "-c", script],
        grace_seconds=5,
    )


@root_only
async def test_full_pool_start_rejected_as_busy(
    reachable_folder: Path, no_pool_processes: None
) -> None:
    clock = ManualClock()
    spec = FleetNode(NODE_REF.provider, NODE_REF.region, NODE_REF.node, "A100-SXM4-80GB", 2)
    backend = SimulatedBackend(spec, clock)
    spool = Spool(reachable_folder / "spool")
    state = StateStore(reachable_folder / "state.json")
    outbox = Outbox(spool, before_append=state.save_before_spool)
    pool = TaskUserPool([_user(POOL_UIDS[0])])
    node = NodeAgent(
        NODE_REF,
        backend,
        "simulated",
        state,
        reachable_folder,
        outbox,
        "boot-1",
        clock,
        task_users=pool,
    )
    first, second = (info.uuid for info in backend.discover().accelerators)
    temp_file = job_folder(reachable_folder / "tasks", "job-1") / "tmp" / "scratch"
    script = 'echo "$TMPDIR" > "$TMPDIR/scratch"; exec sleep 60'
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        node.publish_inventory()
        await node.handle(
            wire.parse_command(_start_message("job-1", first, script).SerializeToString())
        )
        await wait_for(temp_file.exists)
        await wait_for(lambda: temp_file.read_text() != "")
        temp_owner = temp_file.stat().st_uid
        temp_folder_mode = stat.S_IMODE(temp_file.parent.stat().st_mode)
        await node.handle(
            wire.parse_command(_start_message("job-2", second, "true").SerializeToString())
        )
        assert node.runner is not None
        await node.runner.stop("job-1/1/0", "done")
        await wait_for(lambda: pool.free_users == 1)

    outbox.flush_to_spool()
    records = spool.peek(100)
    inventories = [
        agent_pb2.Inventory.FromString(r.payload)
        for r in records
        if r.subject.startswith("acsp.inventory.")
    ]
    events = {
        (e.task_id, e.state): e
        for e in (
            agent_pb2.TaskEvent.FromString(r.payload)
            for r in records
            if r.subject.startswith("acsp.task.")
        )
    }
    assert [i.max_jobs for i in inventories] == [1]
    rejected = events[("job-2/1/0", agent_pb2.TASK_STATE_START_FAILED)]
    assert rejected.start_rejection == agent_pb2.START_REJECTION_NODE_BUSY
    assert rejected.message == pool.busy_reason
    started = events[("job-1/1/0", agent_pb2.TASK_STATE_STARTED)]
    assert started.start_rejection == agent_pb2.START_REJECTION_UNSPECIFIED
    # The job's temporary files were in its own folder, as its user, out of reach of others.
    assert temp_file.read_text() == f"{temp_file.parent}\n"
    assert temp_owner == POOL_UIDS[0]
    assert temp_folder_mode == JOB_FOLDER_MODE


@root_only
async def test_temp_folder_link_replaced(reachable_folder: Path) -> None:
    tasks = reachable_folder / "tasks"
    make_jobs_folder(tasks)
    folder = job_folder(tasks, "a")
    folder.mkdir()
    outside = reachable_folder / "outside"
    outside.mkdir()
    # An earlier attempt of the job replaced its temporary folder with a link.
    (folder / "tmp").symlink_to(outside)
    make_job_folder(tasks, "a", _user(POOL_UIDS[0]))
    temp = folder / "tmp"
    assert not temp.is_symlink()
    assert temp.stat().st_uid == POOL_UIDS[0]
    assert outside.stat().st_uid == os.geteuid()


def _pids_of(uid: int) -> list[int]:
    """Return the live processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def _read_available(descriptor: int) -> bytes:
    """Return what a non-blocking FIFO holds now, or b"" when it holds nothing."""
    try:
        return os.read(descriptor, 64)
    except BlockingIOError:
        return b""


@root_only
async def test_lost_start_keeps_user_until_checked(
    reachable_folder: Path, no_pool_processes: None, caplog: pytest.LogCaptureFixture
) -> None:
    # The launcher blocks on opening the task's log, here a FIFO without a reader, as on a
    # hung file system, so the agent gives up on its reply. It starts the task once it resumes.
    uid = POOL_UIDS[0]
    pool = TaskUserPool([_user(uid)], backoff=Backoff(first_s=1.0, max_s=1.0))
    launcher = TaskLauncher(user_per_request=True, reply_timeout_s=0.5)
    recorder = Recorder()
    runner = TaskRunner(
        NODE,
        StateStore(reachable_folder / "state.json"),
        reachable_folder,
        recorder,
        time.time,
        ["GPU-0", "GPU-1", "GPU-2"],
        lambda uuids: {},
        launcher=launcher,
        task_users=pool,
    )
    real_launch = launcher.launch
    logs: list[Path] = []

    def launch_into_fifo(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        log = Path(args[4])
        if not logs:
            os.mkfifo(log)
            logs.append(log)
        return real_launch(*args, **kwargs)

    launcher.launch = launch_into_fifo  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="agents"):
            async with asyncio.timeout(40):
                async with asyncio.TaskGroup() as group:
                    runner.attach(group)
                    await runner.start(_spec("b", "GPU-0", "echo late; exec sleep 300"))
                    rejected_b = recorder.states("b/1/0")
                    lost_launcher = recorder.last("b/1/0")
                    # The first sweep of the user's processes has run.
                    await wait_for(lambda: pool.held_users == 1 or pool.free_users == 1)
                    held_before_late_start = pool.held_users

                    # The launcher resumes and starts b's task as the user.
                    reader = os.open(logs[0], os.O_RDONLY | os.O_NONBLOCK)
                    try:
                        await wait_for(lambda: _read_available(reader) == b"late\n")
                    finally:
                        os.close(reader)
                    await runner.start(_spec("c", "GPU-1", "id -u"))

                    await wait_for(lambda: pool.free_users == 1)
                    left = _pids_of(uid)
                    await runner.start(_spec("d", "GPU-2", "id -u"))
                    await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("d/1/0"))
    finally:
        launcher.close()
    assert rejected_b == [TaskState.START_FAILED]
    assert "went away" in lost_launcher.reason
    # The user stays out of the pool while the task started late runs as it.
    assert recorder.states("c/1/0") == [TaskState.START_FAILED]
    assert recorder.last("c/1/0").node_busy
    assert held_before_late_start == 1
    assert left == []
    assert int(_log(reachable_folder, "d/1/0")) == uid
    retries = [r for r in caplog.records if "may still start that task" in r.getMessage()]
    assert len(retries) == 1
