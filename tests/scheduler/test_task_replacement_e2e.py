"""A lost node or a failed accelerator under a running gang, end to end, with real grant,
metering, NATS and scheduler.

Each node has its own simulated agent process, so killing one process takes one node away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import nats
import nats.js.errors
import pytest

from acsp import subjects
from acsp.v1 import agent_pb2, events_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Process, Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import AgentMessages, Client, fault_trace, job_events

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


def nodes(job: scheduler_pb2.Job) -> dict[int, str]:
    return {p.task_index: p.node_id for p in job.placements}


@dataclass(frozen=True)
class GangNode:
    """A node of the gang in ``move_lost_task`` and the agent process that serves it."""

    node_id: str
    region: str
    agent: str
    """Name of the agent process, under which ``Stack.start_agents`` starts it again."""
    first: int
    """Number of the node in its agent's fleet file (``n<first>``)."""

    def start(self, stack: Stack) -> Process:
        return stack.start_agents(
            1,
            gpus=1,
            name=self.agent,
            region=self.region,
            first=self.first,
            extra_env={"ACSP_AGENT_HOST": host_of(self.node_id)},
        )

    def request(self) -> scheduler_pb2.GetNodeRequest:
        return scheduler_pb2.GetNodeRequest(
            provider_id="prov", region_id=self.region, node_id=self.node_id
        )


def host_of(node_id: str) -> str:
    """Return the host that the agent of ``node_id`` reports in these tests."""
    return f"host-{node_id}"


GANG_NODES = (GangNode("n0", "r1", "agents-r1", 0), GangNode("n1", "r2", "agents-r2", 1))


@dataclass(frozen=True)
class MovedTask:
    """A gang whose task 1 moved to n2 after its node was lost."""

    gang: str
    running: scheduler_pb2.Job
    """The gang as it first ran."""
    lost: GangNode
    survivor: GangNode
    """The node of task 0, which the scheduler never replaces in place."""


async def move_lost_task(stack: Stack, client: Client) -> MovedTask:
    """Run a two-node gang on n0 and n1, kill the agent of task 1's node, and wait for task 1
    to start on n2."""
    # One accelerator per node, so the two tasks of the gang take two nodes.
    agents = {node.node_id: node.start(stack) for node in GANG_NODES}
    gang = await client.submit("gang", 2)
    running = await wait_for(lambda: client.running(gang), 30, "the gang to run", 0.2)
    assert sorted(nodes(running).values()) == ["n0", "n1"]
    by_id = {node.node_id: node for node in GANG_NODES}
    lost, survivor = by_id[nodes(running)[1]], by_id[nodes(running)[0]]
    spare = {"ACSP_AGENT_HOST": host_of("n2")}
    stack.start_agents(1, gpus=1, name="agents-r3", region="r3", first=2, extra_env=spare)

    # SIGKILL stops the node's heartbeats without any task event.
    agents[lost.node_id].kill()

    async def replaced() -> scheduler_pb2.Job | None:
        job = await client.running(gang)
        if job is None or nodes(job).get(1) != "n2":
            return None
        task = next(p for p in job.placements if p.task_index == 1)
        return job if task.state == "started" else None

    moved = await wait_for(replaced, 60, "the lost task to start on n2", 0.2)
    assert moved.attempt == running.attempt
    assert moved.state == scheduler_pb2.JOB_STATE_RUNNING
    assert nodes(moved)[0] == survivor.node_id
    return MovedTask(gang, running, lost, survivor)


async def test_lost_node_task_moves_in_place(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    messages = AgentMessages()
    collector = asyncio.create_task(messages.collect(stack.nats_url))
    client = Client(address, md, project, grant)
    try:
        moved = await move_lost_task(stack, client)
        gang = moved.gang

        task_id = f"{gang}/{moved.running.attempt}/1"
        starts = [
            e
            for e in messages.tasks
            if e.task_id == task_id and e.state == agent_pb2.TASK_STATE_STARTED
        ]
        assert [e.node.node_id for e in starts] == [moved.lost.node_id, "n2"]
        events = await job_events(stack.nats_url, gang)
        kinds = [e.kind for e in events]
        assert events_pb2.JOB_EVENT_KIND_REQUEUED not in kinds
        assert kinds.count(events_pb2.JOB_EVENT_KIND_STARTED) == 1

        # Once the lost node is back and its old copy confirmed stopped, its accelerator takes
        # new work.
        moved.lost.start(stack)
        single = await client.submit("single", 1)
        alone = await wait_for(lambda: client.running(single), 60, "single to run again", 0.2)
        assert list(nodes(alone).values()) == [moved.lost.node_id]
        assert (await client.running(gang)) is not None
    finally:
        await client.channel.close()
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector


async def test_survivor_hosts_file_names_new_node(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    try:
        moved = await move_lost_task(stack, client)
        task_zero = f"{moved.gang}/{moved.running.attempt}/0"
        state_dir = stack.work_dir / moved.survivor.agent
        # The agent names a task's files after its id, with each "/" made "_".
        [hosts_file] = state_dir.rglob(f"{task_zero.replace('/', '_')}.hosts")

        def hosts() -> list[str]:
            return hosts_file.read_text().splitlines()

        expected = [host_of(moved.survivor.node_id), host_of("n2")]
        await wait_for(lambda: hosts() == expected, 30, "task 0's hosts to name n2")
        assert host_of(moved.lost.node_id) not in hosts()
        assert [p.name for p in hosts_file.parent.iterdir() if p.suffix == ".tmp"] == []
    finally:
        await client.channel.close()


async def test_restarted_scheduler_keeps_lost_node_fenced(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    try:
        moved = await move_lost_task(stack, client)
        lost = moved.lost

        # The new leader reloads the lost node as up until its heartbeats are overdue. The copy
        # it may still run keeps its accelerator from a new job all the same.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        single = await client.submit("single", 1)

        async def lost_unknown() -> bool:
            reply = await client.stub.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=stack_md(stack), timeout=10
            )
            states = {n.node_id: n.state for n in reply.nodes}
            return states.get(lost.node_id) == scheduler_pb2.NODE_STATE_UNKNOWN

        async def single_with_reason() -> scheduler_pb2.Job | None:
            job = await client.get(single)
            if job is None or job.pending_reason == scheduler_pb2.PENDING_REASON_UNSPECIFIED:
                return None
            return job

        await wait_for(lost_unknown, 60, "the new leader to find the lost node unknown", 0.2)
        # A stale stored heartbeat makes the node unknown at once, maybe before the first pass.
        waiting = await wait_for(single_with_reason, 30, "a pass to give single a reason", 0.2)
        # Never placed: a placement on the lost node would have been requeued as attempt 2.
        assert waiting.attempt == 1
        assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
        assert waiting.pending_reason == scheduler_pb2.PENDING_REASON_NO_CAPACITY

        # The node comes back: its agent stops the old copy, which frees the accelerator.
        lost.start(stack)
        alone = await wait_for(lambda: client.running(single), 60, "single to run again", 0.2)
        assert list(nodes(alone).values()) == [lost.node_id]
        still = await client.running(moved.gang)
        assert still is not None
        assert still.attempt == moved.running.attempt
        assert nodes(still)[1] == "n2"
    finally:
        await client.channel.close()


async def test_node_marked_down_frees_lost_copy(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    client = Client(address, md, project, grant)
    try:
        moved = await move_lost_task(stack, client)
        lost, survivor = moved.lost, moved.survivor
        lost_copy = f"{moved.gang}/{moved.running.attempt}/1"

        async def lost_state() -> int:
            node = await client.stub.GetNode(lost.request(), metadata=operator, timeout=10)
            return int(node.state)

        await wait_for(
            lambda: _equals(lost_state(), scheduler_pb2.NODE_STATE_UNKNOWN),
            60,
            "the lost node unknown",
            0.2,
        )
        await wait_for(lambda: _equals(stored_orphans(stack), [lost_copy]), 30, "the stored copy")

        # A node that still sends heartbeats cannot be marked down.
        up = scheduler_pb2.MarkNodeDownRequest(
            provider_id="prov",
            region_id=survivor.region,
            node_id=survivor.node_id,
            reason="powered off",
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.MarkNodeDown(up, metadata=operator, timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only an unknown node" in (caught.value.details() or "")

        request = scheduler_pb2.MarkNodeDownRequest(
            provider_id="prov", region_id=lost.region, node_id=lost.node_id, reason="powered off"
        )
        down = await client.stub.MarkNodeDown(request, metadata=operator, timeout=10)
        assert down.state == scheduler_pb2.NODE_STATE_DOWN
        assert list(down.job_ids) == []
        await wait_for(lambda: _equals(stored_orphans(stack), []), 30, "the stored copy to go")

        # The node comes back with nothing running, and its accelerator takes new work.
        lost.start(stack)
        single = await client.submit("single", 1)
        alone = await wait_for(lambda: client.running(single), 60, "single to run again", 0.2)
        assert list(nodes(alone).values()) == [lost.node_id]
        back = await client.stub.GetNode(lost.request(), metadata=operator, timeout=10)
        assert list(back.job_ids) == [single]
        survivor_node = await client.stub.GetNode(survivor.request(), metadata=operator, timeout=10)
        assert list(survivor_node.job_ids) == [moved.gang]
    finally:
        await client.channel.close()


async def test_down_node_stays_down_on_new_leader(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    client = Client(address, md, project, grant)
    try:

        async def node(region: str, name: str) -> scheduler_pb2.Node:
            request = scheduler_pb2.GetNodeRequest(
                provider_id="prov", region_id=region, node_id=name
            )
            return await client.stub.GetNode(request, metadata=operator, timeout=10)

        async def n1_up() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                return (await node("r2", "n1")).state == scheduler_pb2.NODE_STATE_UP
            return False

        async def n0_unknown() -> bool:
            return (await node("r1", "n0")).state == scheduler_pb2.NODE_STATE_UNKNOWN

        # The job runs on n0, the only node, until n0 is lost and its task moves to n1.
        first_agent = stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
        first = await client.submit("first", 1)
        await wait_for(lambda: client.running(first), 30, "first to run on n0", 0.2)
        # So that the bucket contains a heartbeat of n0 for a new leader's watch to replay.
        await wait_for(lambda: stored_heartbeat(stack, "prov.r1.n0"), 30, "a heartbeat of n0")
        stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
        await wait_for(n1_up, 30, "n1 up", 0.2)
        first_agent.kill()
        await wait_for(n0_unknown, 60, "n0 unknown", 0.2)
        lost_copy = f"{first}/1/0"
        await wait_for(lambda: _equals(stored_orphans(stack), [lost_copy]), 30, "the stored copy")
        # The copy is stored in the turn that requeues the job, before the job starts on n1.
        moved = await wait_for(lambda: client.running(first), 30, "first to run on n1", 0.2)
        assert list(nodes(moved).values()) == ["n1"]

        request = scheduler_pb2.MarkNodeDownRequest(
            provider_id="prov", region_id="r1", node_id="n0", reason="powered off"
        )
        await client.stub.MarkNodeDown(request, metadata=operator, timeout=10)
        assert await stored_down(stack) == {"n0": "powered off"}
        assert await stored_orphans(stack) == []

        # A new leader loads n0 down, and the heartbeat its watch replays does not bring it up.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        leading_since = time.time()
        n0 = await node("r1", "n0")
        assert n0.state == scheduler_pb2.NODE_STATE_DOWN
        assert n0.state_cause.reason == "powered off"
        assert list(n0.job_ids) == []

        # n1's heartbeats show that the new leader ran past its heartbeat timeout (6 s).
        async def past_timeout() -> bool:
            n1 = await node("r2", "n1")
            return n1.last_heartbeat_time.ToNanoseconds() / 1e9 > leading_since + 7

        await wait_for(past_timeout, 30, "a heartbeat of n1 past the timeout", 0.2)
        n0 = await node("r1", "n0")
        assert n0.state == scheduler_pb2.NODE_STATE_DOWN
        assert list(n0.job_ids) == []
        assert await stored_orphans(stack) == []
        single = await client.submit("single", 1)
        waiting = await client.get(single)
        assert waiting is not None
        assert waiting.state == scheduler_pb2.JOB_STATE_PENDING

        # n0 heartbeats again: it is up, its mark is cleared, and no fence keeps its accelerator
        # from the waiting job.
        stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
        alone = await wait_for(lambda: client.running(single), 60, "single to run on n0", 0.2)
        assert list(nodes(alone).values()) == ["n0"]
        assert (await node("r1", "n0")).state == scheduler_pb2.NODE_STATE_UP
        assert await stored_down(stack) == {}
    finally:
        await client.channel.close()


async def test_cancelled_task_shows_confirmed_stop(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    agent = stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
    try:
        await wait_for(lambda: stored_heartbeat(stack, "prov.r1.n0"), 30, "a heartbeat of n0")

        # A paused agent sends no heartbeat and runs no command, so the job's start and stop
        # wait until n0 is lost.
        os.killpg(agent.popen.pid, signal.SIGSTOP)
        job_id = await client.submit("single", 1)

        async def in_state(state: int) -> scheduler_pb2.Job | None:
            job = await client.get(job_id)
            return job if job is not None and job.state == state else None

        await wait_for(lambda: in_state(scheduler_pb2.JOB_STATE_STARTING), 30, "single to start")
        await client.cancel(job_id)
        cancelled = await wait_for(
            lambda: in_state(scheduler_pb2.JOB_STATE_CANCELLED), 60, "single to end", 0.2
        )
        assert "a node was lost while it stopped" in cancelled.state_message
        assert [p.state for p in cancelled.placements] == ["stopping"]

        # A new leader still records the stop that n0 confirms once its agent runs again.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        os.killpg(agent.popen.pid, signal.SIGCONT)

        async def task_stopped() -> bool:
            job = await client.get(job_id)
            return job is not None and [p.state for p in job.placements] == ["stopped"]

        await wait_for(task_stopped, 60, "n0 to confirm the stop", 0.2)
        ended = await client.get(job_id)
        assert ended is not None
        assert ended.state == scheduler_pb2.JOB_STATE_CANCELLED
        assert await stored_orphans(stack) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.popen.pid, signal.SIGCONT)
        await client.channel.close()


STOP_GRACE_S = 20
"""Grace period of the job whose tasks ignore SIGTERM: each stops only when its agent sends
SIGKILL, this long after the stop command. It is well over the harness's 6 s heartbeat timeout,
so a paused node is lost while the other node's task still stops."""


async def submit_stubborn(client: Client, name: str, tasks: int) -> str:
    """Submit a gang whose tasks ignore SIGTERM, so that each stops ``STOP_GRACE_S`` late."""
    spec = scheduler_pb2.JobSpec(
        name=name,
        project_id=client.project,
        grant_id=client.grant,
        task_count=tasks,
        accelerator_millis_per_task=1000,
        gang=True,
        wall_time_seconds=600,
        grace_seconds=STOP_GRACE_S,
        # The shell's ignored SIGTERM is inherited by sleep.
        command=["sh", "-c", "trap '' TERM; sleep 300"],
    )
    request = scheduler_pb2.SubmitJobRequest(request_id=f"stubborn-{name}", spec=spec)
    reply = await client.stub.SubmitJob(request, metadata=client.md, timeout=10)
    return str(reply.job.job_id)


async def test_lost_node_keeps_survivor_fenced(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    # One accelerator per node, so the two tasks of the gang take both nodes.
    first = stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
    stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
    try:
        gang = await submit_stubborn(client, "gang", 2)
        running = await wait_for(lambda: client.running(gang), 30, "the gang to run", 0.2)
        assert sorted(nodes(running).values()) == ["n0", "n1"]
        survivor = next(i for i, node in nodes(running).items() if node == "n1")
        lost = 1 - survivor

        # n0's agent pauses, so n0 is lost while the cancel stops the gang. n1's task ignores
        # the SIGTERM and goes on until its agent kills it after the grace period.
        os.killpg(first.popen.pid, signal.SIGSTOP)
        await client.cancel(gang)

        async def cancelled() -> scheduler_pb2.Job | None:
            job = await client.get(gang)
            return (
                job if job is not None and job.state == scheduler_pb2.JOB_STATE_CANCELLED else None
            )

        ended = await wait_for(cancelled, 60, "the gang to end", 0.2)
        assert "a node was lost while it stopped" in ended.state_message
        assert [p.state for p in ended.placements] == ["stopping", "stopping"]
        copies = sorted(f"{gang}/1/{index}" for index in (lost, survivor))
        await wait_for(lambda: _equals(stored_orphans(stack), copies), 30, "the stored copies")

        # n1's accelerator stays fenced until n1 confirms the stop. A job placed there before
        # would be rejected as busy and requeued, so it would run as a later attempt.
        single = await client.submit("single", 1)

        async def started_or_requeued() -> scheduler_pb2.Job | None:
            job = await client.get(single)
            if job is None:
                return None
            if job.attempt > 1 or job.state == scheduler_pb2.JOB_STATE_RUNNING:
                return job
            return None

        alone = await wait_for(started_or_requeued, 90, "single to run or be requeued", 0.2)
        assert alone.attempt == 1
        assert alone.state == scheduler_pb2.JOB_STATE_RUNNING
        assert list(nodes(alone).values()) == ["n1"]
        confirmed = await client.get(gang)
        assert confirmed is not None
        states = {p.task_index: p.state for p in confirmed.placements}
        assert states == {lost: "stopping", survivor: "stopped"}
        assert await stored_orphans(stack) == [f"{gang}/1/{lost}"]

        # n0's agent runs again and stops the lost copy, which frees n0's accelerator as before.
        os.killpg(first.popen.pid, signal.SIGCONT)
        await wait_for(lambda: _equals(stored_orphans(stack), []), 90, "n0 to confirm the stop")
        stopped = await client.get(gang)
        assert stopped is not None
        assert [p.state for p in stopped.placements] == ["stopped", "stopped"]
        assert stopped.state == scheduler_pb2.JOB_STATE_CANCELLED
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.popen.pid, signal.SIGCONT)
        await client.channel.close()


async def test_requeued_gang_keeps_survivor_fenced(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    client = Client(address, md, project, grant)
    # One accelerator per node and no third node, so a lost task of the gang has nowhere to go.
    first = stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
    second = stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
    launcher = 0
    try:
        gang = await client.submit("gang", 2)
        running = await wait_for(lambda: client.running(gang), 30, "the gang to run", 0.2)
        assert sorted(nodes(running).values()) == ["n0", "n1"]
        survivor = next(i for i, node in nodes(running).items() if node == "n1")
        lost = 1 - survivor
        single = await client.submit("single", 1)

        # n1's task launcher pauses, so n1's agent kills the survivor at its stop but cannot
        # confirm the stop until the launcher reaps it. The agent still sends heartbeats.
        launcher = launcher_pid(second)
        os.kill(launcher, signal.SIGSTOP)
        # n0's agent pauses too, so n0 is lost and the gang is requeued whole.
        os.killpg(first.popen.pid, signal.SIGSTOP)

        async def requeued() -> scheduler_pb2.Job | None:
            job = await client.get(gang)
            pending = job is not None and job.state == scheduler_pb2.JOB_STATE_PENDING
            return job if pending and job.attempt == 2 else None

        again = await wait_for(requeued, 60, "the gang to be requeued", 0.2)
        # A gang that lost task 0 is requeued for that alone, before any search for room.
        expected = "the rendezvous host" if lost == 0 else "found no replacement"
        assert expected in again.state_message
        copies = sorted(f"{gang}/1/{index}" for index in (lost, survivor))
        await wait_for(lambda: _equals(stored_orphans(stack), copies), 30, "the stored copies")

        # Passes go on while n1 sends heartbeats that list the survivor. A job placed on n1
        # meanwhile would be rejected as busy and requeued, so it would run as a later attempt.
        async def n1_node() -> scheduler_pb2.Node:
            request = scheduler_pb2.GetNodeRequest(provider_id="prov", region_id="r2", node_id="n1")
            return await client.stub.GetNode(request, metadata=operator, timeout=10)

        requeued_at = time.time()

        async def heartbeats_go_on() -> bool:
            n1 = await n1_node()
            return n1.last_heartbeat_time.ToNanoseconds() / 1e9 > requeued_at + 3

        await wait_for(heartbeats_go_on, 30, "heartbeats of n1 after the requeue", 0.2)
        n1 = await n1_node()
        assert n1.state == scheduler_pb2.NODE_STATE_UP
        assert list(n1.job_ids) == [gang]
        waiting = await client.get(single)
        assert waiting is not None
        assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
        assert waiting.attempt == 1

        # The launcher reaps the survivor, n1 confirms the stop, and the single job runs there.
        os.kill(launcher, signal.SIGCONT)
        alone = await wait_for(lambda: client.running(single), 60, "single to run on n1", 0.2)
        assert alone.attempt == 1
        assert list(nodes(alone).values()) == ["n1"]
        assert await stored_orphans(stack) == [f"{gang}/1/{lost}"]

        # n0's agent runs again and stops the lost copy, which frees n0's accelerator as before.
        os.killpg(first.popen.pid, signal.SIGCONT)
        await wait_for(lambda: _equals(stored_orphans(stack), []), 90, "n0 to confirm the stop")
        still = await client.get(gang)
        assert still is not None
        assert still.state == scheduler_pb2.JOB_STATE_PENDING
        assert still.attempt == 2
    finally:
        if launcher:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.popen.pid, signal.SIGCONT)
        await client.channel.close()


async def test_failed_accelerator_keeps_gang_fenced(stack: Stack, tmp_path: Path) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    client = Client(address, md, project, grant)
    # One accelerator per node. The fault fails n0's, so the gang's task on n1 survives it.
    faults = fault_trace(tmp_path / "faults.json")
    stack.start_agents(1, gpus=1, name="agents-r1", region="r1", faults=faults)
    second = stack.start_agents(1, gpus=1, name="agents-r2", region="r2", first=1)
    launcher = 0
    try:
        gang = await client.submit("gang", 2)
        running = await wait_for(lambda: client.running(gang), 25, "the gang to run", 0.2)
        assert sorted(nodes(running).values()) == ["n0", "n1"]
        survivor = next(i for i, node in nodes(running).items() if node == "n1")
        single = await client.submit("single", 1)

        # n1's task launcher pauses, so n1's agent cannot confirm the survivor's stop. The
        # agent still sends heartbeats that list the survivor.
        launcher = launcher_pid(second)
        os.kill(launcher, signal.SIGSTOP)

        async def requeued() -> scheduler_pb2.Job | None:
            job = await client.get(gang)
            if job is None or job.state != scheduler_pb2.JOB_STATE_PENDING or job.attempt != 2:
                return None
            return job

        again = await wait_for(requeued, 60, "the fault to requeue the gang", 0.2)
        assert "on node prov/r1/n0 failed" in again.state_message
        # n0 confirms the stop of the copy on the failed accelerator, and n1 cannot.
        survivor_copy = f"{gang}/1/{survivor}"
        await wait_for(
            lambda: _equals(stored_orphans(stack), [survivor_copy]), 30, "n0 to confirm its stop"
        )

        # A new leader takes over and keeps n1's accelerator from the stored copy.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        restarted_at = time.time()

        async def n1_node() -> scheduler_pb2.Node:
            request = scheduler_pb2.GetNodeRequest(provider_id="prov", region_id="r2", node_id="n1")
            return await client.stub.GetNode(request, metadata=operator, timeout=10)

        async def heartbeats_go_on() -> bool:
            n1 = await n1_node()
            return n1.last_heartbeat_time.ToNanoseconds() / 1e9 > restarted_at + 3

        await wait_for(heartbeats_go_on, 30, "heartbeats of n1 on the new leader", 0.2)
        n1 = await n1_node()
        assert n1.state == scheduler_pb2.NODE_STATE_UP
        assert list(n1.job_ids) == [gang]
        # A job placed on n1 meanwhile would be rejected as busy and run as a later attempt.
        waiting = await client.get(single)
        assert waiting is not None
        assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
        assert waiting.attempt == 1

        # The launcher reaps the survivor, n1 confirms the stop, and the single job runs there.
        os.kill(launcher, signal.SIGCONT)
        alone = await wait_for(lambda: client.running(single), 60, "single to run on n1", 0.2)
        assert alone.attempt == 1
        assert list(nodes(alone).values()) == ["n1"]
        assert await stored_orphans(stack) == []
        # n0's only accelerator stays failed, so the gang waits.
        still = await client.get(gang)
        assert still is not None
        assert still.state == scheduler_pb2.JOB_STATE_PENDING
        assert still.attempt == 2
    finally:
        if launcher:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher, signal.SIGCONT)
        await client.channel.close()


def launcher_pid(agent: Process) -> int:
    """Return the pid of the task launcher that the agent process started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name in parentheses may contain spaces, so the fields follow the last ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == agent.popen.pid and b"launcher.py" in cmdline:
            return int(entry.name)
    raise AssertionError(f"agent pid {agent.popen.pid} has no task launcher")


async def stored_heartbeat(stack: Stack, key: str) -> bool:
    """Return whether the heartbeat bucket contains a heartbeat of node ``key``."""
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        bucket = await client.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
        try:
            await bucket.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
        return True
    finally:
        await client.close()


async def stored_orphans(stack: Stack) -> list[str]:
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT task_id FROM scheduler.orphans")
    finally:
        await conn.close()
    return [row["task_id"] for row in rows]


async def stored_down(stack: Stack) -> dict[str, str]:
    """Return the node id and reason of each node stored as down."""
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT node, down_reason FROM scheduler.nodes WHERE down")
    finally:
        await conn.close()
    return {row["node"]: row["down_reason"] for row in rows}


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return (await value) == expected


def stack_md(stack: Stack) -> tuple[tuple[str, str], ...]:
    return metadata(stack.token("fleet-reader", Role.PROGRAM_OFFICE))
