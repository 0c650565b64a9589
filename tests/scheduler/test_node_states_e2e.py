"""Node states across lost heartbeats, down marks and new leaders, end to end, with real
grant, metering, NATS, scheduler and one simulated agent process per node."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role

from .harness import Process, Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client

pytestmark = pytest.mark.timeout(300)

UP = scheduler_pb2.NODE_STATE_UP
DRAINING = scheduler_pb2.NODE_STATE_DRAINING
UNKNOWN = scheduler_pb2.NODE_STATE_UNKNOWN
DOWN = scheduler_pb2.NODE_STATE_DOWN


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


class Operator:
    """The calls of the provider's operator about node ``n0`` of region ``r1``."""

    def __init__(self, stack: Stack, client: Client) -> None:
        self.stub = client.stub
        self.md = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))

    async def state(self) -> int:
        request = scheduler_pb2.GetNodeRequest(provider_id="prov", region_id="r1", node_id="n0")
        try:
            node = await self.stub.GetNode(request, metadata=self.md, timeout=10)
        except grpc.aio.AioRpcError as error:
            # Before the agent's first inventory there is no node, and a restarted replica
            # returns UNAVAILABLE until it leads.
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return -1
            raise
        return int(node.state)

    async def wait_state(self, state: int, what: str) -> None:
        async def reached() -> bool:
            return await self.state() == state

        await wait_for(reached, 60, what, 0.2)

    async def drain(self, undrain: bool = False) -> scheduler_pb2.Node:
        request = scheduler_pb2.DrainNodeRequest(
            provider_id="prov", region_id="r1", node_id="n0", undrain=undrain
        )
        return await self.stub.DrainNode(request, metadata=self.md, timeout=10)

    async def mark_down(self) -> scheduler_pb2.Node:
        request = scheduler_pb2.MarkNodeDownRequest(
            provider_id="prov", region_id="r1", node_id="n0", reason="powered off"
        )
        return await self.stub.MarkNodeDown(request, metadata=self.md, timeout=10)


async def placement_decided(client: Client, job_id: str) -> scheduler_pb2.Job:
    """Wait until a pass has either placed the job or given the reason it waits."""

    async def decided() -> scheduler_pb2.Job | None:
        job = await client.get(job_id)
        if job is None:
            return None
        waiting = job.state == scheduler_pb2.JOB_STATE_PENDING
        if waiting and job.pending_reason == scheduler_pb2.PENDING_REASON_UNSPECIFIED:
            return None
        return job

    return await wait_for(decided, 30, f"a placement decision for {job_id}", 0.2)


async def assert_not_placed(client: Client, name: str) -> str:
    """Submit a one-accelerator job, check that no pass places it and return its id."""
    job_id = await client.submit(name, 1)
    job = await placement_decided(client, job_id)
    assert job.state == scheduler_pb2.JOB_STATE_PENDING
    assert job.attempt == 1
    assert job.pending_reason == scheduler_pb2.PENDING_REASON_NO_CAPACITY
    return job_id


def start_n0(stack: Stack) -> Process:
    return stack.start_agents(1, gpus=1, name="agents-r1", region="r1")


async def test_drain_survives_missed_heartbeats_and_down(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    client = Client(address, metadata(stack.token(pi, Role.PI)), project, grant)
    operator = Operator(stack, client)
    agent = start_n0(stack)
    try:
        await operator.wait_state(UP, "n0 up")
        assert (await operator.drain()).state == DRAINING

        # A paused agent misses its heartbeats and later sends them again, with no new
        # inventory in between.
        os.killpg(agent.popen.pid, signal.SIGSTOP)
        await operator.wait_state(UNKNOWN, "n0 unknown")
        os.killpg(agent.popen.pid, signal.SIGCONT)
        await operator.wait_state(DRAINING, "n0 draining after its heartbeats resumed")
        first = await assert_not_placed(client, "after-unknown")

        # A node marked down comes back with a new agent, which sends an inventory first.
        agent.kill()
        await operator.wait_state(UNKNOWN, "n0 unknown again")
        assert (await operator.mark_down()).state == DOWN
        agent = start_n0(stack)
        await operator.wait_state(DRAINING, "n0 draining after it was down")
        second = await assert_not_placed(client, "after-down")
        still = await client.get(first)
        assert still is not None
        assert still.state == scheduler_pb2.JOB_STATE_PENDING

        # Only the operator ends the drain.
        assert (await operator.drain(undrain=True)).state == UP

        async def one_running() -> bool:
            return any([await client.running(first), await client.running(second)])

        await wait_for(one_running, 60, "a waiting job to run on n0", 0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.popen.pid, signal.SIGCONT)
        await client.channel.close()


async def test_drain_survives_down_across_leaders(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    operator = Operator(stack, client)
    try:
        agent = start_n0(stack)
        await operator.wait_state(UP, "n0 up")
        assert (await operator.drain()).state == DRAINING
        agent.kill()
        await operator.wait_state(UNKNOWN, "n0 unknown")
        assert (await operator.mark_down()).state == DOWN

        # A new leader loads n0 down and draining from the database.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        operator = Operator(stack, client)
        assert await operator.state() == DOWN

        start_n0(stack)
        await operator.wait_state(DRAINING, "n0 draining after it was down")
        waiting = await assert_not_placed(client, "after-down")

        assert (await operator.drain(undrain=True)).state == UP
        await wait_for(lambda: client.running(waiting), 60, "the waiting job to run on n0", 0.2)
    finally:
        await client.channel.close()
