"""Programs that cannot run: the job's own errors fail the task once, the node's reject the start.

Each case runs through both ways of starting a task: the task launcher (``posix_spawn``) and
the agent's own ``subprocess.Popen`` (``ACSP_AGENT_RECORD_EXIT_STATUS=false``), which must
report the same state, exit status and message.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agents import programs
from agents.model import TaskSpec, TaskState
from agents.programs import _elf_interpreter, find_executable
from agents.runner import TaskRunner
from agents.state import StateStore
from agents.task_process import TaskLauncher, spawn
from tests.agent.test_runner import (
    Recorder,
    close_launchers,  # noqa: F401 (closes the launchers of make_runner after each test)
    make_runner,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

PATHS = pytest.mark.parametrize("record_exit_status", [True, False], ids=["launcher", "agent"])

Case = Callable[[Path], tuple[tuple[str, ...], int, str]]
"""Prepare a program in the task folder; return the command, exit code and expected reason."""


def write_program(path: Path, content: bytes, mode: int = 0o755) -> None:
    path.write_bytes(content)
    path.chmod(mode)


def missing_interpreter(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    script = tasks / "train.py"
    write_program(script, b"#!/usr/bin/pythonX -u\nprint('never')\n")
    reason = f"cannot run {script}: bad interpreter /usr/bin/pythonX: No such file or directory"
    return (str(script), "--epochs", "3"), 127, reason


def windows_line_ends(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    write_program(tasks / "run.sh", b"#!/bin/sh\r\necho never\r\n")
    reason = (
        "cannot run ./run.sh: bad interpreter '/bin/sh\\r': No such file or directory "
        "(the #! line ends with a carriage return: convert the Windows line ends)"
    )
    return ("./run.sh",), 127, reason


def interpreter_not_executable(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    write_program(tasks / "interpreter", b"#!/bin/sh\n", mode=0o644)
    write_program(tasks / "run.sh", b"#!interpreter\n")
    reason = "cannot run ./run.sh: bad interpreter interpreter: Permission denied"
    return ("./run.sh",), 126, reason


def not_executable(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    write_program(tasks / "run.sh", b"#!/bin/sh\necho never\n", mode=0o644)
    reason = (
        "cannot run ./run.sh: permission denied: the file is not executable (chmod +x makes it so)"
    )
    return ("./run.sh",), 126, reason


def garbage_content(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    write_program(tasks / "model.bin", b"\x00\x01weights, not a program\n")
    reason = (
        "cannot run ./model.bin: exec format error: the file is neither a script with a #! line "
        "nor a binary for this machine"
    )
    return ("./model.bin",), 126, reason


def directory(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    (tasks / "data").mkdir()
    return ("./data",), 126, "cannot run ./data: it is a directory, not a program"


def missing_dynamic_loader(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    true = Path(shutil.which("true") or "/bin/true").resolve()
    loader = _elf_interpreter(str(true))
    if loader is None:
        pytest.skip(f"{true} names no dynamic loader")
    # A loader path of the same length keeps every offset in the file valid.
    absent = loader[:-1] + ("Y" if loader.endswith("X") else "X")
    data = true.read_bytes().replace(loader.encode() + b"\0", absent.encode() + b"\0", 1)
    write_program(tasks / "app", data)
    reason = (
        f"cannot run ./app: bad dynamic loader {absent}: No such file or directory "
        "(the binary is built for another system, or for a C library this node lacks)"
    )
    return ("./app",), 127, reason


def arguments_too_large(tasks: Path) -> tuple[tuple[str, ...], int, str]:
    # Linux takes at most 32 pages per string, 128 KiB with pages of 4 KiB.
    size = 32 * os.sysconf("SC_PAGE_SIZE")
    reason = (
        f"cannot run true ({shutil.which('true')}): argument list too long: the arguments and "
        "environment take "
    )
    return ("true", "x" * size), 126, reason


CASES: dict[str, Case] = {
    "missing interpreter": missing_interpreter,
    "windows line ends": windows_line_ends,
    "interpreter not executable": interpreter_not_executable,
    "not executable": not_executable,
    "garbage content": garbage_content,
    "directory": directory,
    "missing dynamic loader": missing_dynamic_loader,
    "arguments too large": arguments_too_large,
}


@PATHS
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_unrunnable_program_fails_once(
    tmp_path: Path, record_exit_status: bool, case: Case
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    command, exit_code, reason = case(tasks)
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-0",), command))
        await wait_for(lambda: recorder.states("j/1/0") != [])
        # The runner goes on starting tasks.
        await runner.start(TaskSpec("t", "t/1/0", ("GPU-1",), ("true",)))
        await wait_for(lambda: TaskState.SUCCEEDED in recorder.states("t/1/0"))
    assert recorder.states("j/1/0") == [TaskState.FAILED]
    failed = recorder.last("j/1/0")
    assert failed.exit_code == exit_code
    assert failed.reason.startswith(reason)
    assert failed.output_tail == failed.reason + "\n"
    assert runner.running == []
    assert runner._state.node("acme.eu-1.node-1").intents == {}


@PATHS
async def test_program_open_for_writing_rejected(tmp_path: Path, record_exit_status: bool) -> None:
    # Executing a file that a process of the node has open for writing fails with ETXTBSY.
    # That is the state of this node, not a fault of the job, so the start is retried.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    program = tasks / "staged"
    shutil.copy(shutil.which("true") or "/bin/true", program)
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    writer = os.open(program, os.O_WRONLY)
    try:
        try:
            probe = await asyncio.create_subprocess_exec(program)
        except OSError as error:
            assert error.errno == errno.ETXTBSY
        else:
            await asyncio.wait_for(probe.wait(), 10)
            pytest.skip("this kernel executes a file that is open for writing")
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(TaskSpec("j", "j/1/0", ("GPU-0",), ("./staged",)))
            await wait_for(lambda: recorder.states("j/1/0") != [])
    finally:
        os.close(writer)
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    reason = recorder.last("j/1/0").reason
    assert reason.startswith(f"command could not be started: [Errno {errno.ETXTBSY}]")
    assert "staged" in reason


@PATHS
async def test_unusable_task_folder_rejects_start(tmp_path: Path, record_exit_status: bool) -> None:
    # A file in place of the task folder is the node's fault, whatever the job runs.
    (tmp_path / "tasks").write_text("")
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, record_exit_status)
    async with asyncio.TaskGroup() as group:
        runner.attach(group)
        await runner.start(TaskSpec("j", "j/1/0", ("GPU-0",), ("true",)))
        await wait_for(lambda: recorder.states("j/1/0") != [])
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    reason = recorder.last("j/1/0").reason
    assert reason.startswith(f"command could not be started: [Errno {errno.EEXIST}]")
    assert str(tmp_path / "tasks") in reason
    assert runner._state.node("acme.eu-1.node-1").intents == {}


async def test_unopenable_log_is_node_fault(tmp_path: Path) -> None:
    # EISDIR is among the job's own errors of an exec, but here the log file fails, not the exec.
    log = tmp_path / "t.log"
    log.mkdir()
    launcher = TaskLauncher()
    try:
        launch = launcher.launch(
            "/bin/true", ["true"], {}, tmp_path, log, tmp_path / "t.exit", "spawn-id"
        )
        with pytest.raises(OSError) as launched:
            await launch
    finally:
        launcher.close()
    with pytest.raises(OSError) as spawned:
        spawn(("true",), {"PATH": os.defpath}, tmp_path, log)
    for caught in (launched, spawned):
        assert caught.value.errno == errno.EISDIR
        assert caught.value.filename == str(log)


def launcher_without_process_slots(tmp_path: Path) -> TaskLauncher:
    """Return a launcher whose every ``posix_spawn`` fails with EAGAIN, as at a process limit."""
    wrapper = tmp_path / "python-without-process-slots"
    # Started as ``python -I -S launcher.py FD``, it runs the launcher after replacing the spawn.
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import errno, os, runpy, sys\n"
        "def spawn(*args, **kwargs):\n"
        "    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))\n"
        "os.posix_spawn = spawn\n"
        "sys.argv = sys.argv[3:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    wrapper.chmod(0o755)
    return TaskLauncher(python=str(wrapper))


@PATHS
async def test_no_process_slot_rejects_start(
    tmp_path: Path, record_exit_status: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = None
    if record_exit_status:
        launcher = launcher_without_process_slots(tmp_path)
    else:

        def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

        monkeypatch.setattr(subprocess, "Popen", popen)
    recorder = Recorder()
    runner = TaskRunner(
        "acme.eu-1.node-1",
        StateStore(tmp_path / "state.json"),
        tmp_path,
        recorder,
        asyncio.get_running_loop().time,
        ["GPU-0"],
        lambda uuids: {"CUDA_VISIBLE_DEVICES": ",".join(uuids)},
        launcher=launcher,
    )
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            await runner.start(TaskSpec("j", "j/1/0", ("GPU-0",), ("true",)))
            await wait_for(lambda: recorder.states("j/1/0") != [])
    finally:
        if launcher is not None:
            launcher.close()
    assert recorder.states("j/1/0") == [TaskState.START_FAILED]
    assert recorder.last("j/1/0").reason == (
        f"command could not be started: [Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}"
    )
    assert runner._state.node("acme.eu-1.node-1").intents == {}


def test_path_search_reused_briefly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    early, late = tmp_path / "early", tmp_path / "late"
    early.mkdir()
    late.mkdir()
    program = late / "tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    search_path = f"{early}:{late}"
    assert find_executable("tool", search_path, tmp_path) == str(program)

    shadow = early / "tool"
    shadow.write_text("#!/bin/sh\n")
    shadow.chmod(0o755)
    assert find_executable("tool", search_path, tmp_path) == str(program)

    monkeypatch.setattr(programs, "FOUND_ON_PATH_TTL_S", 0.0)
    assert find_executable("tool", search_path, tmp_path) == str(shadow)


def test_path_search_repeated_after_program_removed(tmp_path: Path) -> None:
    # A program found a moment ago and removed since is searched for again, so that the task
    # runs the copy in a later PATH entry instead of failing for good at its spawn.
    early, late = tmp_path / "early", tmp_path / "late"
    early.mkdir()
    late.mkdir()
    for folder in (early, late):
        write_program(folder / "tool", b"#!/bin/sh\n")
    search_path = f"{early}:{late}"
    assert find_executable("tool", search_path, tmp_path) == str(early / "tool")

    (early / "tool").unlink()
    assert find_executable("tool", search_path, tmp_path) == str(late / "tool")

    (late / "tool").unlink()
    with pytest.raises(programs.CommandNotRunnableError) as raised:
        find_executable("tool", search_path, tmp_path)
    assert raised.value.errno == errno.ENOENT
    assert raised.value.exit_code == 127


def test_program_on_path_not_executable(tmp_path: Path) -> None:
    # As in bash, a file of that name without execute permission is denied (126), not missing.
    folder = tmp_path / "bin"
    folder.mkdir()
    write_program(folder / "tool", b"#!/bin/sh\n", mode=0o644)
    with pytest.raises(programs.CommandNotRunnableError) as raised:
        find_executable("tool", f"bin:{os.defpath}", tmp_path)
    assert raised.value.errno == errno.EACCES
    assert raised.value.exit_code == 126
    assert str(raised.value) == (
        f"cannot run tool: permission denied: {folder / 'tool'}: the file is not executable "
        "(chmod +x makes it so)"
    )


class NoexecStatvfs:
    """The ``os.statvfs`` result of a file system mounted noexec."""

    f_flag = os.ST_NOEXEC


def test_program_on_noexec_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod +x does not help there, so the message names the mount instead.
    write_program(tmp_path / "run.sh", b"#!/bin/sh\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: NoexecStatvfs())
    with pytest.raises(programs.CommandNotRunnableError) as raised:
        find_executable("./run.sh", os.defpath, tmp_path)
    assert raised.value.exit_code == 126
    assert str(raised.value) == (
        "cannot run ./run.sh: permission denied: its file system is mounted noexec "
        "(move the program to one that allows programs to run)"
    )


def test_program_executable_by_others_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The file has execute bits, but not for the user that the agent runs as.
    write_program(tmp_path / "run.sh", b"#!/bin/sh\n", mode=0o700)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(programs.CommandNotRunnableError) as raised:
        find_executable("./run.sh", os.defpath, tmp_path)
    assert raised.value.exit_code == 126
    assert str(raised.value) == (
        "cannot run ./run.sh: permission denied: its owner and mode do not let the agent's "
        "user execute it"
    )
