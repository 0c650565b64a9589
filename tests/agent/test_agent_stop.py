"""SIGTERM to an agent with a running task: a prompt exit with the usage up to the stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from acsp import subjects
from acsp.v1 import agent_pb2
from agents.state import TaskRecord
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.subprocess_agent import (
    TASK_ID,
    poll,
    recorded_task,
    run_task_then_stop,
    start_agent,
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
