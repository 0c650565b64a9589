"""A job that names a region no provider offers is rejected at submission, in every form."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role
from services.runtime.errors import field_violations

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec
from .test_provider_rpcs import register_request, rpc_error

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


async def test_unknown_region_rejected_at_submission(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    # A registered region with no node up, as when all its nodes are down for maintenance.
    known = job_spec(project, grant, task_count=1, allowed_regions=["maint/reg"])
    unknown = job_spec(project, grant, task_count=1, allowed_regions=["nope/x"])
    array = job_spec(project, grant, task_count=1, allowed_regions=["nope/x"], array_size=3)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        await scheduler.RegisterProvider(register_request("maint", ""), metadata=office, timeout=10)
        single = await rpc_error(
            scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=unknown), metadata=md, timeout=10
            )
        )
        batch = await rpc_error(
            scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(
                    jobs=[
                        scheduler_pb2.SubmitJobRequest(spec=known),
                        scheduler_pb2.SubmitJobRequest(spec=unknown),
                    ]
                ),
                metadata=md,
                timeout=10,
            )
        )
        elements = await rpc_error(
            scheduler.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=array), metadata=md, timeout=10)
        )
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=known), metadata=md, timeout=10
        )

        async def pending_reason() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=accepted.job.job_id), metadata=md, timeout=10
            )
            return job if job.pending_reason else None

        waiting = await wait_for(pending_reason, 20, "the waiting job's reason", 0.2)
    assert single.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = field_violations(single)["spec.allowed_regions[0]"]
    assert "no provider offers region 'nope/x'" in reason
    assert "maint/reg" in reason
    assert "acsp fleet providers" in reason
    assert batch.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(batch)) == {"jobs[1].spec.allowed_regions[0]"}
    assert elements.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(elements)) == {"spec.allowed_regions[0]"}
    assert list(written.jobs) == []
    assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
    assert waiting.pending_reason == scheduler_pb2.PENDING_REASON_NO_MATCHING_MODEL
    assert "maint/reg" in waiting.state_message
