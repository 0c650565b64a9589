"""A task's checkpoint file: its changes go out once each, and the end event carries the last."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.checkpoints import MAX_REFERENCE_BYTES
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.helpers import NODE, ManualClock, make_node

pytestmark = pytest.mark.timeout(60)

TASK = "job-1/2/0"

# Writes the variables it was given to argv[1], then runs until stopped.
SCRIPT = """
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(
    os.environ["ACSP_CHECKPOINT_FILE"] + "\\n" + os.environ.get("ACSP_CHECKPOINT_REF", "")
)
time.sleep(60)
"""


def start_command(uuid: str, out: Path, reference: str) -> wire.Command:
    message = agent_pb2.AgentCommand(
        command_id="c1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=TASK,
        job_id="job-1",
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)],
        command=[sys.executable, "-c", SCRIPT, str(out)],
        grace_seconds=5,
        checkpoint_reference=reference,
    )
    return wire.parse_command(message.SerializeToString())


def task_events(outbox: Outbox, spool: Spool) -> list[agent_pb2.TaskEvent]:
    outbox.flush_to_spool()
    return [
        agent_pb2.TaskEvent.FromString(record.payload)
        for record in spool.peek(10_000)
        if record.subject.startswith("acsp.task.")
    ]


def checkpoints(outbox: Outbox, spool: Spool) -> list[str]:
    return [
        event.checkpoint_reference
        for event in task_events(outbox, spool)
        if event.state == agent_pb2.TASK_STATE_CHECKPOINTED
    ]


async def poll(condition: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def start_task(node: NodeAgent, tmp_path: Path, reference: str) -> tuple[Path, str]:
    """Start the script as a task; return its checkpoint file and the reference it was given."""
    assert node.runner is not None
    uuid = node.backend.discover().accelerators[0].uuid
    out = tmp_path / "task-env.txt"
    await node.handle(start_command(uuid, out, reference))
    await poll(out.exists, "the task to write its environment")
    await poll(lambda: "\n" in out.read_text(), "the task to finish writing")
    path, given = out.read_text().split("\n", 1)
    return Path(path), given


def make(tmp_path: Path) -> tuple[NodeAgent, Outbox, Spool]:
    clock = ManualClock()
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    return make_node(SimulatedBackend(spec, clock), tmp_path, clock, backend_name="simulated")


async def test_each_change_reported_once(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        path, given = await start_task(node, tmp_path, "s3://bucket/start")
        assert given == "s3://bucket/start"
        assert node.report_checkpoints() == 0

        path.write_text("s3://bucket/step-1\n")
        assert node.report_checkpoints() == 1
        assert node.report_checkpoints() == 0
        # The same reference written again (a new modification time) is no change.
        path.write_text("s3://bucket/step-1")
        assert node.report_checkpoints() == 0
        path.write_text("s3://bucket/step-2")
        node.report_usage()
        path.write_text("x" * (MAX_REFERENCE_BYTES + 1))
        assert node.report_checkpoints() == 0
        path.write_text("")
        assert node.report_checkpoints() == 0

        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")
    assert checkpoints(outbox, spool) == ["s3://bucket/step-1", "s3://bucket/step-2"]
    events = [e for e in task_events(outbox, spool) if e.checkpoint_reference]
    assert all(e.HasField("checkpoint_time") for e in events)
    assert all(e.task_id == TASK and e.job_id == "job-1" for e in events)


async def test_start_reference_is_not_reported_back(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        path, _ = await start_task(node, tmp_path, "s3://bucket/start")
        path.write_text("s3://bucket/start")
        assert node.report_checkpoints() == 0
        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")
    assert checkpoints(outbox, spool) == []


async def test_fresh_task_gets_no_start_reference(tmp_path: Path) -> None:
    node, _, _ = make(tmp_path)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        path, given = await start_task(node, tmp_path, "")
        assert given == ""
        assert path.parent == tmp_path / "tasks"
        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")


async def test_end_event_carries_unreported_checkpoint(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        path, _ = await start_task(node, tmp_path, "")
        path.write_text("s3://bucket/step-1")
        assert node.report_checkpoints() == 1
        # Written after the last tick, as a task does on SIGTERM.
        path.write_text("s3://bucket/at-stop")
        assert node.runner is not None
        await node.runner.stop(TASK, "preempted")

    (ended,) = [e for e in task_events(outbox, spool) if e.state == agent_pb2.TASK_STATE_STOPPED]
    assert ended.checkpoint_reference == "s3://bucket/at-stop"
    assert ended.HasField("checkpoint_time")
    assert not path.exists()


async def test_symbolic_link_is_not_read(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a checkpoint")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        path, _ = await start_task(node, tmp_path, "")
        path.symlink_to(secret)
        assert node.report_checkpoints() == 0
        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")
    assert checkpoints(outbox, spool) == []
    assert all(e.checkpoint_reference == "" for e in task_events(outbox, spool))


def played_command(uuid: str, interval: str) -> wire.Command:
    message = agent_pb2.AgentCommand(
        command_id="c1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=TASK,
        job_id="job-1",
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)],
        command=["train"],
        environment={"ACSP_SIMULATED_CHECKPOINT_S": interval},
        simulated_run_seconds=3600,
    )
    return wire.parse_command(message.SerializeToString())


async def test_played_task_checkpoints_each_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    backend = SimulatedBackend(spec, clock)
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        await node.handle(played_command(backend.discover().accelerators[0].uuid, "60"))
        clock.advance(59)
        assert node.report_checkpoints() == 0
        clock.advance(2)
        assert node.report_checkpoints() == 1
        assert node.report_checkpoints() == 0
        clock.advance(130)
        assert node.report_checkpoints() == 1
        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")
    assert checkpoints(outbox, spool) == [f"simulated://{TASK}/60s", f"simulated://{TASK}/180s"]


@pytest.mark.parametrize("interval", ["0", "-5", "nan", "soon"])
async def test_played_task_bad_interval_is_ignored(tmp_path: Path, interval: str) -> None:
    clock = ManualClock()
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    backend = SimulatedBackend(spec, clock)
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        await node.handle(played_command(backend.discover().accelerators[0].uuid, interval))
        clock.advance(600)
        assert node.report_checkpoints() == 0
        assert node.runner is not None
        await node.runner.stop(TASK, "cancelled")
    assert checkpoints(outbox, spool) == []
