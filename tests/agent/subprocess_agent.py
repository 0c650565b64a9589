"""A one-node simulated agent that tests run as a process of its own, to signal or kill it.

``python -m tests.agent.subprocess_agent NATS_URL STATE_DIR [--crash-before-save]
[--stop-tasks-on-exit]`` serves the node ``acme.eu-1.node-1`` with eight simulated A100s
until SIGTERM. With ``--crash-before-save`` the agent kills itself with SIGKILL once the task
launcher has started the processes of its first command batch and before the agent reads the
launcher's replies and saves its state, as a crash there would. ``--stop-tasks-on-exit``
makes SIGTERM stop the tasks too.
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

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.main import run
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore, TaskRecord
from agents.task_process import TaskLauncher
from tests.agent.helpers import NODE

SPEC = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 8)
COMMAND_ACK_WAIT_S = 2.0
"""Short, so that a test receives the unacknowledged commands again within seconds."""


STOP_GRACE_S = 5.0


def build(
    nats_url: str, state_dir: Path, stop_tasks_on_exit: bool, crash_before_save: bool = False
) -> AgentProcess:
    state = StateStore(state_dir / "state.json")
    outbox = Outbox(Spool(state_dir / "spool"), retry_s=0.2, before_append=state.save_before_spool)
    launcher = TaskLauncher()
    if crash_before_save:
        # The launcher replies once it has started every process of the batch it was sent.
        launcher._on_readable = lambda: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
    node = NodeAgent(
        NODE,
        SimulatedBackend(SPEC),
        "simulated",
        state,
        state_dir,
        outbox,
        uuid.uuid4().hex[:12],
        time.time,
        launcher=launcher,
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
        stop_tasks_on_exit=stop_tasks_on_exit,
        stop_grace_s=STOP_GRACE_S,
        launcher=launcher,
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


async def poll(condition: Callable[[], bool], timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {description}")
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


TASK_ID = "stop/1/0"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
RUN_BEFORE_STOP_S = 2.0
"""Seconds the task runs before the agent is stopped, more than one usage interval."""


def recorded_task(state_dir: Path) -> TaskRecord | None:
    return StateStore(state_dir / "state.json").node(NODE.key).tasks.get(TASK_ID)


async def usage_of_task(url: str) -> list[agent_pb2.UsageSample]:
    samples: list[agent_pb2.UsageSample] = []
    for _subject, data in await stream_messages(url, subjects.USAGE_STREAM):
        report = agent_pb2.UsageReport()
        report.ParseFromString(data)
        samples.extend(s for s in report.samples if s.task_id == TASK_ID)
    return sorted(samples, key=lambda s: s.start_time.ToMicroseconds())


async def run_task_then_stop(
    url: str, state_dir: Path, *flags: str
) -> tuple[TaskRecord, float, float]:
    """Start an agent and a task, SIGTERM the agent; return the task, stop and exit times."""
    agent = await start_agent(url, state_dir, *flags)
    try:
        accelerator = SimulatedBackend(SPEC).discover().accelerators[0].uuid
        client = await nats.connect(url)
        try:
            subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
            await client.jetstream().publish(subject, start_command(TASK_ID, accelerator, SLEEPER))
        finally:
            await client.close()
        await poll(lambda: recorded_task(state_dir) is not None, 30, "the task to start")
        record = recorded_task(state_dir)
        assert record is not None
        await asyncio.sleep(RUN_BEFORE_STOP_S)
        stopped_at = time.time()
        agent.send_signal(signal.SIGTERM)
        # The agent's stop budget, plus a second for the interpreter to exit.
        assert await asyncio.wait_for(agent.wait(), STOP_GRACE_S + 1.0) == 0
        return record, stopped_at, time.time()
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nats_url")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--crash-before-save", action="store_true")
    parser.add_argument("--stop-tasks-on-exit", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    process = build(args.nats_url, args.state_dir, args.stop_tasks_on_exit, args.crash_before_save)
    asyncio.run(run(process))


if __name__ == "__main__":
    main()
