"""SIGTERM to an agent with a running task: a prompt exit with the usage up to the stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import nats
import pytest

from acsp import subjects
from acsp.v1 import agent_pb2
from agents.backends.simulated import SimulatedBackend
from agents.state import TaskRecord
from tests.agent.helpers import NODE
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.subprocess_agent import (
    REPOSITORY,
    SLEEPER,
    SPEC,
    TASK_ID,
    poll,
    recorded_task,
    run_task_then_stop,
    start_agent,
    start_command,
    stream_messages,
    usage_of_task,
)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


_PR_SET_CHILD_SUBREAPER = 36
"""prctl option from <linux/prctl.h>."""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def task_events(url: str) -> list[agent_pb2.TaskEvent]:
    events = []
    for subject, data in await stream_messages(url, subjects.AGENT_STREAM):
        if subject.startswith("acsp.task."):
            event = agent_pb2.TaskEvent()
            event.ParseFromString(data)
            if event.task_id == TASK_ID:
                events.append(event)
    return events


def assert_usage_covers(
    samples: list[agent_pb2.UsageSample], record: TaskRecord, stopped_at: float, exited_at: float
) -> None:
    assert samples, "no usage sample for the task"
    starts = [s.start_time.ToMicroseconds() for s in samples]
    ends = [s.end_time.ToMicroseconds() for s in samples]
    # One sample after another, from the task's start, with no gap and no overlap.
    assert starts[0] == round(record.started_at * 1_000_000)
    assert starts[1:] == ends[:-1]
    assert stopped_at * 1_000_000 <= ends[-1] <= exited_at * 1_000_000
    used = sum(Decimal(s.accelerator_seconds.value) for s in samples)
    assert used == Decimal(ends[-1] - starts[0]) / 1_000_000


@pytest.mark.timeout(90)
async def test_stop_ends_tasks_and_reports_usage(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    record, stopped_at, exited_at = await run_task_then_stop(
        nats_server.url, state_dir, "--stop-tasks-on-exit"
    )
    try:
        await poll(lambda: not alive(record.pid), 5, "the task's process to end")
        assert recorded_task(state_dir) is None
        events = await task_events(nats_server.url)
        # No one asked for the stop, so the scheduler requeues the job instead of failing it.
        assert events[-1].state == agent_pb2.TASK_STATE_LOST
        assert events[-1].message == "the agent stopped"
        samples = await usage_of_task(nats_server.url)
        assert_usage_covers(samples, record, stopped_at, exited_at)
        # The usage ends where the task ended, which the stop event records.
        assert samples[-1].end_time.ToMicroseconds() == events[-1].time.ToMicroseconds()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)


@pytest.mark.timeout(90)
async def test_stop_leaves_tasks_for_adoption(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    record, stopped_at, exited_at = await run_task_then_stop(nats_server.url, state_dir)
    restarted = None
    try:
        assert alive(record.pid)
        still_recorded = recorded_task(state_dir)
        assert still_recorded is not None
        assert still_recorded.pid == record.pid
        samples = await usage_of_task(nats_server.url)
        assert_usage_covers(samples, record, stopped_at, exited_at)

        restarted = await start_agent(nats_server.url, state_dir)

        async def adopted() -> bool:
            events = await task_events(nats_server.url)
            return any("found again" in event.message for event in events)

        deadline = time.monotonic() + 30
        while not await adopted():
            assert time.monotonic() < deadline, "the restarted agent did not adopt the task"
            await asyncio.sleep(0.2)
    finally:
        if restarted is not None:
            restarted.kill()
            await restarted.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)


def _set_subreaper(enabled: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _parent_of(pid: int) -> int | None:
    """Return the parent pid of ``pid`` (also of a zombie), or None once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[-1].split()[1])


def _kill_and_reap(pid: int) -> None:
    """Kill and reap a child of this process, which SIGKILL ends at once."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this test process the child subreaper of its descendants, as ``acsp up`` is.

    A process that the agent leaves behind then becomes a child of this process instead of
    init's, and stays visible (as a zombie once it exits) until it is reaped here.
    """
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)


async def _start_fleet_agent(url: str, state_dir: Path) -> asyncio.subprocess.Process:
    """Start ``python -m agents`` as ``acsp up`` does: simulated, stopping tasks on exit."""
    fleet = state_dir.parent / "fleet.csv"
    fleet.write_text(f"node,model,accelerators\n{SPEC.node},{SPEC.model},{SPEC.accelerators}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
    env.update(ACSP_NATS_URL=url, ACSP_AGENT_STOP_TASKS_ON_EXIT="true", ACSP_LOG_LEVEL="INFO")
    log = os.open(state_dir.parent / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "agents", "--backend", "simulated"),
            *("--fleet", f"{fleet}:{NODE.provider}:{NODE.region}", "--faults", "none"),
            *("--utilization", "none", "--state-dir", str(state_dir)),
            env=env,
            stdout=log,
            stderr=log,
            cwd=REPOSITORY,
        )
    finally:
        os.close(log)


@pytest.mark.timeout(90)
async def test_stop_reaps_idle_launcher(
    tmp_path: Path, nats_server: NatsServer, subreaper: None
) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    agent = await _start_fleet_agent(nats_server.url, state_dir)
    record = None
    try:
        accelerator = SimulatedBackend(SPEC).discover().accelerators[0].uuid
        client = await nats.connect(nats_server.url)
        try:
            subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
            await client.jetstream().publish(subject, start_command(TASK_ID, accelerator, SLEEPER))
        finally:
            await client.close()
        await poll(lambda: recorded_task(state_dir) is not None, 30, "the task to start")
        record = recorded_task(state_dir)
        assert record is not None
        assert record.launcher_pid != 0
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 30) == 0
        await poll(lambda: not alive(record.pid), 5, "the task's process to end")
        # The agent reaped its launcher before it exited, so none was left to this process.
        launcher = record.launcher_pid
        await poll(lambda: _parent_of(launcher) is None, 5, "the task launcher to be reaped")
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        if record is not None:
            if _parent_of(record.launcher_pid) == os.getpid():
                _kill_and_reap(record.launcher_pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)
