"""What an agent killed before its queued messages reached the spool reports after a restart."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from acsp.v1 import agent_pb2
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.health import HealthSettings
from agents.model import TaskSpec
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.spool import Spool
from agents.state import StateStore
from agents.task_process import TaskLauncher
from tests.agent.helpers import NODE, ManualClock
from tests.agent.test_runner import wait_for

SPEC = FleetNode("acme", "eu-1", "node-1", "A100-SXM4-80GB", 8)


def make_node(
    directory: Path, clock: Callable[[], float], launcher: TaskLauncher, boot_id: str
) -> tuple[NodeAgent, Outbox, Spool, StateStore]:
    spool = Spool(directory / "spool")
    state = StateStore(directory / "state.json")
    outbox = Outbox(spool, before_append=state.save_before_spool)
    node = NodeAgent(
        NODE,
        SimulatedBackend(SPEC, clock),
        "simulated",
        state,
        directory,
        outbox,
        boot_id,
        clock,
        HealthSettings(),
        launcher=launcher,
    )
    return node, outbox, spool, state


def saved_tasks(directory: Path) -> list[str]:
    document = json.loads((directory / "state.json").read_text())
    return [task["task_id"] for task in document["nodes"][NODE.key]["tasks"]]


def saved_usage_mark(directory: Path) -> float:
    document = json.loads((directory / "state.json").read_text())
    return float(document["nodes"][NODE.key]["usage_reported_until"])


def task_events(spool: Spool) -> list[agent_pb2.TaskEvent]:
    events = []
    for record in spool.peek(10_000):
        if record.subject.startswith("acsp.task."):
            message = agent_pb2.TaskEvent()
            message.ParseFromString(record.payload)
            events.append(message)
    return events


async def test_end_not_spooled_is_reported_again(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    first, _outbox, spool, state = make_node(tmp_path, clock, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await first.start(group)
            assert first.runner is not None
            uuid = first.backend.discover().accelerators[0].uuid
            await first.runner.start(TaskSpec("job", "job/1/0", (uuid,), ("sh", "-c", "exit 3")))
            await wait_for(lambda: "job/1/0" in first.runner._finished)  # type: ignore[union-attr]
            # A save while the end event waits in memory, then the agent dies.
            state.save()
    finally:
        launcher.close()
    spool.close()
    assert saved_tasks(tmp_path) == ["job/1/0"]

    second_launcher = TaskLauncher()
    second, outbox2, spool2, state2 = make_node(tmp_path, clock, second_launcher, "boot-2")
    try:
        async with asyncio.TaskGroup() as group:
            await second.start(group)
            outbox2.flush_to_spool()
            state2.save()
    finally:
        second_launcher.close()
    ends = [e for e in task_events(spool2) if e.task_id == "job/1/0"]
    assert len(ends) == 1
    assert ends[0].state == agent_pb2.TASK_STATE_EXITED
    assert ends[0].exit_code == 3
    # Once the end is in the spool, the state file lets the task go.
    assert saved_tasks(tmp_path) == []


async def test_spooled_end_leaves_state(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    node, outbox, spool, state = make_node(tmp_path, clock, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            assert node.runner is not None
            uuid = node.backend.discover().accelerators[0].uuid
            await node.runner.start(TaskSpec("ok", "ok/1/0", (uuid,), ("true",)))
            await wait_for(lambda: "ok/1/0" in node.runner._finished)  # type: ignore[union-attr]
            state.save()
            assert saved_tasks(tmp_path) == ["ok/1/0"]
            outbox.flush_to_spool()
            state.save()
    finally:
        launcher.close()
    assert saved_tasks(tmp_path) == []
    assert [e.state for e in task_events(spool) if e.task_id == "ok/1/0"] == [
        agent_pb2.TASK_STATE_STARTED,
        agent_pb2.TASK_STATE_EXITED,
    ]


async def test_usage_marked_when_spooled(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    node, outbox, _spool, state = make_node(tmp_path, clock, launcher, "boot-1")
    sleeper = (sys.executable, "-c", "import time; time.sleep(60)")
    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            assert node.runner is not None
            uuid = node.backend.discover().accelerators[0].uuid
            await node.runner.start(TaskSpec("u", "u/1/0", (uuid,), sleeper))
            outbox.flush_to_spool()
            before = saved_usage_mark(tmp_path)
            clock.advance(30)
            assert node.report_usage() == 1
            # A save while the samples wait in memory keeps the old mark, so a restarted agent
            # reports this time again instead of never.
            state.save()
            assert saved_usage_mark(tmp_path) == before
            outbox.flush_to_spool()
            assert saved_usage_mark(tmp_path) == clock.now
            await node.runner.stop("u/1/0", "cleanup")
    finally:
        launcher.close()


def usage_samples(spool: Spool) -> list[agent_pb2.UsageSample]:
    samples: list[agent_pb2.UsageSample] = []
    for record in spool.peek(10_000):
        if record.subject.startswith("acsp.usage."):
            report = agent_pb2.UsageReport()
            report.ParseFromString(record.payload)
            samples.extend(report.samples)
    return samples


async def test_task_ended_while_down_is_charged(tmp_path: Path) -> None:
    launcher = TaskLauncher()
    first, outbox, spool, _state = make_node(tmp_path, time.time, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await first.start(group)
            assert first.runner is not None
            uuid = first.backend.discover().accelerators[0].uuid
            await first.runner.start(TaskSpec("d", "d/1/0", (uuid,), ("sleep", "1")))
            assert first.report_usage() == 1
            outbox.flush_to_spool()
            reported_until = saved_usage_mark(tmp_path)
            earlier = {sample.sample_id for sample in usage_samples(spool)}
            # The agent dies while the task runs: its supervisor stops, the task goes on.
            for task in first.runner._tasks.values():
                assert task.supervisor is not None
                task.supervisor.cancel()
    finally:
        launcher.close()
    spool.close()
    exit_file = tmp_path / "tasks" / "d_1_0.exit"
    await wait_for(exit_file.exists, 10.0)
    ended_at = exit_file.stat().st_mtime

    second_launcher = TaskLauncher()
    second, outbox2, spool2, _state2 = make_node(tmp_path, time.time, second_launcher, "boot-2")
    try:
        async with asyncio.TaskGroup() as group:
            await second.start(group)
            assert second.report_usage() == 1
            outbox2.flush_to_spool()
    finally:
        second_launcher.close()
    # The second agent charges the time from the first one's last report to the recorded end.
    late = [s for s in usage_samples(spool2) if s.sample_id not in earlier]
    assert len(late) == 1
    assert abs(late[0].start_time.ToNanoseconds() / 1e9 - reported_until) < 0.001
    assert abs(late[0].end_time.ToNanoseconds() / 1e9 - ended_at) < 0.001
    ends = [e for e in task_events(spool2) if e.task_id == "d/1/0"]
    # The first agent's start event, then the second agent's report of the end.
    assert [e.state for e in ends] == [agent_pb2.TASK_STATE_STARTED, agent_pb2.TASK_STATE_EXITED]
    assert abs(ends[-1].time.ToNanoseconds() / 1e9 - ended_at) < 0.001


def saved_ended(directory: Path) -> list[str]:
    """Return the task ids in the ended-task journal beside the state file."""
    journal = directory / "state.json.ended"
    if not journal.exists():
        return []
    return [json.loads(line)["task_id"] for line in journal.read_text().splitlines()]


async def test_ended_task_usage_survives_crash(tmp_path: Path) -> None:
    launcher = TaskLauncher()
    first, outbox, spool, state = make_node(tmp_path, time.time, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await first.start(group)
            assert first.runner is not None
            uuid = first.backend.discover().accelerators[0].uuid
            await first.runner.start(TaskSpec("e", "e/1/0", (uuid,), ("sleep", "0.5")))
            assert first.report_usage() == 1
            outbox.flush_to_spool()
            reported_until = saved_usage_mark(tmp_path)
            await wait_for(lambda: "e/1/0" in first.runner._finished)  # type: ignore[union-attr]
            # The end event is in the spool, the usage up to the end is not: the agent dies.
            outbox.flush_to_spool()
            state.save()
            earlier = {sample.sample_id for sample in usage_samples(spool)}
            ended_events = len(task_events(spool))
    finally:
        launcher.close()
    spool.close()
    assert saved_tasks(tmp_path) == []
    assert saved_ended(tmp_path) == ["e/1/0"]

    second_launcher = TaskLauncher()
    second, outbox2, spool2, state2 = make_node(tmp_path, time.time, second_launcher, "boot-2")
    try:
        async with asyncio.TaskGroup() as group:
            await second.start(group)
            assert second.report_usage() == 1
            outbox2.flush_to_spool()
            state2.save()
    finally:
        second_launcher.close()
    late = [s for s in usage_samples(spool2) if s.sample_id not in earlier]
    assert len(late) == 1
    assert abs(late[0].start_time.ToNanoseconds() / 1e9 - reported_until) < 0.001
    assert late[0].end_time.ToNanoseconds() / 1e9 > reported_until
    # The end was reported once, by the first agent, and the report let the task go.
    assert len(task_events(spool2)) == ended_events
    assert saved_ended(tmp_path) == []
