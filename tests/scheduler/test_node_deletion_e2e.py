"""DeleteNode end to end: who may delete a node and when, retries, and the node's agent after
the deletion, with real grant, metering, NATS, scheduler and simulated agent processes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client
from .test_node_states_e2e import DOWN, DRAINED, DRAINING, UNKNOWN, UP, Operator, start_n0

pytestmark = pytest.mark.timeout(300)


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


async def delete(
    operator: Operator, request_id: str, reason: str = "retired", md: object = None
) -> scheduler_pb2.Node:
    request = scheduler_pb2.DeleteNodeRequest(
        request_id=request_id,
        provider_id="prov",
        region_id=operator.region,
        node_id=operator.node,
        reason=reason,
    )
    return await operator.stub.DeleteNode(request, metadata=md or operator.md, timeout=10)


async def rejected(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def listed_nodes(operator: Operator) -> list[str]:
    response = await operator.stub.ListNodes(
        scheduler_pb2.ListNodesRequest(provider_id="prov"), metadata=operator.md, timeout=10
    )
    return [node.node_id for node in response.nodes]


async def heartbeat_sent_after(stack: Stack, key: str, moment: float) -> bool:
    """Return whether the agent of node ``key`` stored a heartbeat sent after ``moment``."""
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        bucket = await client.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
        try:
            entry = await bucket.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
    finally:
        await client.close()
    beat = agent_pb2.Heartbeat.FromString(entry.value or b"")
    # The agents run on this machine, so their clock is the test's.
    return beat.time.ToNanoseconds() / 1e9 > moment


async def test_delete_waits_for_jobs_to_stop(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    client = Client(address, metadata(stack.token(pi, Role.PI)), project, grant)
    operator = Operator(stack, client)
    missing = Operator(stack, client, node="n9")
    start_n0(stack)
    try:
        await operator.wait_state(UP, "n0 up")
        job_id = await client.submit("busy", 1)
        await wait_for(lambda: client.running(job_id), 30, "the job to run on n0", 0.2)

        error = await rejected(delete(operator, "req-up"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert f"node prov/r1/n0 is up and jobs {job_id} may still run a task on it" in details
        assert "Drain it, wait until its jobs stop, then delete it" in details

        error = await rejected(delete(missing, "req-missing"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "node 'prov/r1/n9' not found" in (error.details() or "")

        stranger = metadata(stack.token("ops-b", Role.PROVIDER_OPERATOR, provider="other"))
        error = await rejected(delete(operator, "req-stranger", md=stranger))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        researcher = metadata(stack.token(pi, Role.PI))
        error = await rejected(delete(operator, "req-pi", md=researcher))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED

        assert (await operator.drain()).state == DRAINING
        error = await rejected(delete(operator, "req-draining"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert f"node prov/r1/n0 is draining and jobs {job_id} may still run" in details
        assert "Wait until they stop" in details
        assert await operator.state() == DRAINING
        assert await client.running(job_id) is not None

        await client.cancel(job_id)
        await operator.wait_state(DRAINED, "n0 drained once its job stopped")
        deleted = await delete(operator, "req-1")

        assert deleted.node_id == "n0"
        assert deleted.state == DRAINED
        assert len(deleted.accelerators) == 1
        assert list(deleted.job_ids) == []
        assert await operator.get() is None
        assert await listed_nodes(operator) == []

        # A retry returns what the first call returned.
        assert await delete(operator, "req-1") == deleted
        error = await rejected(delete(missing, "req-1"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "request_id 'req-1' was already used to delete node prov/r1/n0" in (
            error.details() or ""
        )
        error = await rejected(delete(operator, "req-2"))
        assert error.code() == grpc.StatusCode.NOT_FOUND

        conn = await asyncpg.connect(stack.dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT request_id, node, reason, deleted_by FROM scheduler.node_deletions"
            )
        finally:
            await conn.close()
        assert [tuple(row) for row in rows] == [("req-1", "n0", "retired", "ops")]
    finally:
        await client.channel.close()


async def test_deleted_node_returns_with_inventory(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    operator = Operator(stack, client)
    agent = start_n0(stack)
    try:
        await operator.wait_state(UP, "n0 up")
        assert (await operator.drain()).state == DRAINED
        deleted_at = time.time()
        assert (await delete(operator, "req-live")).state == DRAINED

        # The agent still runs, and its heartbeats change nothing.
        await wait_for(
            lambda: heartbeat_sent_after(stack, "prov.r1.n0", deleted_at + 2),
            30,
            "heartbeats of n0 after its deletion",
            0.2,
        )
        assert await operator.get() is None
        assert await listed_nodes(operator) == []

        # A new leader loads no row of n0, and the heartbeats it replays or receives change
        # nothing.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        leading_at = time.time()
        client = Client(address, md, project, grant)
        operator = Operator(stack, client)
        await wait_for(
            lambda: heartbeat_sent_after(stack, "prov.r1.n0", leading_at + 2),
            30,
            "heartbeats of n0 on the new leader",
            0.2,
        )
        assert await operator.get() is None

        # A restarted agent sends an inventory, which adds n0 as a new node: up, not drained.
        agent.kill()
        agent = start_n0(stack)
        await operator.wait_state(UP, "n0 back as a new node")
        node = await operator.get()
        assert node is not None
        assert node.state_cause.trigger == ""
        job_id = await client.submit("after-return", 1)
        running = await wait_for(lambda: client.running(job_id), 30, "a job to run on n0", 0.2)
        assert [p.node_id for p in running.placements] == ["n0"]
    finally:
        await client.channel.close()


async def test_lost_node_deleted_once_down(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    client = Client(address, metadata(stack.token(pi, Role.PI)), project, grant)
    n0 = Operator(stack, client)
    n1 = Operator(stack, client, "r2", "n1")
    agent = start_n0(stack)
    try:
        await n0.wait_state(UP, "n0 up")
        job_id = await client.submit("lost", 1)
        await wait_for(lambda: client.running(job_id), 30, "the job to run on n0", 0.2)

        agent.kill()
        await n0.wait_state(UNKNOWN, "n0 unknown")
        error = await rejected(delete(n0, "req-unknown"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.details() or ""
        assert f"node prov/r1/n0 is unknown and jobs {job_id} may still run a task on it" in (
            details
        )
        assert "mark it down, then delete it" in details

        assert (await n0.mark_down()).state == DOWN

        async def deleted_once_requeued() -> scheduler_pb2.Node | None:
            # The pass after the down mark requeues the job, which leaves n0.
            try:
                return await delete(n0, "req-down")
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return None
                raise

        deleted = await wait_for(deleted_once_requeued, 30, "n0 to be deleted", 0.2)
        assert deleted.state == DOWN
        assert await n0.get() is None

        # The requeued job runs on another node. A drained node whose agent stopped shows as
        # unknown, and is deleted without a down mark because nothing runs there.
        n1_agent = stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
        running = await wait_for(lambda: client.running(job_id, 2), 60, "the job on n1", 0.2)
        assert [p.node_id for p in running.placements] == ["n1"]
        await client.cancel(job_id)
        assert (await n1.drain()).state in (DRAINING, DRAINED)
        await n1.wait_state(DRAINED, "n1 drained once the job stopped")
        n1_agent.kill()
        await n1.wait_state(UNKNOWN, "n1 unknown")
        assert (await delete(n1, "req-drained")).state == UNKNOWN
        assert await listed_nodes(n1) == []
    finally:
        await client.channel.close()
