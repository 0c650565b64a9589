"""A node agent's hosts files and rendezvous variables, for tasks it runs as processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.helpers import NODE, ManualClock, make_node

pytestmark = pytest.mark.timeout(60)

TASK = "job-1/1/2"

# Copies its ACSP_ variables and its hosts file to argv[1], then exits.
SCRIPT = """
import os, pathlib, sys
hosts = pathlib.Path(os.environ["ACSP_TASK_HOSTS_FILE"]).read_text()
names = sorted(k for k in os.environ if k.startswith("ACSP_"))
lines = [f"{k}={os.environ[k]}" for k in names]
pathlib.Path(sys.argv[1]).write_text("\\n".join(lines) + "\\n--\\n" + hosts)
"""


def start_command(uuid: str, out: Path) -> wire.Command:
    message = agent_pb2.AgentCommand(
        command_id="c1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=TASK,
        job_id="job-1",
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)],
        command=[sys.executable, "-c", SCRIPT, str(out)],
        node_hosts=["h-a", "h-b"],
        task_node_indexes=[1, 0, 0],
        rendezvous_port=29555,
    )
    return wire.parse_command(message.SerializeToString())


def ended(outbox: Outbox, spool: Spool) -> bool:
    outbox.flush_to_spool()
    return any(
        agent_pb2.TaskEvent.FromString(record.payload).state == agent_pb2.TASK_STATE_EXITED
        for record in spool.peek(10_000)
        if record.subject.startswith("acsp.task.")
    )


async def poll(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def file_exists(path: str) -> bool:
    return os.path.exists(path)


def make(tmp_path: Path) -> tuple[NodeAgent, Outbox, Spool]:
    clock = ManualClock()
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    return make_node(SimulatedBackend(spec, clock), tmp_path, clock, backend_name="simulated")


async def test_task_gets_env_and_hosts(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    out = tmp_path / "task-env.txt"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, out))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        assert node.runner is not None
        await node.runner.launches_settled()

    variables, hosts = out.read_text().split("--\n")
    env = dict(line.split("=", 1) for line in variables.splitlines())
    assert env["ACSP_TASK_INDEX"] == "2"
    assert env["ACSP_TASK_COUNT"] == "3"
    assert env["ACSP_LOCAL_TASK_INDEX"] == "1"
    assert env["ACSP_LOCAL_TASK_COUNT"] == "2"
    assert env["ACSP_RENDEZVOUS_HOST"] == "h-b"
    assert env["ACSP_RENDEZVOUS_PORT"] == "29555"
    assert hosts == "h-b\nh-a\nh-a\n"
    assert not file_exists(env["ACSP_TASK_HOSTS_FILE"])


async def test_redelivered_start_leaves_no_file(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    out = tmp_path / "task-env.txt"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, out))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        out.unlink()
        await node.handle(start_command(uuid, out))
        assert node.runner is not None
        await node.runner.launches_settled()

    assert not out.exists()
    assert list((tmp_path / "hosts").iterdir()) == []
