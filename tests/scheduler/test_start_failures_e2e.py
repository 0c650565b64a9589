"""A job that its node rejects at every start, end to end, across a scheduler restart.

A task that no scheduler placed takes the node's only accelerator, so the agent rejects each
start of the job there as START_FAILED, and the scheduler requeues the job until it fails.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import nats.aio.client
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from scheduler.service.jobbook import MAX_START_FAILURES
from services.runtime.auth import Role

from .harness import Process, Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client

pytestmark = pytest.mark.timeout(300)

FOREIGN_TASK = "jforeign/1/0"

_ENDED = {
    scheduler_pb2.JOB_STATE_COMPLETED,
    scheduler_pb2.JOB_STATE_FAILED,
    scheduler_pb2.JOB_STATE_CANCELLED,
    scheduler_pb2.JOB_STATE_TIMED_OUT,
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        await stack.start_metering()
        yield stack
    finally:
        await stack.close()


async def occupy(stack: Stack, accelerator_id: str) -> None:
    """Start a played task of no known job on ``accelerator_id`` of node prov/reg/n0."""
    command = agent_pb2.AgentCommand(
        command_id=f"{FOREIGN_TASK}/start",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="n0"),
        task_id=FOREIGN_TASK,
        job_id=FOREIGN_TASK.split("/", 1)[0],
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=accelerator_id, millis=1000)],
        command=["sleep", "600"],
        wall_time_seconds=3600,
        simulated_run_seconds=600,
    )
    command.time.FromNanoseconds(time.time_ns())
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        await client.jetstream().publish(
            subjects.command_subject("prov", "reg", "n0"),
            command.SerializeToString(),
            headers={"Nats-Msg-Id": command.command_id},
            timeout=10,
        )
    finally:
        await client.close()


async def heartbeat_lists(stack: Stack, task_id: str) -> bool:
    """Return whether node prov/reg/n0's latest heartbeat lists ``task_id`` as running."""
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        bucket = await client.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
        try:
            entry = await bucket.get("prov.reg.n0")
        except nats.js.errors.KeyNotFoundError:
            return False
    finally:
        await client.close()
    beat = agent_pb2.Heartbeat.FromString(entry.value or b"")
    return task_id in beat.running_task_ids


async def stored_job(stack: Stack, job_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT state, attempt, start_failures FROM scheduler.jobs WHERE job_id = $1", job_id
        )
    finally:
        await conn.close()
    assert row is not None
    return row


class Watch:
    """Commands and task events of node prov/reg/n0, received on core NATS subscriptions."""

    def __init__(self, client: nats.aio.client.Client) -> None:
        self.client = client
        self.commands: list[agent_pb2.AgentCommand] = []
        self.events: list[agent_pb2.TaskEvent] = []

    async def start(self) -> None:
        async def command(message: Msg) -> None:
            self.commands.append(agent_pb2.AgentCommand.FromString(message.data))

        async def event(message: Msg) -> None:
            self.events.append(agent_pb2.TaskEvent.FromString(message.data))

        await self.client.subscribe(subjects.command_subject("prov", "reg", "n0"), cb=command)
        await self.client.subscribe(subjects.task_subject("prov", "reg", "n0"), cb=event)
        await self.client.flush(timeout=10)

    def started(self, job_id: str) -> bool:
        return any(
            command.job_id == job_id and command.kind == agent_pb2.COMMAND_KIND_START_TASK
            for command in self.commands
        )

    def rejected(self, job_id: str) -> bool:
        return any(
            event.job_id == job_id and event.state == agent_pb2.TASK_STATE_START_FAILED
            for event in self.events
        )


def pause(process: Process) -> None:
    """Stop ``process`` and its children with SIGSTOP until :func:`resume`."""
    os.killpg(process.popen.pid, signal.SIGSTOP)


def resume(process: Process) -> None:
    if process.alive():
        os.killpg(process.popen.pid, signal.SIGCONT)


async def test_start_failures_count_across_restart(stack: Stack) -> None:
    # The agent is paused for seconds below, which must not mark node n0 down.
    heartbeat_timeout_s = "120"
    scheduler_process, address = await stack.start_scheduler(
        ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S=heartbeat_timeout_s
    )
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    agents = stack.start_agents(1, gpus=1)
    client = Client(address, md, project, grant)
    watcher = await nats.connect(stack.nats_url, connect_timeout=2)
    try:

        async def n0() -> scheduler_pb2.Node | None:
            reply = await client.stub.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return next(iter(reply.nodes), None)

        node = await wait_for(n0, 30, "n0 to report its inventory", 0.2)
        await occupy(stack, node.accelerators[0].accelerator_id)
        await wait_for(lambda: heartbeat_lists(stack, FOREIGN_TASK), 30, "the foreign task", 0.2)
        watch = Watch(watcher)
        await watch.start()

        # The scheduler retries a rejected start at once, so the restart must come after the
        # first stored failure and before the last. Pausing the agent and the scheduler in
        # turn lets exactly one start be rejected before the kill, however slow the machine.
        pause(agents)
        job_id = await client.submit("rejected", 1)
        await wait_for(lambda: watch.started(job_id), 60, "the first start command", 0.05)
        pause(scheduler_process)
        resume(agents)
        await wait_for(lambda: watch.rejected(job_id), 60, "the first rejected start", 0.05)
        pause(agents)
        resume(scheduler_process)

        async def counted() -> bool:
            return (await stored_job(stack, job_id))["start_failures"] >= 1

        await wait_for(counted, 60, "a failed start to be stored", 0.05)
        scheduler_process.kill()
        resume(agents)
        before = await stored_job(stack, job_id)
        assert before["state"] != "failed"
        assert 1 <= before["start_failures"] < MAX_START_FAILURES

        # A new leader continues counting from the stored failures.
        await client.channel.close()
        _, address = await stack.start_scheduler(
            "scheduler-restarted", ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S=heartbeat_timeout_s
        )
        client = Client(address, md, project, grant)

        async def ended() -> scheduler_pb2.Job | None:
            job = await client.get(job_id)
            return job if job is not None and job.state in _ENDED else None

        job = await wait_for(ended, 120, "the job to end", 0.2)
        assert job.state == scheduler_pb2.JOB_STATE_FAILED
        assert job.attempt == MAX_START_FAILURES
        assert job.attempt_reason.startswith("task 0 start failed: ")
        assert f"{MAX_START_FAILURES} attempts in a row failed to start" in job.state_message
        assert "in use by another task" in job.state_message
        assert (await stored_job(stack, job_id))["start_failures"] == MAX_START_FAILURES
    finally:
        resume(scheduler_process)
        resume(agents)
        await watcher.close()
        await client.channel.close()
