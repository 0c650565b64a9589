"""Task logs over their size limit keep their start and latest output, with a marker between."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents import runner as runner_module
from agents import task_logs
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.health import HealthSettings
from agents.model import TaskSpec, TaskState
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.runner import TaskRunner
from agents.settings import AgentSettings
from agents.spool import Spool
from agents.state import StateStore
from agents.task_logs import (
    MIN_TASK_LOG_MAX_BYTES,
    TASK_LOG_MAX_BYTES,
    UnreadableLogError,
    trim_log,
)
from agents.task_process import TaskLauncher
from services.runtime.settings import SettingsError
from tests.agent.helpers import NODE, ManualClock
from tests.agent.test_runner import ACCELERATORS, Recorder, _visible, python_command, wait_for

SPEC = FleetNode("acme", "eu-1", "node-1", "A100-SXM4-80GB", 8)
LIMIT = MIN_TASK_LOG_MAX_BYTES
QUARTER = LIMIT // 4
MARKER = re.compile(rb"\n\[acsp agent: (\d+) bytes of output dropped here[^\n]*\] *\n")
BLOCK = os.statvfs("/tmp").f_bsize
"""Block size of the file systems of the tests' logs: a trim's cuts fall on blocks."""
TRIMMED_MAX_BYTES = LIMIT // 2 + 2 * BLOCK
"""Size of a trimmed log at most: half the limit, plus the blocks the kept start and tail
grow by to reach a block boundary."""

PRINTER = """
import os, sys, time
for i in range(20000):
    sys.stdout.write(f"line {i:06d}\\n")
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
sys.stdout.write("after the trim\\n")
"""
"""Writes 240,000 bytes, waits for the file named by its argument, then writes one line."""


def make_node(directory: Path, launcher: TaskLauncher | None, max_bytes: int = LIMIT) -> NodeAgent:
    clock = ManualClock(time.time())
    spool = Spool(directory / "spool")
    state = StateStore(directory / "state.json")
    return NodeAgent(
        NODE,
        SimulatedBackend(SPEC, clock),
        "simulated",
        state,
        directory,
        Outbox(spool, before_append=state.save_before_spool),
        "boot-1",
        clock,
        HealthSettings(),
        launcher=launcher,
        task_log_max_bytes=max_bytes,
    )


def size_of(path: Path) -> int:
    return path.stat().st_size


def contents(path: Path) -> bytes:
    return path.read_bytes()


def printed(start: int, stop: int) -> bytes:
    return b"".join(b"line %06d\n" % i for i in range(start, stop))


def split_log(data: bytes) -> tuple[bytes, int, bytes]:
    """Return the kept start of a trimmed log, the count of its one marker, and the kept tail."""
    markers = list(MARKER.finditer(data))
    assert len(markers) == 1
    marker = markers[0]
    return data[: marker.start()], int(marker.group(1)), data[marker.end() :]


def assert_trimmed(data: bytes, original: bytes) -> None:
    """Check that ``data`` is ``original`` trimmed: nothing lost after the cut, counted right."""
    head, dropped, tail = split_log(data)
    assert original.startswith(head)
    assert original.endswith(tail)
    assert len(head) + dropped + len(tail) == len(original)
    assert QUARTER <= len(head) < QUARTER + BLOCK
    assert QUARTER <= len(tail) < QUARTER + BLOCK


def test_trim_keeps_start_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    log.write_bytes(original)

    dropped = trim_log(str(log), LIMIT)

    data = log.read_bytes()
    assert_trimmed(data, original)
    _, count, tail = split_log(data)
    assert count == dropped
    # The marker ends on a block boundary, so the trim could collapse the middle.
    assert (len(data) - len(tail)) % BLOCK == 0


def test_copying_trim_keeps_same_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a file system that cannot collapse a range of a file.
    monkeypatch.setattr(task_logs, "_collapse", lambda descriptor, start, stop: False)
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    log.write_bytes(original)
    copy = tmp_path / "copy.log"
    copy.write_bytes(original)

    dropped = trim_log(str(log), LIMIT)
    monkeypatch.undo()
    collapsed = trim_log(str(copy), LIMIT)

    assert dropped == collapsed
    assert log.read_bytes() == copy.read_bytes()
    assert_trimmed(log.read_bytes(), original)


def test_failed_collapse_leaves_log_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fallocate(descriptor: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(task_logs, "_fallocate", lambda: failing_fallocate)
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    log.write_bytes(original)

    for _ in range(2):
        with pytest.raises(OSError, match="collapsing bytes"):
            trim_log(str(log), LIMIT)
        assert log.read_bytes() == original

    monkeypatch.undo()
    trim_log(str(log), LIMIT)
    # The failed attempts counted nothing as dropped.
    assert_trimmed(log.read_bytes(), original)


def test_second_trim_adds_to_count(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    log.write_bytes(original)
    first = trim_log(str(log), LIMIT)
    more = printed(30000, 40000)
    with open(log, "ab") as file:
        file.write(more)

    second = trim_log(str(log), LIMIT)

    data = log.read_bytes()
    assert_trimmed(data, original + more)
    _, count, tail = split_log(data)
    assert count == first + second
    assert more.endswith(tail)


def test_longer_count_keeps_marker_end(tmp_path: Path) -> None:
    # 100,000 lines drop a count of six digits, and then of seven: the marker grows by one byte.
    log = tmp_path / "t.log"
    original = printed(0, 80000)
    log.write_bytes(original)
    trim_log(str(log), LIMIT)
    first_head, _, _ = split_log(log.read_bytes())
    more = printed(80000, 100000)
    with open(log, "ab") as file:
        file.write(more)

    trim_log(str(log), LIMIT)

    data = log.read_bytes()
    head, count, tail = split_log(data)
    assert count >= 1_000_000
    assert len(head) == len(first_head) - 1
    assert (len(data) - len(tail)) % BLOCK == 0
    assert len(head) + count + len(tail) == len(original) + len(more)


def test_marker_of_unaligned_trim_is_kept(tmp_path: Path) -> None:
    # A marker right after the first quarter, as agents that did not align their trims wrote.
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    old_marker = b"\n[acsp agent: 1000 bytes of output dropped here because of an old trim]\n"
    log.write_bytes(original[:QUARTER] + old_marker + original[QUARTER + 1000 :])

    dropped = trim_log(str(log), LIMIT)

    head, count, tail = split_log(log.read_bytes())
    assert head == original[:QUARTER]
    assert count == 1000 + dropped
    assert len(head) + count + len(tail) == len(original)
    assert original.endswith(tail)


WRITER = """
import os, sys
index = 0
while not os.path.exists(sys.argv[1]):
    for _ in range(100):
        os.write(1, b"line %09d\\n" % index)
        index += 1
os.write(1, b"end %d\\n" % index)
"""
"""Writes numbered lines, one system call each, until the file named by its argument exists."""


def written_by_writer(data: bytes) -> bytes:
    """Return all that :data:`WRITER` wrote, from its last line in ``data``."""
    assert data.endswith(b"\n")
    last = data[data.rindex(b"\n", 0, len(data) - 1) + 1 :]
    assert last.startswith(b"end ")
    count = int(last.split()[1])
    return b"".join(b"line %09d\n" % index for index in range(count)) + last


def collapse_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x" * 3 * BLOCK)
    descriptor = os.open(probe, os.O_RDWR)
    try:
        return task_logs._collapse(descriptor, BLOCK, 2 * BLOCK)
    finally:
        os.close(descriptor)
        probe.unlink()


@pytest.mark.timeout(60)
def test_trim_loses_no_concurrent_output(tmp_path: Path) -> None:
    if not collapse_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} cannot collapse a range of a file")
    log = tmp_path / "t.log"
    stop = tmp_path / "stop"
    # The same flags as the launcher's, so that the writer appends at the end after a trim.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    descriptor = os.open(log, flags, 0o640)
    try:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(stop)], stdout=descriptor, stdin=subprocess.DEVNULL
        )
    finally:
        os.close(descriptor)
    trims = 0
    try:
        deadline = time.monotonic() + 20
        while trims < 300 and time.monotonic() < deadline:
            if trim_log(str(log), LIMIT):
                trims += 1
    finally:
        stop.touch()
        writer.wait(timeout=10)

    assert trims >= 50
    data = log.read_bytes()
    written = written_by_writer(data)
    head, dropped, tail = split_log(data)
    assert written.startswith(head)
    # Every line after the last trim's cut is there, in order, and the count is exact.
    assert written.endswith(tail)
    assert len(head) + dropped + len(tail) == len(written)


def test_log_within_limit_is_untouched(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    log.write_bytes(b"x" * LIMIT)

    assert trim_log(str(log), LIMIT) == 0
    assert log.read_bytes() == b"x" * LIMIT


def test_trim_skips_symlinked_log(tmp_path: Path) -> None:
    # A task that can write its task folder may put a link to another file in place of its log.
    target = tmp_path / "other.txt"
    original = printed(0, 30000)
    target.write_bytes(original)
    log = tmp_path / "t.log"
    log.symlink_to(target)

    with pytest.raises(UnreadableLogError, match="symbolic link"):
        trim_log(str(log), LIMIT)

    assert target.read_bytes() == original


@pytest.mark.timeout(10)
def test_trim_skips_fifo_log(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    os.mkfifo(log)

    with pytest.raises(UnreadableLogError, match="not a regular file"):
        trim_log(str(log), LIMIT)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_trim_skips_log_of_other_user(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    original = printed(0, 30000)
    log.write_bytes(original)
    os.chown(log, 65534, 65534)

    with pytest.raises(UnreadableLogError, match="belongs to uid 65534"):
        trim_log(str(log), LIMIT)

    assert log.read_bytes() == original


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_launcher", [True, False], ids=["launcher", "agent"])
async def test_running_task_writes_after_kept_tail(tmp_path: Path, with_launcher: bool) -> None:
    launcher = TaskLauncher() if with_launcher else None
    node = make_node(tmp_path, launcher)
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            runner = node.runner
            assert runner is not None
            uuid = node.backend.discover().accelerators[0].uuid
            command = (*python_command(PRINTER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", (uuid,), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: size_of(log) >= 20000 * 12, 30)

            runner.trim_logs()
            await wait_for(lambda: size_of(log) <= TRIMMED_MAX_BYTES, 10)
            go.touch()
            await wait_for(lambda: not runner.running, 30)
    finally:
        if launcher is not None:
            launcher.close()

    data = contents(log)
    # Without O_APPEND the task would write at its old offset, past a hole of zero bytes.
    assert b"\x00" not in data
    assert data.startswith(printed(0, 10))
    assert data.endswith(printed(19990, 20000) + b"after the trim\n")
    assert_trimmed(data[: -len(b"after the trim\n")], printed(0, 20000))


@pytest.mark.timeout(60)
async def test_ended_task_log_is_trimmed(tmp_path: Path) -> None:
    launcher = TaskLauncher()
    node = make_node(tmp_path, launcher)
    go = tmp_path / "go"
    go.touch()
    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            runner = node.runner
            assert runner is not None
            uuid = node.backend.discover().accelerators[0].uuid
            command = (*python_command(PRINTER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", (uuid,), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    assert size_of(log) < LIMIT
    assert contents(log).endswith(b"after the trim\n")


WAITER = """
import os, sys, time
sys.stdout.write("started\\n")
sys.stdout.flush()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
"""
"""Writes one line, then waits for the file named by its argument."""


@pytest.mark.timeout(60)
async def test_symlinked_log_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    launcher = TaskLauncher()
    runner = make_runner(tmp_path, Recorder(), launcher)
    target = tmp_path / "other.txt"
    original = printed(0, 30000)
    target.write_bytes(original)
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            command = (*python_command(WAITER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", ("GPU-0",), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: size_of(log) > 0, 30)
            link = tmp_path / "link"
            os.symlink(target, link)
            os.replace(link, log)

            # The size check reads the link itself, which is far below the limit, so neither
            # this trim nor the one after the task ends opens the file it points to.
            runner.trim_logs()
            go.touch()
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    assert "failed to trim its log" not in caplog.text
    assert target.read_bytes() == original


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
async def test_end_event_ignores_replaced_log(tmp_path: Path, kind: str) -> None:
    launcher = TaskLauncher()
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, launcher)
    target = tmp_path / "other.txt"
    target.write_bytes(b"not the task's output\n")
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            command = (*python_command(WAITER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", ("GPU-0",), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: size_of(log) > 0, 30)
            replacement = tmp_path / "replacement"
            if kind == "symlink":
                os.symlink(target, replacement)
            else:
                os.mkfifo(replacement)
            os.replace(replacement, log)

            go.touch()
            # A FIFO with no writer would block a plain open, and the event loop with it.
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    ended = recorder.last("job/1/0")
    assert ended.state == TaskState.SUCCEEDED
    assert "not the task's output" not in ended.output_tail


class BlockedTrims:
    """Stands in for ``trim_log``: each call waits for ``release``, then trims."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, path: str, max_bytes: int) -> int:
        with self._lock:
            self.threads.append(threading.current_thread())
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            # Bounded, so that a trim run on the event loop fails the test instead of hanging.
            self.release.wait(5)
            return trim_log(path, max_bytes)
        finally:
            with self._lock:
                self.active -= 1


def make_runner(directory: Path, recorder: Recorder, launcher: TaskLauncher) -> TaskRunner:
    return TaskRunner(
        "acme.eu-1.node-1",
        StateStore(directory / "state.json"),
        directory,
        recorder,
        time.time,
        ACCELERATORS,
        _visible,
        launcher=launcher,
        task_log_max_bytes=LIMIT,
    )


@pytest.mark.timeout(60)
async def test_trim_runs_in_thread_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims = BlockedTrims()
    monkeypatch.setattr(runner_module, "trim_log", trims)
    launcher = TaskLauncher()
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, launcher)
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            command = (*python_command(PRINTER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", ("GPU-0",), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: size_of(log) >= 20000 * 12, 30)

            runner.trim_logs()
            runner.trim_logs()
            await wait_for(lambda: len(trims.threads) == 1, 10)
            runner.trim_logs()
            assert len(trims.threads) == 1
            trims.release.set()
            await wait_for(lambda: size_of(log) <= TRIMMED_MAX_BYTES, 10)
            go.touch()
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    # One periodic trim and none at the task's end, because the log was then within its limit.
    assert len(trims.threads) == 1
    assert trims.max_active == 1
    assert threading.main_thread() not in trims.threads


@pytest.mark.timeout(60)
async def test_end_waits_for_running_trim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims = BlockedTrims()
    monkeypatch.setattr(runner_module, "trim_log", trims)
    launcher = TaskLauncher()
    recorder = Recorder()
    runner = make_runner(tmp_path, recorder, launcher)
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            command = (*python_command(PRINTER), str(go))
            await runner.start(TaskSpec("job", "job/1/0", ("GPU-0",), command))
            log = Path(runner.running[0].log_path)
            await wait_for(lambda: size_of(log) >= 20000 * 12, 30)

            runner.trim_logs()
            await wait_for(lambda: len(trims.threads) == 1, 10)
            # The task ends while its log's trim waits.
            go.touch()
            exit_status = runner._exit_path("job/1/0")
            await wait_for(exit_status.exists, 10)
            assert runner.running
            trims.release.set()
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    assert trims.max_active == 1
    final = recorder.last("job/1/0")
    assert final.state is TaskState.SUCCEEDED
    assert final.output_tail.endswith("line 019999\nafter the trim\n")
    assert size_of(log) <= TRIMMED_MAX_BYTES


@pytest.mark.timeout(60)
async def test_at_most_two_trims_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims = BlockedTrims()
    monkeypatch.setattr(runner_module, "trim_log", trims)
    launcher = TaskLauncher()
    runner = make_runner(tmp_path, Recorder(), launcher)
    go = tmp_path / "go"
    try:
        async with asyncio.TaskGroup() as group:
            runner.attach(group)
            for index in range(3):
                command = (*python_command(PRINTER), str(go))
                spec = TaskSpec("job", f"job/1/{index}", (f"GPU-{index}",), command)
                await runner.start(spec)
            logs = [Path(record.log_path) for record in runner.running]
            await wait_for(lambda: all(size_of(log) >= 20000 * 12 for log in logs), 30)

            runner.trim_logs()
            await wait_for(lambda: len(trims.threads) == 2, 10)
            runner.trim_logs()
            assert len(trims.threads) == 2
            trims.release.set()
            await wait_for(lambda: sum(size_of(log) > LIMIT for log in logs) == 1, 10)

            def trimmed_all() -> bool:
                # A finished trim frees its slot only after its thread returns, so the check
                # runs again until the third log gets one.
                runner.trim_logs()
                return all(size_of(log) <= TRIMMED_MAX_BYTES for log in logs)

            await wait_for(trimmed_all, 10)
            # The trims at the tasks' ends are not limited, so the maximum is taken before.
            max_active = trims.max_active
            go.touch()
            await wait_for(lambda: not runner.running, 30)
    finally:
        launcher.close()

    assert max_active == 2


def test_settings_default_log_limit() -> None:
    settings = AgentSettings.from_env({})

    assert settings.task_log_max_bytes == TASK_LOG_MAX_BYTES


def test_settings_read_log_limit() -> None:
    settings = AgentSettings.from_env({"ACSP_AGENT_TASK_LOG_MAX_BYTES": "1048576"})

    assert settings.task_log_max_bytes == 1 << 20


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1000", r"ACSP_AGENT_TASK_LOG_MAX_BYTES.*1000 is below the minimum"),
        ("lots", r"ACSP_AGENT_TASK_LOG_MAX_BYTES.*lots"),
    ],
)
def test_settings_reject_bad_log_limit(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        AgentSettings.from_env({"ACSP_AGENT_TASK_LOG_MAX_BYTES": value})


def test_odd_limit_still_bounds_log(tmp_path: Path) -> None:
    # A limit that is not a multiple of four still keeps the log within it after a trim.
    log = tmp_path / "t.log"
    log.write_bytes(os.urandom(LIMIT * 3))

    trim_log(str(log), LIMIT + 3)

    assert log.stat().st_size <= LIMIT + 3
