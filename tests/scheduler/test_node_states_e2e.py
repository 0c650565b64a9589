"""Node states across lost heartbeats, down marks and new leaders, end to end, with real
grant, metering, NATS, scheduler and one simulated agent process per node."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Process, Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client
from .test_task_replacement_e2e import stored_heartbeat

pytestmark = pytest.mark.timeout(300)

UP = scheduler_pb2.NODE_STATE_UP
DRAINING = scheduler_pb2.NODE_STATE_DRAINING
DRAINED = scheduler_pb2.NODE_STATE_DRAINED
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
    """The calls of the provider's operator about one node, by default ``n0`` of region
    ``r1``."""

    def __init__(self, stack: Stack, client: Client, region: str = "r1", node: str = "n0"):
        self.stub = client.stub
        self.md = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
        self.region = region
        self.node = node

    async def get(self) -> scheduler_pb2.Node | None:
        request = scheduler_pb2.GetNodeRequest(
            provider_id="prov", region_id=self.region, node_id=self.node
        )
        try:
            return await self.stub.GetNode(request, metadata=self.md, timeout=10)
        except grpc.aio.AioRpcError as error:
            # Before the agent's first inventory there is no node, and a restarted replica
            # returns UNAVAILABLE until it leads.
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return None
            raise

    async def state(self) -> int:
        node = await self.get()
        return -1 if node is None else int(node.state)

    async def wait_state(self, state: int, what: str) -> None:
        async def reached() -> bool:
            return await self.state() == state

        await wait_for(reached, 60, what, 0.2)

    async def capacity(self) -> dict[str, int]:
        """Return the region's split of accelerators from GetQueueSummary, in millis."""
        summary = await self.stub.GetQueueSummary(
            scheduler_pb2.GetQueueSummaryRequest(), metadata=self.md, timeout=10
        )
        region = f"prov/{self.region}"
        return {
            "total": summary.total_millis_by_region[region],
            "usable": summary.usable_millis_by_region[region],
            "unknown": summary.unknown_millis_by_region[region],
            "out_of_service": summary.out_of_service_millis_by_region[region],
        }

    async def drain(self, undrain: bool = False) -> scheduler_pb2.Node:
        request = scheduler_pb2.DrainNodeRequest(
            provider_id="prov", region_id=self.region, node_id=self.node, undrain=undrain
        )
        return await self.stub.DrainNode(request, metadata=self.md, timeout=10)

    async def mark_down(self) -> scheduler_pb2.Node:
        request = scheduler_pb2.MarkNodeDownRequest(
            provider_id="prov", region_id=self.region, node_id=self.node, reason="powered off"
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
        up = {"total": 1000, "usable": 1000, "unknown": 0, "out_of_service": 0}
        assert await operator.capacity() == up
        # Nothing runs on n0, so it is drained at once.
        assert (await operator.drain()).state == DRAINED
        draining = {"total": 1000, "usable": 0, "unknown": 0, "out_of_service": 1000}
        assert await operator.capacity() == draining
        # A draining node still runs its agent, so it cannot be marked down yet.
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await operator.mark_down()
        assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is draining" in (rejected.value.details() or "")
        assert "Drain it" not in (rejected.value.details() or "")
        assert "stop its agent" in (rejected.value.details() or "").lower()

        # A paused agent misses its heartbeats and later sends them again, with no new
        # inventory in between.
        os.killpg(agent.popen.pid, signal.SIGSTOP)
        await operator.wait_state(UNKNOWN, "n0 unknown")
        unknown = {"total": 1000, "usable": 0, "unknown": 1000, "out_of_service": 0}
        assert await operator.capacity() == unknown
        os.killpg(agent.popen.pid, signal.SIGCONT)
        await operator.wait_state(DRAINED, "n0 drained after its heartbeats resumed")
        first = await assert_not_placed(client, "after-unknown")

        # A node marked down comes back with a new agent, which sends an inventory first.
        agent.kill()
        await operator.wait_state(UNKNOWN, "n0 unknown again")
        assert (await operator.mark_down()).state == DOWN
        agent = start_n0(stack)
        await operator.wait_state(DRAINED, "n0 drained after it was down")
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
        assert (await operator.drain()).state == DRAINED
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
        await operator.wait_state(DRAINED, "n0 drained after it was down")
        waiting = await assert_not_placed(client, "after-down")

        assert (await operator.drain(undrain=True)).state == UP
        await wait_for(lambda: client.running(waiting), 60, "the waiting job to run on n0", 0.2)
    finally:
        await client.channel.close()


async def heartbeat_age(stack: Stack, key: str) -> float:
    """Return the seconds since the agent sent the heartbeat stored for node ``key``."""
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        bucket = await client.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
        entry = await bucket.get(key)
    finally:
        await client.close()
    beat = agent_pb2.Heartbeat.FromString(entry.value or b"")
    # The agents run on this machine, so their clock is the test's.
    return time.time() - beat.time.ToNanoseconds() / 1e9


async def test_new_leader_keeps_silent_node_unknown(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    try:
        # n0 has two accelerators, so one stays free beside the copy its agent may still run.
        n0_agent = stack.start_agents(1, gpus=2, name="agents-r1", region="r1")
        first = await client.submit("first", 1)
        running = await wait_for(lambda: client.running(first), 30, "first to run on n0", 0.2)
        assert [p.node_id for p in running.placements] == ["n0"]
        # So that the bucket contains a heartbeat of n0 for the new leader's watch to replay.
        await wait_for(lambda: stored_heartbeat(stack, "prov.r1.n0"), 30, "a heartbeat of n0")
        stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
        n0_agent.kill()
        await Operator(stack, client).wait_state(UNKNOWN, "n0 unknown")

        async def moved() -> scheduler_pb2.Job | None:
            job = await client.running(first)
            return job if job is not None and job.placements[0].node_id == "n1" else None

        on_n1 = await wait_for(moved, 60, "first to run on n1", 0.2)
        second = await assert_not_placed(client, "second")

        # The new leader's timeout is shorter than the time n0 has been silent, but long
        # enough that n0 would look up for a while if the replayed heartbeat counted as new.
        await client.channel.close()
        scheduler_process.kill()
        timeout_s = 15.0

        async def silent_long_enough() -> bool:
            return await heartbeat_age(stack, "prov.r1.n0") > timeout_s + 1

        await wait_for(silent_long_enough, 60, "n0's heartbeat to age", 0.5)
        _, address = await stack.start_scheduler(
            "scheduler-restarted", ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S=str(timeout_s)
        )
        leading_since = time.time()
        client = Client(address, md, project, grant)
        n0 = Operator(stack, client)
        n1 = Operator(stack, client, "r2", "n1")

        await wait_for(lambda: _is_state(n0, UNKNOWN), timeout_s / 2, "n0 unknown", 0.2)
        waiting = await client.get(second)
        assert waiting is not None
        assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
        assert waiting.attempt == 1

        # n1 heartbeats: the new leader keeps it up and its task running.
        async def n1_heard() -> bool:
            node = await n1.get()
            heard = 0.0 if node is None else node.last_heartbeat_time.ToNanoseconds() / 1e9
            return heard > leading_since

        await wait_for(n1_heard, 30, "a heartbeat of n1 on the new leader", 0.2)
        assert await n1.state() == UP
        assert await n0.state() == UNKNOWN
        still = await client.running(first)
        assert still is not None
        assert still.attempt == on_n1.attempt
        assert [p.node_id for p in still.placements] == ["n1"]
    finally:
        await client.channel.close()


async def _is_state(operator: Operator, state: int) -> bool:
    return await operator.state() == state
