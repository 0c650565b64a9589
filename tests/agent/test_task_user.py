"""Tasks that run as a separate unprivileged user (``ACSP_AGENT_TASK_USER``).

The process tests start real tasks as the user ``acsp-test-task`` (created here when absent,
with the group ``acsp-test-extra`` as a supplementary group), through the task launcher and
through the agent's own ``subprocess.Popen``. They need root, and are skipped otherwise. The
checks of the setting's parsing and of file modes run as any user.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.checkpoints import CheckpointFiles
from agents.main import check_isolation
from agents.model import TaskSpec, TaskState
from agents.programs import find_executable, may_execute
from agents.runner import TaskRunner
from agents.settings import AgentSettings
from agents.state import StateStore
from agents.task_process import TaskLauncher, read_exit_status
from agents.task_user import (
    NON_ROOT_CAPABILITIES,
    TASK_FOLDER_MODE,
    TASK_USER_ENV,
    TaskUser,
    check_agent_can_switch,
    check_task_folder_reachable,
    parse_task_user,
    warn_readable_files,
)
from agents.task_users import TASK_USERS_ENV
from services.runtime.settings import SettingsError
from tests.agent.test_runner import Recorder, wait_for

pytestmark = pytest.mark.timeout(60)

TEST_USER = "acsp-test-task"
EXTRA_GROUP = "acsp-test-extra"
REPOSITORY = Path(__file__).resolve().parents[2]
SIGNALS_32_AND_33 = 0b11 << 31
"""Bits of signals 32 and 33 in a SigIgn mask of ``/proc/<pid>/status`` (bit N-1 is signal N)."""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _ensure_test_user() -> TaskUser:
    """Create the test user and its extra group if absent, and return the user."""
    try:
        grp.getgrnam(EXTRA_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", EXTRA_GROUP], check=True)
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--groups", EXTRA_GROUP, TEST_USER]
        subprocess.run(command, check=True)
    if TEST_USER not in grp.getgrnam(EXTRA_GROUP).gr_mem:
        subprocess.run(["usermod", "--append", "--groups", EXTRA_GROUP, TEST_USER], check=True)
    return parse_task_user(TEST_USER)


@pytest.fixture
def task_user() -> TaskUser:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    return _ensure_test_user()


PATHS = pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])

PROBE = """
id -u; id -g; id -G
grep -E '^(CapInh|CapPrm|CapEff|CapAmb|SigIgn):' /proc/self/status
kill -0 "$LAUNCHER_PID" 2>/dev/null; echo "kill launcher: $?"
kill -0 "$AGENT_PID" 2>/dev/null; echo "kill agent: $?"
cat ./agent-only 2>/dev/null; echo "read agent-only: $?"
cat ./world-readable >/dev/null; echo "read world-readable: $?"
echo written > ./output
echo checkpoint-1 > ./p.partial && mv ./p.partial ./p_1_0.checkpoint; echo "checkpoint: $?"
exit 3
"""


def _log_fields(text: str) -> dict[str, str]:
    lines = text.splitlines()
    fields = {"uid": lines[0], "gid": lines[1], "groups": lines[2]}
    for line in lines[3:]:
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@root_only
@PATHS
async def test_task_runs_as_task_user(
    tmp_path: Path, task_user: TaskUser, record_exit_status: bool
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "agent-only").write_text("agent secret\n")
    (tasks / "agent-only").chmod(0o600)
    (tasks / "world-readable").write_text("public\n")
    (tasks / "world-readable").chmod(0o644)

    launcher = TaskLauncher(task_user=task_user) if record_exit_status else None
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        time.time,
        ["GPU-0"],
        lambda uuids: {"CUDA_VISIBLE_DEVICES": ",".join(uuids)},
        launcher=launcher,
        task_user=task_user,
    )
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            # The launcher starts on the first launch, so a first task makes its pid known.
            await runner.start(TaskSpec("w", "w/1/0", ("GPU-0",), ("/bin/true",)))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("w/1/0"))
            launcher_pid = launcher.identity[0] if launcher is not None else os.getpid()
            env = (("LAUNCHER_PID", str(launcher_pid)), ("AGENT_PID", str(os.getpid())))
            spec = TaskSpec("p", "p/1/0", ("GPU-0",), ("/bin/sh", "-c", PROBE), env=env)
            await runner.start(spec)
            await wait_for(lambda: TaskState.FAILED in recorder.states("p/1/0"))
    finally:
        if launcher is not None:
            launcher.close()

    ended = recorder.last("p/1/0")
    assert ended.exit_code == 3
    fields = _log_fields((tasks / "p_1_0.log").read_text())
    assert fields["uid"] == str(task_user.uid)
    assert fields["gid"] == str(task_user.gid)
    assert sorted(int(group) for group in fields["groups"].split()) == list(task_user.groups)
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in task_user.groups
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[capability_set], 16) == 0, capability_set
    assert int(fields["SigIgn"], 16) & SIGNALS_32_AND_33 == 0

    assert fields["kill launcher"] != "0"
    assert fields["kill agent"] != "0"
    assert fields["read agent-only"] != "0"
    assert fields["read world-readable"] == "0"
    assert "agent secret" not in ended.output_tail
    assert "read world-readable: 0" in ended.output_tail

    assert fields["checkpoint"] == "0"
    checkpoints = CheckpointFiles(tasks)
    checkpoints.watch("p/1/0")
    assert checkpoints.changed("p/1/0") == "checkpoint-1"

    output = (tasks / "output").stat()
    assert (output.st_uid, output.st_gid) == (task_user.uid, task_user.gid)
    folder = tasks.stat()
    assert stat.S_IMODE(folder.st_mode) == TASK_FOLDER_MODE
    assert folder.st_gid == task_user.gid
    log = (tasks / "p_1_0.log").stat()
    assert log.st_uid == os.geteuid()
    if record_exit_status:
        assert read_exit_status(tasks / "p_1_0.exit") == 3


@pytest.fixture
def reachable_folder() -> Iterator[Path]:
    """A folder that other users can search, unlike pytest's temporary folders."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-task-user-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


async def run_until_first_state(
    folder: Path, task_dir: Path, user: TaskUser, record_exit_status: bool, spec: TaskSpec
) -> Recorder:
    """Start ``spec`` as ``user`` and return the recorder once the task reported a state."""
    launcher = TaskLauncher(task_user=user) if record_exit_status else None
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1",
        StateStore(folder / "state.json"),
        task_dir,
        recorder,
        time.time,
        ["GPU-0"],
        lambda uuids: {},
        launcher=launcher,
        task_user=user,
    )
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(spec)
            await wait_for(lambda: recorder.states(spec.task_id) != [])
    finally:
        if launcher is not None:
            launcher.close()
    return recorder


@root_only
@PATHS
async def test_unrunnable_program_fails_as_job_error(
    reachable_folder: Path, task_user: TaskUser, record_exit_status: bool
) -> None:
    # Executing the program fails in the task user's process, after the switch, and is still
    # reported as the job's own error.
    tasks = reachable_folder / "tasks"
    tasks.mkdir()
    script = tasks / "run.sh"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)

    spec = TaskSpec("u", "u/1/0", ("GPU-0",), ("./run.sh",))
    recorder = await run_until_first_state(
        reachable_folder, reachable_folder, task_user, record_exit_status, spec
    )

    assert recorder.states("u/1/0") == [TaskState.FAILED]
    failed = recorder.last("u/1/0")
    assert failed.exit_code == 127
    assert failed.reason.startswith("cannot run ./run.sh: bad interpreter /no/such/interpreter")


@root_only
@PATHS
async def test_program_task_user_cannot_run(
    reachable_folder: Path, task_user: TaskUser, record_exit_status: bool
) -> None:
    # Executable for root only: the agent could run it, the task user cannot.
    tasks = reachable_folder / "tasks"
    tasks.mkdir()
    private = reachable_folder / "private"
    private.mkdir(mode=0o700)
    program = private / "tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)

    spec = TaskSpec("p", "p/1/0", ("GPU-0",), (str(program),))
    recorder = await run_until_first_state(
        reachable_folder, tasks, task_user, record_exit_status, spec
    )

    assert recorder.states("p/1/0") == [TaskState.FAILED]
    failed = recorder.last("p/1/0")
    assert failed.exit_code == 126
    assert f"do not let the task user {task_user.name} execute it" in failed.reason


@root_only
def test_path_search_skips_root_only_program(reachable_folder: Path, task_user: TaskUser) -> None:
    private, public = reachable_folder / "private", reachable_folder / "public"
    private.mkdir(mode=0o700)
    public.mkdir(mode=0o755)
    for folder in (private, public):
        program = folder / "tool"
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    search_path = f"{private}:{public}"

    assert find_executable("tool", search_path, reachable_folder) == str(private / "tool")
    found = find_executable("tool", search_path, reachable_folder, task_user)
    assert found == str(public / "tool")
    assert may_execute(str(public / "tool"), task_user)
    assert not may_execute(str(private / "tool"), task_user)


@root_only
def test_path_search_skips_link_in_private_folder(
    reachable_folder: Path, task_user: TaskUser
) -> None:
    # The link's target is executable by anyone, but the task user cannot look the link up.
    private, public = reachable_folder / "private", reachable_folder / "public"
    private.mkdir(mode=0o700)
    public.mkdir(mode=0o755)
    (private / "tool").symlink_to("/bin/true")
    (public / "tool").symlink_to("/bin/true")
    (public / "via-private").symlink_to("../private/tool")
    search_path = f"{private}:{public}"

    found = find_executable("tool", search_path, reachable_folder, task_user)
    assert found == str(public / "tool")
    assert not may_execute(str(private / "tool"), task_user)
    assert not may_execute(str(public / "via-private"), task_user)
    assert may_execute(str(public / "tool"), task_user)


@root_only
async def test_log_made_by_task_does_not_block_start(tmp_path: Path, task_user: TaskUser) -> None:
    # A task could create the log of a task id that has not started yet. A log that the agent
    # did not make must not pass for a task that already ran.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    forged = tasks / "f_1_0.log"
    forged.write_text("forged\n")
    os.chown(forged, task_user.uid, task_user.gid)
    launcher = TaskLauncher(task_user=task_user)
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        time.time,
        ["GPU-0"],
        lambda uuids: {},
        launcher=launcher,
        task_user=task_user,
    )
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(TaskSpec("f", "f/1/0", ("GPU-0",), ("/bin/echo", "ran")))
            await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("f/1/0"))
    finally:
        launcher.close()

    assert recorder.last("f/1/0").output_tail == "ran\n"
    assert forged.stat().st_uid == os.geteuid()


@root_only
async def test_symlink_in_place_of_log_not_followed(tmp_path: Path, task_user: TaskUser) -> None:
    # A task may write in the task folder. A link there must not make the launcher, which runs
    # as root, truncate its target.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (tasks / "l.log").symlink_to(target)
    (tasks / "l.exit.partial").symlink_to(target)
    launcher = TaskLauncher(task_user=task_user)
    try:
        launch = launcher.launch(
            "/bin/true", ["true"], {}, tasks, tasks / "l.log", tasks / "l.exit", "spawn-l"
        )
        with pytest.raises(OSError):
            await launch
        process = await launcher.launch(
            "/bin/true", ["true"], {}, tasks, tasks / "m.log", tasks / "l.exit", "spawn-m"
        )
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        launcher.close()
    assert target.read_text() == "keep me\n"
    assert read_exit_status(tasks / "l.exit") == 0
    assert not (tasks / "l.exit").is_symlink()


def _run_agent(
    tmp_path: Path, env: dict[str, str], prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ACSP_")}
    environment.update(env)
    # No NATS server listens on this port; the agent must exit before it connects.
    command = [sys.executable, "-m", "agents", "--backend", "simulated", "--nodes", "1"]
    command += ["--nats-url", "nats://127.0.0.1:9", "--state-dir", str(tmp_path / "state")]
    return subprocess.run(
        [*(prefix or []), *command],
        env=environment,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_unknown_task_user_fails_start(tmp_path: Path) -> None:
    done = _run_agent(tmp_path, {"ACSP_AGENT_TASK_USER": "no-such-acsp-user"})
    assert done.returncode == 2
    assert "ACSP_AGENT_TASK_USER: 'no-such-acsp-user' is invalid" in done.stderr
    assert "no user 'no-such-acsp-user' in the user database" in done.stderr
    assert "fix: set it to the unprivileged user that tasks run as" in done.stderr


@root_only
def test_non_root_agent_fails_start(tmp_path: Path, task_user: TaskUser) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, task_user.uid, task_user.gid)
    # The agent runs as the test user and may read the interpreter wherever it is installed
    # (CAP_DAC_READ_SEARCH), but has none of the capabilities that switch users.
    prefix = ["setpriv", f"--reuid={task_user.uid}", f"--regid={task_user.gid}"]
    prefix += ["--clear-groups", "--inh-caps=+dac_read_search"]
    prefix += ["--ambient-caps=+dac_read_search", "--"]
    done = _run_agent(tmp_path, {"ACSP_AGENT_TASK_USER": "nobody"}, prefix)
    assert done.returncode == 2, done.stderr
    assert f"ACSP_AGENT_TASK_USER: the agent runs as uid {task_user.uid} without" in done.stderr
    assert "CAP_SETUID, CAP_SETGID, CAP_KILL" in done.stderr
    assert "ambient CAP_SETUID" in done.stderr
    assert "fix: run the agent as root, or grant it the ambient capabilities" in done.stderr


NON_ROOT_PROBE = """
import asyncio, sys, time
from pathlib import Path
from agents.launcher import drop_inheritable_capabilities
from agents.model import TaskSpec, TaskState
from agents.runner import TaskRunner
from agents.state import StateStore
from agents.task_process import TaskLauncher
from agents.task_user import check_agent_can_switch, parse_task_user
from tests.agent.test_runner import Recorder, wait_for

async def main(directory, record_exit_status):
    user = parse_task_user("nobody")
    check_agent_can_switch(user, uses_launcher=record_exit_status)
    if not record_exit_status:
        drop_inheritable_capabilities()
    launcher = TaskLauncher(task_user=user) if record_exit_status else None
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1", StateStore(directory / "state.json"), directory, recorder,
        time.time, ["GPU-0"], lambda uuids: {}, launcher=launcher, task_user=user,
    )
    probe = "id -u; grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status; exec sleep 60"
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("p", "p/1/0", ("GPU-0",), ("/bin/sh", "-c", probe)))
        log = directory / "tasks" / "p_1_0.log"
        await wait_for(lambda: log.exists() and log.read_text().count("Cap") == 4)
        await runner.stop("p/1/0", "probed")
        await wait_for(lambda: TaskState.STOPPED in recorder.states("p/1/0"))
    if launcher is not None:
        launcher.close()
    print(recorder.last("p/1/0").exit_code)
    print(log.read_text(), end="")

asyncio.run(main(Path(sys.argv[1]), sys.argv[2] == "launcher"))
"""
"""An agent's runner that starts one task as ``nobody``, stops it, and prints its log."""


@root_only
@PATHS
def test_non_root_agent_with_capabilities(
    tmp_path: Path, task_user: TaskUser, record_exit_status: bool
) -> None:
    # The agent runs as the test user with the capabilities as ambient ones, as systemd's
    # AmbientCapabilities= grants them. Its tasks must keep none of them.
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("the user nobody does not exist")
    directory = tmp_path / "agent"
    directory.mkdir()
    os.chown(directory, task_user.uid, task_user.gid)
    capabilities = ",".join(f"+{name[4:].lower()}" for name in NON_ROOT_CAPABILITIES)
    command = ["setpriv", f"--reuid={task_user.uid}", f"--regid={task_user.gid}"]
    command += ["--clear-groups", f"--inh-caps={capabilities}", f"--ambient-caps={capabilities}"]
    command += ["--", sys.executable, "-c", NON_ROOT_PROBE, str(directory)]
    command += ["launcher" if record_exit_status else "agent"]
    done = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=40)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Stopped by SIGTERM, which takes CAP_KILL to send to another user's process.
    assert lines[0] == "-15"
    assert lines[1] == str(nobody.pw_uid)
    capability_sets = dict(line.split(":\t") for line in lines[2:])
    assert capability_sets == dict.fromkeys(["CapInh", "CapPrm", "CapEff", "CapAmb"], "0" * 16)


def test_task_user_parsing() -> None:
    with pytest.raises(ValueError, match="no user 'no-such-acsp-user'"):
        parse_task_user("no-such-acsp-user")
    with pytest.raises(ValueError, match="root"):
        parse_task_user("root")
    with pytest.raises(ValueError, match="root"):
        parse_task_user("0")
    with pytest.raises(ValueError, match="no group 'no-such-acsp-group'"):
        parse_task_user("nobody:no-such-acsp-group")
    with pytest.raises(ValueError, match="give its group"):
        parse_task_user("4242424")
    assert parse_task_user("4242424:4242") == TaskUser("4242424", 4242424, 4242, (), "")
    nobody = pwd.getpwnam("nobody")
    parsed = parse_task_user(f"{nobody.pw_uid}")
    assert (parsed.name, parsed.uid, parsed.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert nobody.pw_gid in parsed.groups


OTHER = TaskUser("other", 4242, 4242, (4242,), "")
ALL_CAPABILITIES = "CapEff:\t000001ffffffffff\nCapAmb:\t000001ffffffffff\n"
"""A ``/proc/self/status`` excerpt with every capability effective and ambient."""


def test_switch_check_for_non_root_agent() -> None:
    check_agent_can_switch(OTHER, uses_launcher=True, euid=0, status_text="")
    check_agent_can_switch(OTHER, uses_launcher=True, euid=1000, status_text=ALL_CAPABILITIES)
    # Effective but not ambient capabilities do not reach the launcher, a program of its own.
    effective_only = "CapEff:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
    check_agent_can_switch(OTHER, uses_launcher=False, euid=1000, status_text=effective_only)
    with pytest.raises(SettingsError) as caught:
        check_agent_can_switch(OTHER, uses_launcher=True, euid=1000, status_text=effective_only)
    message = str(caught.value)
    assert message.startswith("ACSP_AGENT_TASK_USER: the agent runs as uid 1000 without")
    assert "ambient CAP_SETUID, ambient CAP_SETGID" in message
    with pytest.raises(SettingsError, match="the agent's own user"):
        check_agent_can_switch(OTHER, uses_launcher=True, euid=4242, status_text=ALL_CAPABILITIES)


@pytest.mark.parametrize("egid", [4242, 7])
def test_task_user_in_agent_group_fails_check(egid: int) -> None:
    user = TaskUser("other", 4242, 4242, (7,), "")

    with pytest.raises(SettingsError) as caught:
        check_agent_can_switch(user, uses_launcher=False, euid=0, status_text="", egid=egid)

    assert str(caught.value).startswith(
        f"ACSP_AGENT_TASK_USER: other (uid 4242, gid 4242) is in the agent's group {egid}"
    )


def test_unsearchable_state_dir_fails_check(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "state").mkdir(parents=True)
    closed.chmod(0o700)
    open_state = tmp_path / "open" / "state"
    open_state.mkdir(parents=True)
    user = TaskUser("other", 4242, 4242, (4242,), "")
    for folder in reversed((open_state, *open_state.parents)):
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(folder.stat().st_mode | 0o001)
    if any(not folder.stat().st_mode & 0o001 for folder in open_state.parents):
        pytest.skip("a parent of the test folder is not searchable by others")
    check_task_folder_reachable(user, open_state)
    with pytest.raises(SettingsError) as caught:
        check_task_folder_reachable(user, closed / "state")
    assert str(caught.value).startswith(f"ACSP_AGENT_STATE_DIR: {closed} is not searchable")


def test_readable_credentials_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private = tmp_path / "private.key"
    private.write_text("key")
    private.chmod(0o600)
    public = tmp_path / "public.key"
    public.write_text("key")
    public.chmod(0o644)
    group_readable = tmp_path / "group.key"
    group_readable.write_text("key")
    group_readable.chmod(0o640)
    task_group = TaskUser("other", 4242, group_readable.stat().st_gid, (), "")
    files = [("A", private), ("B", public), ("C", group_readable)]
    with caplog.at_level(logging.WARNING):
        assert warn_readable_files(None, files) == ["B"]
        assert warn_readable_files(task_group, files) == ["B", "C"]
    assert f"B={public} (mode 644) is readable by users other than the agent's" in caplog.text
    assert "among them the task user other (uid 4242" in caplog.text


def _root_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "runs as root" in record.getMessage()
    ]


def test_root_agent_without_task_user_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AgentSettings.from_env({"ACSP_AGENT_STATE_DIR": str(tmp_path)})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with caplog.at_level(logging.WARNING):
        check_isolation(settings)

    warnings = _root_warnings(caplog)
    assert len(warnings) == 1
    assert "every job's tasks run as root" in warnings[0]
    assert "token signing key" in warnings[0]
    assert f"Set {TASK_USER_ENV} to an unprivileged user" in warnings[0]
    assert TASK_USERS_ENV in warnings[0]


def test_other_agent_user_gets_no_root_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AgentSettings.from_env({"ACSP_AGENT_STATE_DIR": str(tmp_path)})
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with caplog.at_level(logging.WARNING):
        check_isolation(settings)

    assert _root_warnings(caplog) == []


def test_task_user_silences_root_warning(
    reachable_folder: Path, task_user: TaskUser, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {"ACSP_AGENT_STATE_DIR": str(reachable_folder), TASK_USER_ENV: task_user.name}
    with caplog.at_level(logging.WARNING):
        check_isolation(AgentSettings.from_env(environ))

    assert _root_warnings(caplog) == []
