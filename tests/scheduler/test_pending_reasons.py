"""Jobs that can never start wait with a reason that explains why."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(180)


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


async def test_unplaceable_jobs_name_their_reason(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=7, gpus=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def fleet_known() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return len(nodes.nodes) == 7

        await wait_for(fleet_known, 30, "the agents' inventories", 0.2)
        # A registered region with no nodes, so the job is accepted and waits.
        mars = scheduler_pb2.Provider(
            provider_id="mars", regions=[scheduler_pb2.Region(region_id="x")]
        )
        await scheduler.RegisterProvider(
            scheduler_pb2.RegisterProviderRequest(provider=mars), metadata=operator, timeout=10
        )
        gang = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, accelerator_millis_per_task=8000)
            ),
            metadata=md,
            timeout=10,
        )
        same_node = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(
                    project,
                    grant,
                    accelerator_millis_per_task=2000,
                    topology=scheduler_pb2.TOPOLOGY_SAME_NODE,
                )
            ),
            metadata=md,
            timeout=10,
        )
        far = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, allowed_regions=["mars/x"])
            ),
            metadata=md,
            timeout=10,
        )

        async def reason_of(job_id: str) -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job if job.pending_reason else None

        gang_job = await wait_for(lambda: reason_of(gang.job.job_id), 20, "the gang's reason", 0.2)
        same_node_job = await wait_for(
            lambda: reason_of(same_node.job.job_id), 20, "the same-node gang's reason", 0.2
        )
        far_job = await wait_for(lambda: reason_of(far.job.job_id), 20, "the far job's reason", 0.2)
    assert gang_job.pending_reason == scheduler_pb2.PENDING_REASON_TASK_TOO_LARGE
    assert "no node has 8 accelerators of an accepted model for one task" in gang_job.state_message
    assert gang_job.state_message.endswith("has 2; it waits until a larger node joins")
    assert same_node_job.pending_reason == scheduler_pb2.PENDING_REASON_TOPOLOGY
    assert "has 4 accelerators" in same_node_job.state_message
    assert far_job.pending_reason == scheduler_pb2.PENDING_REASON_NO_MATCHING_MODEL
    assert "no node in the allowed regions (mars/x)" in far_job.state_message
