"""Sweeps of the scratch folders (``ACSP_AGENT_SCRATCH_DIRS``) before a pool user is free again.

The tests that run tasks as the pool's uids need root, as in ``test_task_users``, and are
skipped otherwise. The setting's parsing is checked as any user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.main import check_isolation
from agents.model import TaskState
from agents.scratch_folders import (
    DEFAULT_SCRATCH_DIRS,
    SCRATCH_DIRS_ENV,
    ScratchSweeper,
    parse_scratch_dirs,
)
from agents.settings import AgentSettings
from agents.task_user import NON_ROOT_CAPABILITIES
from agents.task_users import TASK_USERS_ENV, TaskUserPool
from services.runtime.settings import SettingsError
from tests.agent.test_runner import Recorder, wait_for
from tests.agent.test_task_user import REPOSITORY, _ensure_test_user
from tests.agent.test_task_users import (
    NOGROUP,
    POOL_UIDS,
    _log,
    _spec,
    _user,
    make_runner,
    no_pool_processes,
    reachable_folder,
    root_only,
)

pytestmark = pytest.mark.timeout(60)

# Fixtures that the tests below request by name.
__all__ = ["no_pool_processes", "reachable_folder"]


# The setting -----------------------------------------------------------------------------------


def test_scratch_dirs_default_and_none() -> None:
    assert AgentSettings.from_env({}).scratch_dirs == DEFAULT_SCRATCH_DIRS
    assert AgentSettings.from_env({SCRATCH_DIRS_ENV: "none"}).scratch_dirs == ()
    listed = AgentSettings.from_env({SCRATCH_DIRS_ENV: "/tmp, /scratch/shared/"})
    assert listed.scratch_dirs == (Path("/tmp"), Path("/scratch/shared"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/tmp,,/dev/shm", "the list has an empty item"),
        ("tmp", "'tmp' is not an absolute path"),
        ("/", "'/' is / or has . or .. parts"),
        ("/tmp/../etc", "'/tmp/../etc' is / or has . or .. parts"),
        ("/tmp,/tmp", "/tmp is listed twice"),
        ("/tmp,/tmp/x", "/tmp/x and /tmp are nested"),
    ],
)
def test_scratch_dirs_parsing_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_scratch_dirs(text)
    assert reason in str(raised.value)


def test_invalid_scratch_dirs_setting_names_fix() -> None:
    with pytest.raises(SettingsError) as raised:
        AgentSettings.from_env({SCRATCH_DIRS_ENV: "relative"})
    message = str(raised.value)
    assert f"{SCRATCH_DIRS_ENV}: 'relative' is invalid" in message
    assert "is not an absolute path" in message
    assert "fix: set it to the comma-separated absolute folders" in message


@root_only
def test_linked_scratch_dir_fails_start(reachable_folder: Path) -> None:
    link = reachable_folder / "tmp-link"
    link.symlink_to("/tmp")
    state = reachable_folder / "state"
    state.mkdir(mode=0o711)
    environ = {
        TASK_USERS_ENV: f"{POOL_UIDS[0]}:{NOGROUP}",
        "ACSP_AGENT_STATE_DIR": str(state),
        SCRATCH_DIRS_ENV: f"/dev/shm,{link}",
    }
    with pytest.raises(SettingsError) as raised:
        check_isolation(AgentSettings.from_env(environ))
    error = raised.value
    assert error.variable == SCRATCH_DIRS_ENV
    assert f"{link} is a symbolic link" in str(error)
    assert "list the folder itself (the target of a link)" in str(error)


# Sweeps as pool users --------------------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder like /tmp, world-writable with the sticky bit."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-scratch-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


LEAVE = """
id -u
echo secret > "$SCRATCH/leftover"
mkdir -p "$SCRATCH/nccl/deep" && echo shm > "$SCRATCH/nccl/deep/segment"
ln -s /etc/hostname "$SCRATCH/link"
"""

PEEK = """
id -u
ls -A "$SCRATCH"; echo "listed: $?"
"""


@root_only
async def test_next_job_finds_no_leftovers(
    reachable_folder: Path, scratch: Path, no_pool_processes: None
) -> None:
    # One user, so that the second job gets the first one's uid.
    recorder = Recorder()
    sweeper = ScratchSweeper([scratch])
    runner, pool, launcher = make_runner(
        reachable_folder, recorder, True, uids=POOL_UIDS[:1], scratch=sweeper
    )
    assert launcher is not None
    kept = scratch / "kept"
    kept.write_text("root's")
    env = (("SCRATCH", str(scratch)),)
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(_spec("a", "GPU-0", LEAVE, env))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
            await wait_for(lambda: pool.free_users == 1)
            left_after_a = sorted(os.listdir(scratch))
            await runner.start(_spec("b", "GPU-0", PEEK, env))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("b/1/0"))
            await wait_for(lambda: pool.free_users == 1)
    finally:
        launcher.close()
    assert _log(reachable_folder, "a/1/0").splitlines()[0] == str(POOL_UIDS[0])
    assert left_after_a == ["kept"]
    assert _log(reachable_folder, "b/1/0").splitlines() == [str(POOL_UIDS[0]), "kept", "listed: 0"]
    assert kept.read_text() == "root's"


DEEP = """
cd "$SCRATCH" || exit 1
for level in $(seq 140); do mkdir d && cd d || exit 1; done
echo x > bottom
chmod 500 .
"""


@root_only
async def test_too_deep_tree_frees_user(
    reachable_folder: Path,
    scratch: Path,
    no_pool_processes: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    runner, pool, launcher = make_runner(
        reachable_folder, recorder, True, uids=POOL_UIDS[:1], scratch=ScratchSweeper([scratch])
    )
    assert launcher is not None
    try:
        with caplog.at_level(logging.INFO, logger="agents.scratch_folders"):
            async with asyncio.timeout(30):
                async with asyncio.TaskGroup() as group:
                    runner.attach(group)
                    await runner.start(_spec("a", "GPU-0", DEEP, (("SCRATCH", str(scratch)),)))
                    await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
                    await wait_for(lambda: pool.free_users == 1)
    finally:
        launcher.close()
    assert os.listdir(scratch) == []
    assert not _messages(caplog, "stays out of the pool")
    assert _messages(caplog, "moved 1 folders of uid")


@root_only
async def test_dirty_user_stays_out_of_pool(
    scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file of the user's in root's folder, which the user may not remove.
    private = scratch / "private"
    private.mkdir(mode=0o755)
    stuck = private / "stuck"
    stuck.write_text("x")
    os.chown(stuck, POOL_UIDS[0], NOGROUP)
    sweeper = ScratchSweeper([scratch], retry_s=0.05)
    pool = TaskUserPool([_user(uid) for uid in POOL_UIDS[:1]], sweeper)
    assert pool.acquire("a", "a/1/0") is not None
    released = pool.release("a/1/0")
    assert released is not None
    uid, _job = released

    async def free() -> None:
        await pool.sweep_scratch(uid)
        pool.freed(uid)

    with caplog.at_level(logging.DEBUG, logger="agents.scratch_folders"):
        freeing = asyncio.create_task(free())
        await wait_for(lambda: len(_messages(caplog, "stays out of the pool")) >= 3)
        free_while_dirty = pool.free_users
        held_while_dirty = pool.held_users
        stuck.unlink()
        await asyncio.wait_for(freeing, 10)

    assert free_while_dirty == 0
    assert held_while_dirty == 1
    assert pool.free_users == 1
    assert pool.held_users == 0
    failures = _messages(caplog, "stays out of the pool")
    assert [record.levelno for record in failures[:2]] == [logging.ERROR, logging.DEBUG]
    assert f"{stuck}: Permission denied" in failures[0].getMessage()
    assert _messages(caplog, "scratch folders clean of uid")


@root_only
async def test_first_start_sweeps_unused_users(
    reachable_folder: Path, scratch: Path, no_pool_processes: None
) -> None:
    # Left by jobs that ended while the agent was down.
    for uid in POOL_UIDS:
        leftover = scratch / f"left-by-{uid}"
        leftover.write_text("x")
        os.chown(leftover, uid, NOGROUP)
    recorder = Recorder()
    runner, pool, launcher = make_runner(
        reachable_folder, recorder, True, scratch=ScratchSweeper([scratch])
    )
    assert launcher is not None
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            runner.recover()
            await runner.start(_spec("a", "GPU-0", "id -u"))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
            await wait_for(lambda: pool.free_users == 2)
    finally:
        launcher.close()
    assert os.listdir(scratch) == []


@root_only
async def test_detach_cancels_dirty_user_sweeps(
    reachable_folder: Path, scratch: Path, no_pool_processes: None, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    runner, pool, launcher = make_runner(
        reachable_folder, recorder, True, uids=POOL_UIDS[:1], scratch=ScratchSweeper([scratch])
    )
    assert launcher is not None
    private = scratch / "private"
    private.mkdir(mode=0o755)
    stuck = private / "stuck"
    try:
        with caplog.at_level(logging.ERROR, logger="agents.scratch_folders"):
            async with asyncio.timeout(20):
                async with asyncio.TaskGroup() as group:
                    runner.attach(group)
                    await runner.start(_spec("a", "GPU-0", "sleep 0.5"))
                    # A file of the user's in root's folder keeps every later sweep failing,
                    # a minute apart.
                    stuck.write_text("x")
                    os.chown(stuck, POOL_UIDS[0], NOGROUP)
                    await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("a/1/0"))
                    await wait_for(lambda: bool(_messages(caplog, "stays out of the pool")))
                    # As the agent does when it stops, before the group waits for its tasks.
                    detached = runner.detach()
                    if detached:
                        await asyncio.wait(detached, timeout=5.0)
    finally:
        launcher.close()
    assert pool.free_users == 0
    assert stuck.exists()


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


NON_ROOT_SWEEP = """
import sys
from agents.scratch_sweep import sweep_as
report = sweep_as(int(sys.argv[1]), int(sys.argv[2]), [sys.argv[3]])
print(report.files, report.failure_count)
"""
"""A sweep by an agent that is not root, with the capabilities of the pool's systemd drop-in."""


@root_only
def test_non_root_agent_sweeps_pool_user(scratch: Path) -> None:
    if shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("setpriv or useradd is not installed")
    agent = _ensure_test_user()
    mine = scratch / "mine"
    mine.write_text("x")
    os.chown(mine, POOL_UIDS[0], NOGROUP)
    theirs = scratch / "theirs"
    theirs.write_text("x")
    os.chown(theirs, POOL_UIDS[1], NOGROUP)
    capabilities = ",".join(f"+{name[4:].lower()}" for name in NON_ROOT_CAPABILITIES)
    command = ["setpriv", f"--reuid={agent.uid}", f"--regid={agent.gid}", "--clear-groups"]
    command += [f"--inh-caps={capabilities}", f"--ambient-caps={capabilities}", "--"]
    command += [sys.executable, "-c", NON_ROOT_SWEEP, str(POOL_UIDS[0]), str(NOGROUP), str(scratch)]

    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=40)

    assert done.returncode == 0, done.stderr
    # Removed from the sticky folder without CAP_FOWNER, because the sweep had the user's ids.
    assert done.stdout.split() == ["1", "0"]
    assert not mine.exists()
    assert theirs.exists()
