"""Jobs of a sub-project that holds a sub-allocation of its parent project's grant.

A job of a sub-project without a grant of its own that names no grant draws on the one
sub-allocation its project holds, and must name one when the project holds several. The PI
of the grant's project may also charge that project's jobs to a sub-project's sub-allocation.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2
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
        yield stack
    finally:
        await stack.close()


async def sub_project_with_allocations(
    stack: Stack, project: str, grant: str, pi: str, count: int
) -> tuple[str, list[str]]:
    """Create ``<project>-sub`` (PI ``pi``, member carol) holding ``count`` sub-allocations of
    ``grant``, 1 PF-day each, and add bob to ``project``; return its id and theirs."""
    sub_project = f"{project}-sub"
    pi_md = metadata(stack.token(pi, Role.PI))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        grants = grant_pb2_grpc.GrantServiceStub(channel)
        parent = await grants.GetProject(
            grant_pb2.GetProjectRequest(project_id=project), metadata=pi_md, timeout=10
        )
        await grants.AddProjectMember(
            grant_pb2.AddProjectMemberRequest(
                request_id=uuid.uuid4().hex,
                project_id=project,
                member=grant_pb2.ProjectMember(subject="bob", role=grant_pb2.PROJECT_ROLE_MEMBER),
            ),
            metadata=pi_md,
            timeout=10,
        )
        await grants.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=uuid.uuid4().hex,
                project=grant_pb2.Project(
                    project_id=sub_project,
                    institution_id=parent.institution_id,
                    display_name="Sub-project",
                    pi_subject=pi,
                    members=[
                        grant_pb2.ProjectMember(subject="carol", role=grant_pb2.PROJECT_ROLE_MEMBER)
                    ],
                ),
            ),
            metadata=pi_md,
            timeout=10,
        )
        allocations = []
        for _ in range(count):
            allocation = await grants.CreateSubAllocation(
                grant_pb2.CreateSubAllocationRequest(
                    request_id=uuid.uuid4().hex,
                    grant_id=grant,
                    holder=sub_project,
                    amount_pf_days=common_pb2.Decimal(value="1"),
                ),
                metadata=pi_md,
                timeout=10,
            )
            allocations.append(allocation.sub_allocation_id)
    return sub_project, allocations


async def used_pf_days(stack: Stack, pi: str, grant: str, allocation: str) -> Decimal:
    """Return what a sub-allocation holds and was charged, in PF-days."""
    pi_md = metadata(stack.token(pi, Role.PI))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        grants = grant_pb2_grpc.GrantServiceStub(channel)
        balance = await grants.GetBalance(
            grant_pb2.GetBalanceRequest(grant_id=grant, sub_allocation_id=allocation),
            metadata=pi_md,
            timeout=10,
        )
    return Decimal(balance.held_pf_days.value) + Decimal(balance.charged_pf_days.value)


async def test_job_naming_no_grant_draws_on_allocation(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    sub_project, [allocation] = await sub_project_with_allocations(stack, project, grant, pi, 1)
    carol = metadata(stack.token("carol", Role.RESEARCHER))
    request = scheduler_pb2.SubmitJobRequest(
        request_id="carol-1", spec=job_spec(sub_project, "", task_count=1)
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(request, metadata=carol, timeout=10)
        again = await scheduler.SubmitJob(request, metadata=carol, timeout=10)
        job_id = submitted.job.job_id

        async def admitted() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=carol, timeout=10
            )
            return job if job.hold_id else None

        job = await wait_for(admitted, 60, "the job's hold", 0.2)
    assert submitted.job.spec.grant_id == grant
    assert submitted.job.spec.sub_allocation_id == allocation
    assert again.job.job_id == job_id
    assert job.hold_id
    assert await used_pf_days(stack, pi, grant, allocation) > 0


async def test_several_allocations_must_be_named(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    sub_project, allocations = await sub_project_with_allocations(stack, project, grant, pi, 2)
    carol = metadata(stack.token("carol", Role.RESEARCHER))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))

    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=job_spec(sub_project, "", task_count=1)),
                metadata=carol,
                timeout=10,
            )
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        named = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(sub_project, grant, task_count=1, sub_allocation_id=allocations[1])
            ),
            metadata=carol,
            timeout=10,
        )

    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("invalid spec.sub_allocation_id: is empty")
    for allocation in allocations:
        assert f"--grant {grant} --sub-allocation {allocation}" in details
    assert list(written.jobs) == []
    assert named.job.spec.sub_allocation_id == allocations[1]


async def test_pi_charges_parent_job_to_allocation(stack: Stack) -> None:
    """The PI may charge a job of the grant's project to a sub-project's sub-allocation, and
    another member of that project may not."""
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    _, [allocation] = await sub_project_with_allocations(stack, project, grant, pi, 1)
    spec = job_spec(project, grant, task_count=1, sub_allocation_id=allocation)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        by_pi = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec),
            metadata=metadata(stack.token(pi, Role.PI)),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec),
                metadata=metadata(stack.token("bob", Role.RESEARCHER)),
                timeout=10,
            )
    details = caught.value.details() or ""
    assert by_pi.job.spec.sub_allocation_id == allocation
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"is held by sub-project '{project}-sub'" in details
    assert f"only when the PI of project '{project}' submits them" in details


async def test_retry_after_second_allocation(stack: Stack) -> None:
    """A retry gets the job its first call stored, although the sub-project has come to hold
    a second sub-allocation since, which a new job would have to name."""
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    sub_project, [first] = await sub_project_with_allocations(stack, project, grant, pi, 1)
    carol = metadata(stack.token("carol", Role.RESEARCHER))
    request = scheduler_pb2.SubmitJobRequest(
        request_id="carol-retry", spec=job_spec(sub_project, "", task_count=1)
    )
    batch = scheduler_pb2.SubmitJobsRequest(
        jobs=[
            scheduler_pb2.SubmitJobRequest(
                request_id="carol-batch", spec=job_spec(sub_project, "", task_count=1)
            )
        ]
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(request, metadata=carol, timeout=10)
        submitted_batch = await scheduler.SubmitJobs(batch, metadata=carol, timeout=10)
        async with grpc.aio.insecure_channel(stack.grant_address) as grant_channel:
            await grant_pb2_grpc.GrantServiceStub(grant_channel).CreateSubAllocation(
                grant_pb2.CreateSubAllocationRequest(
                    request_id=uuid.uuid4().hex,
                    grant_id=grant,
                    holder=sub_project,
                    amount_pf_days=common_pb2.Decimal(value="1"),
                ),
                metadata=metadata(stack.token(pi, Role.PI)),
                timeout=10,
            )

        async def sees_two() -> bool:
            # A job without a request id is rejected once the scheduler's cached list of the
            # sub-project's sub-allocations has expired and been read again.
            try:
                await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(spec=request.spec), metadata=carol, timeout=10
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    return True
                raise
            return False

        await wait_for(sees_two, 60, "the scheduler to list the second sub-allocation", 0.5)
        again = await scheduler.SubmitJob(request, metadata=carol, timeout=10)
        again_batch = await scheduler.SubmitJobs(batch, metadata=carol, timeout=10)

    assert submitted.job.spec.sub_allocation_id == first
    assert again.job.job_id == submitted.job.job_id
    assert again.job.spec.sub_allocation_id == first
    assert again_batch.results[0].job.job_id == submitted_batch.results[0].job.job_id
