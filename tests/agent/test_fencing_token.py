"""A restarted agent still ignores commands of older scheduler leaders."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from acsp import subjects
from acsp.v1 import agent_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.health import HealthSettings
from agents.model import TaskSpec
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions
from agents.runner import TaskRunner
from agents.spool import Spool
from agents.state import StateStore
from agents.task_process import TaskLauncher
from tests.agent.helpers import NODE, ManualClock
from tests.agent.test_crash_reports import make_node, task_events
from tests.agent.test_runner import wait_for


def saved_token(directory: Path) -> int:
    document = json.loads((directory / "state.json").read_text())
    return int(document["nodes"][NODE.key]["fencing_token"])


async def test_token_survives_restart(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    first, _outbox, spool, _state = make_node(tmp_path, clock, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await first.start(group)
            stop = wire.Command("c1", "stop", NODE, task_id="gone/1/0", fencing_token=5)
            await first.handle(stop)
    finally:
        launcher.close()
    spool.close()
    assert first.fencing_token == 5
    assert saved_token(tmp_path) == 5

    second_launcher = TaskLauncher()
    second, outbox, spool2, state = make_node(tmp_path, clock, second_launcher, "boot-2")
    try:
        async with asyncio.TaskGroup() as group:
            await second.start(group)
            assert second.fencing_token == 5
            assert second.runner is not None
            uuid = second.backend.discover().accelerators[0].uuid
            spec = TaskSpec("old", "old/1/0", (uuid,), ("true",))
            await second.handle(wire.Command("c2", "start", NODE, fencing_token=4, spec=spec))
            spec = TaskSpec("new", "new/1/0", (uuid,), ("true",))
            await second.handle(wire.Command("c3", "start", NODE, fencing_token=5, spec=spec))
            await wait_for(lambda: "new/1/0" in second.runner._finished)  # type: ignore[union-attr]
            outbox.flush_to_spool()
            state.save()
    finally:
        second_launcher.close()
    started = {event.task_id for event in task_events(spool2)}
    assert "new/1/0" in started
    assert "old/1/0" not in started


class BatchMessage:
    """The parts of a NATS message that the agent's command batch reads."""

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data
        self.acked = False

    async def ack(self) -> None:
        self.acked = True

    async def term(self) -> None:
        raise AssertionError(f"command on {self.subject} was rejected")


def stop_message(ref: wire.NodeRef, token: int) -> BatchMessage:
    command = agent_pb2.AgentCommand(
        command_id=f"stop-{ref.node}",
        kind=agent_pb2.COMMAND_KIND_STOP_TASK,
        node=ref.message(),
        task_id="gone/1/0",
        reason="cancelled",
        fencing_token=token,
    )
    subject = subjects.command_subject(ref.provider, ref.region, ref.node)
    return BatchMessage(subject, command.SerializeToString())


async def test_batch_saves_new_tokens_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock(time.time())
    state = StateStore(tmp_path / "state.json")
    outbox = Outbox(Spool(tmp_path / "spool"), before_append=state.save_before_spool)
    refs = [wire.NodeRef("acme", "eu-1", f"node-{index}") for index in range(3)]
    nodes = [
        NodeAgent(
            ref,
            SimulatedBackend(
                FleetNode(ref.provider, ref.region, ref.node, "A100-SXM4-80GB", 8), clock
            ),
            "simulated",
            state,
            tmp_path,
            outbox,
            "boot-1",
            clock,
            HealthSettings(),
        )
        for ref in refs
    ]
    process = AgentProcess(nodes, outbox, state, ConnectionOptions(servers=["nats://127.0.0.1:1"]))
    saves = 0
    save = StateStore.save

    def counted_save(self: StateStore) -> None:
        nonlocal saves
        saves += 1
        save(self)

    async with asyncio.TaskGroup() as group:
        for node in nodes:
            await node.start(group)
        monkeypatch.setattr(StateStore, "save", counted_save)
        messages = [stop_message(ref, 7) for ref in refs]
        await process._handle_commands(messages)  # type: ignore[arg-type]

    assert saves == 1
    assert all(message.acked for message in messages)
    document = json.loads((tmp_path / "state.json").read_text())
    assert [document["nodes"][ref.key]["fencing_token"] for ref in refs] == [7, 7, 7]
    assert [node.fencing_token for node in nodes] == [7, 7, 7]


async def test_batch_keeps_token_order(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    node, outbox, spool, state = make_node(tmp_path, clock, launcher, "boot-1")
    process = AgentProcess([node], outbox, state, ConnectionOptions(servers=["nats://127.0.0.1:1"]))
    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            messages = [stop_message(NODE, 3), stop_message(NODE, 9)]
            await process._handle_commands(messages)  # type: ignore[arg-type]
    finally:
        launcher.close()
    spool.close()
    assert node.fencing_token == 9
    assert saved_token(tmp_path) == 9


async def test_redelivered_batch_saves_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    node, outbox, spool, state = make_node(tmp_path, clock, launcher, "boot-1")
    process = AgentProcess([node], outbox, state, ConnectionOptions(servers=["nats://127.0.0.1:1"]))
    save = StateStore.save
    failing = True

    def save_or_fail(self: StateStore) -> None:
        if failing:
            raise OSError(28, "No space left on device")
        save(self)

    tokens_on_disk_at_stop: list[int] = []
    stop = TaskRunner.stop

    async def recorded_stop(self: TaskRunner, task_id: str, reason: str) -> None:
        tokens_on_disk_at_stop.append(saved_token(tmp_path))
        await stop(self, task_id, reason)

    try:
        async with asyncio.TaskGroup() as group:
            await node.start(group)
            state.save()
            monkeypatch.setattr(StateStore, "save", save_or_fail)
            monkeypatch.setattr(TaskRunner, "stop", recorded_stop)
            with pytest.raises(OSError):
                await process._handle_commands([stop_message(NODE, 7)])  # type: ignore[list-item]
            failing = False
            # JetStream delivers the unacknowledged command again.
            message = stop_message(NODE, 7)
            await process._handle_commands([message])  # type: ignore[list-item]
    finally:
        launcher.close()
    spool.close()
    assert message.acked
    assert tokens_on_disk_at_stop == [7]
    assert node.fencing_token == 7
