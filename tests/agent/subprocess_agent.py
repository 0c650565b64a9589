"""A one-node simulated agent that tests run as a process of its own, to signal or kill it.

``python -m tests.agent.subprocess_agent NATS_URL STATE_DIR [--crash-before-save]`` serves
the node ``acme.eu-1.node-1`` with eight simulated A100s until SIGTERM. With
``--crash-before-save`` the agent kills itself with SIGKILL after it has handled its first
command batch (and spawned the batch's processes) and before it saves its state, as a crash
there would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from acsp.v1 import agent_pb2, scheduler_pb2
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.main import run
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from tests.agent.helpers import NODE

SPEC = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 8)
COMMAND_ACK_WAIT_S = 2.0
"""Short, so that the test sees the unacknowledged commands redelivered within seconds."""


def build(nats_url: str, state_dir: Path) -> AgentProcess:
    state = StateStore(state_dir / "state.json")
    outbox = Outbox(Spool(state_dir / "spool"), retry_s=0.2, before_append=state.save_before_spool)
    node = NodeAgent(
        NODE,
        SimulatedBackend(SPEC),
        "simulated",
        state,
        state_dir,
        outbox,
        uuid.uuid4().hex[:12],
        time.time,
    )
    return AgentProcess(
        [node],
        outbox,
        state,
        ConnectionOptions(servers=[nats_url], reconnect_wait_s=0.2),
        Intervals(
            heartbeat_s=0.5,
            read_s=0.5,
            usage_s=0.5,
            state_flush_s=0.2,
            command_ack_wait_s=COMMAND_ACK_WAIT_S,
        ),
    )


REPOSITORY = Path(__file__).resolve().parents[2]


async def start_agent(url: str, state_dir: Path, *flags: str) -> asyncio.subprocess.Process:
    """Start this module as a process; its output goes to ``agent.log`` beside ``state_dir``."""
    # The child inherits the log's descriptor, so the file is closed here once it started.
    log = os.open(state_dir.parent / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.agent.subprocess_agent",
            url,
            str(state_dir),
            *flags,
            stdout=log,
            stderr=log,
            cwd=REPOSITORY,
        )
    finally:
        os.close(log)


def start_command(task_id: str, accelerator: str, argv: list[str]) -> bytes:
    return agent_pb2.AgentCommand(
        command_id=f"start-{task_id}",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=task_id,
        job_id=task_id.split("/")[0],
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=accelerator, millis=1000)],
        command=argv,
        wall_time_seconds=120,
        grace_seconds=30,
    ).SerializeToString()


async def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def stream_messages(url: str, stream: str) -> list[tuple[str, bytes]]:
    """Return the subject and data of every message in ``stream``, oldest first."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        total = (await js.stream_info(stream)).state.messages
        subscription = await js.pull_subscribe(
            ">", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        messages: list[tuple[str, bytes]] = []
        while len(messages) < total:
            batch = await subscription.fetch(min(256, total - len(messages)), timeout=5)
            messages.extend((message.subject, message.data) for message in batch)
        return messages
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nats_url")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--crash-before-save", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    process = build(args.nats_url, args.state_dir)
    if args.crash_before_save:
        process.before_batch_save = lambda: os.kill(os.getpid(), signal.SIGKILL)
    asyncio.run(run(process))


if __name__ == "__main__":
    main()
