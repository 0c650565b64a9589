"""An NVML agent process (fake pynvml) against a real nats-server: commands in, events out."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from agents.backends.nvml import NvmlBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from tests.agent.fake_nvml import FakeNvml
from tests.agent.helpers import NODE
from tests.agent.natsserver import NatsServer, declare_agent_streams


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


async def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def start_command(task_id: str, accelerators: list[str], argv: list[str]) -> bytes:
    return agent_pb2.AgentCommand(
        command_id=f"start-{task_id}",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=task_id,
        job_id=task_id.split("/")[0],
        accelerators=[
            scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)
            for uuid in accelerators
        ],
        command=argv,
        wall_time_seconds=60,
        grace_seconds=5,
    ).SerializeToString()


class AgentStream:
    """Reads task and inventory messages from the agent stream as they arrive."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.task_events: list[agent_pb2.TaskEvent] = []
        self.inventories: list[agent_pb2.Inventory] = []

    async def collect(self) -> None:
        client = await nats.connect(self.url)
        try:
            js = client.jetstream()
            subscription = await js.pull_subscribe(
                "acsp.>",
                stream=subjects.AGENT_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE),
            )
            while True:
                try:
                    messages = await subscription.fetch(64, timeout=0.5)
                except TimeoutError:
                    continue
                for message in messages:
                    if message.subject.startswith("acsp.task."):
                        event = agent_pb2.TaskEvent()
                        event.ParseFromString(message.data)
                        self.task_events.append(event)
                    elif message.subject.startswith("acsp.inventory."):
                        inventory = agent_pb2.Inventory()
                        inventory.ParseFromString(message.data)
                        self.inventories.append(inventory)
        finally:
            await client.close()

    def states(self, task_id: str) -> list[int]:
        return [e.state for e in self.task_events if e.task_id == task_id]


@pytest.mark.timeout(90)
async def test_nvml_agent_runs_commands_and_reports(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml.h100_node(8)
    fake.install(monkeypatch)
    state = StateStore(tmp_path / "agent" / "state.json")
    outbox = Outbox(
        Spool(tmp_path / "agent" / "spool"), retry_s=0.2, before_append=state.save_before_spool
    )
    node = NodeAgent(
        NODE,
        NvmlBackend(),
        "nvml",
        state,
        tmp_path / "agent",
        outbox,
        "boot-1",
        time.time,
        blocking_backend=True,
    )
    process = AgentProcess(
        [node],
        outbox,
        state,
        ConnectionOptions(servers=[nats_server.url], reconnect_wait_s=0.2),
        Intervals(heartbeat_s=0.3, read_s=0.2, usage_s=0.5),
    )
    stop = asyncio.Event()
    agent = asyncio.create_task(process.run(stop))
    stream = AgentStream(nats_server.url)
    reader = asyncio.create_task(stream.collect())
    try:
        await poll(lambda: bool(stream.inventories), 20, "the inventory")
        inventory = stream.inventories[0]
        assert [a.accelerator_id for a in inventory.accelerators] == [g.uuid for g in fake.gpus]
        assert inventory.backend == "nvml"
        assert "cuda-12" in inventory.software_stacks

        chosen = [fake.gpus[2].uuid, fake.gpus[5].uuid]
        client = await nats.connect(nats_server.url)
        js = client.jetstream()
        subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
        show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
        await js.publish(subject, start_command("two/1/0", chosen, [sys.executable, "-c", show]))
        await js.publish(subject, b"not a protobuf command at all \xff\xff")
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        await js.publish(subject, start_command("long/1/0", [fake.gpus[0].uuid], sleeper))
        exited = agent_pb2.TASK_STATE_EXITED
        await poll(lambda: exited in stream.states("two/1/0"), 20, "the first task to exit")
        final = [e for e in stream.task_events if e.task_id == "two/1/0"][-1]
        assert final.output_tail.strip() == ",".join(chosen)
        assert final.exit_code == 0
        assert process.counters.commands_rejected == 1

        started = agent_pb2.TASK_STATE_STARTED
        await poll(lambda: started in stream.states("long/1/0"), 20, "the long task to start")
        kv = await js.key_value(subjects.HEARTBEAT_BUCKET)
        # The agent sends a heartbeat every 0.3 s, but a busy machine can delay the first one
        # after the start by more than that.
        heartbeat = agent_pb2.Heartbeat()
        deadline = time.monotonic() + 20
        while "long/1/0" not in heartbeat.running_task_ids:
            assert time.monotonic() < deadline, "no heartbeat listed the long task"
            await asyncio.sleep(0.1)
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await kv.get(NODE.key)
                heartbeat = agent_pb2.Heartbeat.FromString(entry.value or b"")
        assert list(heartbeat.running_task_ids) == ["long/1/0"]
        assert heartbeat.state == agent_pb2.AGENT_NODE_STATE_READY
        assert len(heartbeat.accelerator_health) == 8

        stop_command = agent_pb2.AgentCommand(
            command_id="stop-long",
            kind=agent_pb2.COMMAND_KIND_STOP_TASK,
            node=NODE.message(),
            task_id="long/1/0",
            reason="cancelled",
        )
        await js.publish(subject, stop_command.SerializeToString())
        stopped = agent_pb2.TASK_STATE_STOPPED
        await poll(lambda: stopped in stream.states("long/1/0"), 20, "the long task to stop")
        await client.close()
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert not (tmp_path / "agent" / "agent.pid").exists()
