"""A fatal fault on one accelerator of a running job, end to end: real grant, metering,
NATS, scheduler and simulated agents whose backend replays the fault."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from acsp import subjects
from acsp.v1 import agent_pb2, events_pb2, scheduler_pb2
from agents.backends.fleet import load_fault_trace
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(300)

FAULT_AT_S = 30.0
"""Seconds after the first agent process starts at which its accelerator fails. The job must
be running by then: placing and starting it takes a few seconds."""


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


def fault_trace(path: Path) -> Path:
    """Write a trace with one uncorrected-ECC fault (the GPU is marked unusable for good).

    The fault hits the node's first accelerator, which a one-accelerator task takes first on
    an idle node, so a restarted scheduler that forgot the failure would place a task on it.
    """
    for server in (f"server-{i}" for i in range(1000)):
        event = {
            "node_id": server,
            "event_type": "fault_start",
            "event_time": FAULT_AT_S / 86_400,
            "fault_type": {"Class": "GPU", "Desc": "GPU DBE(Double Bit ECC) > Threshold"},
        }
        path.write_text(json.dumps([event]))
        (interval,) = load_fault_trace(path)
        assert interval.accelerator_slot is not None
        if interval.accelerator_slot % 8 == 0:
            return path
    raise AssertionError("no server id puts the fault on accelerator 0")


class AgentMessages:
    """Health and task events from the agent stream, read as they arrive."""

    def __init__(self) -> None:
        self.health: list[agent_pb2.HealthEvent] = []
        self.tasks: list[agent_pb2.TaskEvent] = []

    async def collect(self, url: str) -> None:
        client = await nats.connect(url)
        try:
            subscription = await client.jetstream().pull_subscribe(
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
                    if message.subject.startswith("acsp.health."):
                        self.health.append(agent_pb2.HealthEvent.FromString(message.data))
                    elif message.subject.startswith("acsp.task."):
                        self.tasks.append(agent_pb2.TaskEvent.FromString(message.data))
        finally:
            await client.close()


async def job_events(url: str, job_id: str) -> list[events_pb2.JobEvent]:
    client = await nats.connect(url)
    try:
        subscription = await client.jetstream().pull_subscribe(
            "acsp.events.job.>",
            stream=subjects.EVENT_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),
        )
        events: list[events_pb2.JobEvent] = []
        with contextlib.suppress(TimeoutError):
            while True:
                for message in await subscription.fetch(256, timeout=1.0):
                    event = events_pb2.JobEvent.FromString(message.data)
                    if event.job_id == job_id:
                        events.append(event)
        return events
    finally:
        await client.close()


def accelerators(job: scheduler_pb2.Job) -> set[tuple[str, str]]:
    return {(p.node_id, a.accelerator_id) for p in job.placements for a in p.accelerators}


class Client:
    """The calls this test makes to one scheduler replica, as the project's PI."""

    def __init__(self, address: str, md: tuple[tuple[str, str], ...], project: str, grant: str):
        self.channel, self.stub = scheduler_stub(address)
        self.md = md
        self.project = project
        self.grant = grant

    async def get(self, job_id: str) -> scheduler_pb2.Job | None:
        request = scheduler_pb2.GetJobRequest(job_id=job_id)
        try:
            return await self.stub.GetJob(request, metadata=self.md, timeout=10)
        except grpc.aio.AioRpcError as error:
            # A restarted replica returns UNAVAILABLE until it leads.
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            raise

    async def submit(self, name: str, tasks: int) -> str:
        spec = scheduler_pb2.JobSpec(
            name=name,
            project_id=self.project,
            grant_id=self.grant,
            task_count=tasks,
            accelerator_millis_per_task=1000,
            gang=True,
            wall_time_seconds=600,
            command=["sleep", "300"],
        )
        request = scheduler_pb2.SubmitJobRequest(request_id=f"hw-{name}", spec=spec)
        reply = await self.stub.SubmitJob(request, metadata=self.md, timeout=10)
        return str(reply.job.job_id)

    async def cancel(self, job_id: str) -> None:
        request = scheduler_pb2.CancelJobRequest(job_id=job_id, reason="make room")
        await self.stub.CancelJob(request, metadata=self.md, timeout=10)

    async def running(self, job_id: str, attempt: int = 1) -> scheduler_pb2.Job | None:
        job = await self.get(job_id)
        if job is None or job.state != scheduler_pb2.JOB_STATE_RUNNING or job.attempt < attempt:
            return None
        return job


async def test_fatal_fault_requeues_job_elsewhere(stack: Stack, tmp_path: Path) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    messages = AgentMessages()
    collector = asyncio.create_task(messages.collect(stack.nats_url))
    stack.start_agents(1, name="agents-a", provider="pa", faults=fault_trace(tmp_path / "f.json"))
    client = Client(address, md, project, grant)
    try:
        gang = await client.submit("gang", 8)
        first = await wait_for(lambda: client.running(gang), 25, "the gang to run", 0.2)
        assert {p.node_id for p in first.placements} == {"n0"}
        stack.start_agents(1, name="agents-b", provider="pb", first=1)

        second = await wait_for(
            lambda: client.running(gang, first.attempt + 1), 90, "the gang to run again", 0.2
        )
        (failure,) = [h for h in messages.health if not h.cleared]
        failed = ("n0", failure.accelerator_id)
        assert failure.health == scheduler_pb2.HEALTH_STATE_FAILED
        assert failed in accelerators(first)
        assert {p.node_id for p in second.placements} == {"n1"}

        # The task on the failed accelerator ended as a hardware failure, naming the event.
        (old_task,) = failure.task_ids

        def hardware_end() -> agent_pb2.TaskEvent | None:
            ends = [
                e
                for e in messages.tasks
                if e.task_id == old_task and e.state == agent_pb2.TASK_STATE_FAILED_HARDWARE
            ]
            return ends[0] if ends else None

        ended = await wait_for(hardware_end, 20, "a FAILED_HARDWARE task event", 0.2)
        assert ended.health_event_id == failure.event_id
        events = await job_events(stack.nats_url, gang)
        (requeued,) = [e for e in events if e.kind == events_pb2.JOB_EVENT_KIND_REQUEUED]
        assert requeued.attempt == first.attempt
        assert requeued.cause.trigger == f"health:{failure.event_id}"
        states = [p.state for p in requeued.placements]
        assert states.count("failed_hardware") == 1

        # The failed accelerator gets no new task: seven fit on n0 beside it, and one more waits.
        seven = await client.submit("seven", 7)
        placed = await wait_for(lambda: client.running(seven), 30, "seven to run", 0.2)
        assert {node for node, _ in accelerators(placed)} == {"n0"}
        assert failed not in accelerators(placed)
        one = await client.submit("one", 1)

        # A new leader keeps it out too: once seven is cancelled, one runs on n0 but not on it.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        pending = await wait_for(lambda: client.get(one), 60, "the new leader to serve", 0.2)
        assert pending.state == scheduler_pb2.JOB_STATE_PENDING
        await client.cancel(seven)
        alone = await wait_for(lambda: client.running(one), 60, "one to run", 0.2)
        assert {node for node, _ in accelerators(alone)} == {"n0"}
        assert failed not in accelerators(alone)
        await client.channel.close()

        # Metering refunds the attempt that the hardware ended.
        conn = await asyncpg.connect(stack.dsn, timeout=10)
        try:

            async def refund() -> asyncpg.Record | None:
                return await conn.fetchrow(
                    "SELECT amount, reason FROM metering.refunds WHERE job_id = $1"
                    " AND attempt = $2",
                    gang,
                    first.attempt,
                )

            row = await wait_for(refund, 60, "metering to refund the attempt", 0.5)
        finally:
            await conn.close()
        assert row["amount"] > 0
        assert failure.accelerator_id in row["reason"]
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
