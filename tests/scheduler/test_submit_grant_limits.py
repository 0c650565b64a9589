"""SubmitJob checks a job against its grant's constraints and its sub-allocation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2
from scheduler.service.admission import GrantAdmission
from scheduler.service.model import Job, JobSpec, TaskPlacement, new_job_id
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(180)

H100 = "H100-SXM5-80GB"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


async def add_member_with_allocation(
    stack: Stack, project: str, grant: str, pi: str, member: str
) -> str:
    """Add ``member`` to the project and give them a sub-allocation; return its id."""
    pi_md = metadata(stack.token(pi, Role.PI))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        grants = grant_pb2_grpc.GrantServiceStub(channel)
        await grants.AddProjectMember(
            grant_pb2.AddProjectMemberRequest(
                request_id=uuid.uuid4().hex,
                project_id=project,
                member=grant_pb2.ProjectMember(subject=member, role=grant_pb2.PROJECT_ROLE_MEMBER),
            ),
            metadata=pi_md,
            timeout=10,
        )
        allocation = await grants.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id=uuid.uuid4().hex,
                grant_id=grant,
                holder=member,
                amount_pf_days=common_pb2.Decimal(value="2"),
            ),
            metadata=pi_md,
            timeout=10,
        )
    return allocation.sub_allocation_id


async def test_submit_outside_grant_constraints_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack, regions=("prov/reg",), models=(H100,))
    owner = metadata(stack.token(pi, Role.PI))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    rejected = {
        "spec.accelerators.models": job_spec(
            project, grant, task_count=1, accelerators={"models": ["A100-SXM4-80GB"]}
        ),
        "spec.allowed_regions": job_spec(
            project, grant, task_count=1, allowed_regions=["other/reg"]
        ),
        "spec.allow_cross_provider": job_spec(
            project, grant, task_count=1, allow_cross_provider=True
        ),
    }
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # Registered, so the submission gets past the scheduler's own region check.
        other = scheduler_pb2.Provider(
            provider_id="other", regions=[scheduler_pb2.Region(region_id="reg")]
        )
        await scheduler.RegisterProvider(
            scheduler_pb2.RegisterProviderRequest(provider=other), metadata=office, timeout=10
        )
        for field, spec in rejected.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(spec=spec), metadata=owner, timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, field
            assert (caught.value.details() or "").startswith(f"{field}: "), field
        with pytest.raises(grpc.aio.AioRpcError) as batch:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(
                    jobs=[
                        scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
                        scheduler_pb2.SubmitJobRequest(spec=rejected["spec.allowed_regions"]),
                    ]
                ),
                metadata=owner,
                timeout=10,
            )
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, accelerators={"models": [H100]})
            ),
            metadata=owner,
            timeout=10,
        )
    assert batch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "jobs[1].spec.allowed_regions" in (batch.value.details() or "")
    assert "prov/reg" in (batch.value.details() or "")
    assert list(written.jobs) == []
    assert accepted.job.job_id


async def test_submit_checks_sub_allocation(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    other_project, other_grant, other_pi = await fund_grant(stack)
    mine = await add_member_with_allocation(stack, project, grant, pi, "bob")
    await add_member_with_allocation(stack, project, grant, pi, "carol")
    foreign = await add_member_with_allocation(stack, other_project, other_grant, other_pi, "dan")
    bob = metadata(stack.token("bob", Role.RESEARCHER))
    carol = metadata(stack.token("carol", Role.RESEARCHER))
    owner = metadata(stack.token(pi, Role.PI))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    rejected = {
        "unknown": (bob, job_spec(project, grant, task_count=1, sub_allocation_id="no-such")),
        "of another grant": (
            bob,
            job_spec(project, grant, task_count=1, sub_allocation_id=foreign),
        ),
        "not the holder": (carol, job_spec(project, grant, task_count=1, sub_allocation_id=mine)),
        "no grant named": (bob, job_spec(project, "", task_count=1, sub_allocation_id=mine)),
    }
    expected = {
        "unknown": grpc.StatusCode.NOT_FOUND,
        "of another grant": grpc.StatusCode.NOT_FOUND,
        "not the holder": grpc.StatusCode.PERMISSION_DENIED,
        "no grant named": grpc.StatusCode.INVALID_ARGUMENT,
    }
    named_field = {
        "unknown": "spec.sub_allocation_id",
        "of another grant": "spec.sub_allocation_id",
        "not the holder": "spec.sub_allocation_id",
        "no grant named": "spec.grant_id",
    }
    channel, scheduler = scheduler_stub(address)
    async with channel:
        for case, (md, spec) in rejected.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
                )
            assert caught.value.code() == expected[case], case
            assert named_field[case] in (caught.value.details() or ""), case
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        spec = job_spec(project, grant, task_count=1, sub_allocation_id=mine)
        by_holder = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=bob, timeout=10
        )
        by_pi = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=owner, timeout=10
        )
    assert list(written.jobs) == []
    assert by_holder.job.spec.sub_allocation_id == mine
    assert by_pi.job.job_id


async def test_sub_project_member_draws_on_allocation(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    sub_project = f"{project}-sub"

    pi_md = metadata(stack.token(pi, Role.PI))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        grants = grant_pb2_grpc.GrantServiceStub(channel)
        parent = await grants.GetProject(
            grant_pb2.GetProjectRequest(project_id=project), metadata=pi_md, timeout=10
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
                        grant_pb2.ProjectMember(subject="erin", role=grant_pb2.PROJECT_ROLE_MEMBER)
                    ],
                ),
            ),
            metadata=pi_md,
            timeout=10,
        )
        allocation = await grants.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id=uuid.uuid4().hex,
                grant_id=grant,
                holder=sub_project,
                amount_pf_days=common_pb2.Decimal(value="2"),
            ),
            metadata=pi_md,
            timeout=10,
        )

    erin = metadata(stack.token("erin", Role.RESEARCHER))
    spec = job_spec(sub_project, grant, task_count=1)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=erin, timeout=10
            )
        spec.sub_allocation_id = allocation.sub_allocation_id
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=erin, timeout=10
        )
    # Without the sub-allocation, the grant of the parent project is not the sub-project's.
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert submitted.job.spec.project_id == sub_project
    assert submitted.job.spec.sub_allocation_id == allocation.sub_allocation_id


async def test_jobs_placed_within_grant_constraints(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2, provider="cheap", name="cheap")
    stack.start_agents(nodes=1, model=H100, provider="allowed", name="allowed")
    project, grant, pi = await fund_grant(stack, regions=("allowed/reg",), models=(H100,))
    md = metadata(stack.token(pi, Role.PI))
    # Each job needs a whole 8-accelerator node and runs for a minute. The grant's one node
    # takes one of them, and the others must wait instead of using the cheap provider's nodes.
    spec = job_spec(
        project,
        grant,
        task_count=1,
        accelerator_millis_per_task=8000,
        simulated_run_seconds=60,
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_ids = []
        for _ in range(3):
            submitted = await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
            )
            job_ids.append(submitted.job.job_id)

        async def settled() -> list[scheduler_pb2.Job] | None:
            jobs = [
                await scheduler.GetJob(
                    scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
                )
                for job_id in job_ids
            ]
            admitted = [job for job in jobs if job.hold_id]
            waiting = [job for job in jobs if job.pending_reason]
            return jobs if len(admitted) == 1 and len(waiting) == 2 else None

        jobs = await wait_for(settled, 60, "one job admitted and two waiting", 0.2)
    [running] = [job for job in jobs if job.hold_id]
    assert [p.provider_id for p in running.placements] == ["allowed"]
    assert [p.region_id for p in running.placements] == ["reg"]
    assert all(not job.placements for job in jobs if not job.hold_id)


async def test_admission_rejects_hold_outside_grant(stack: Stack) -> None:
    project, grant, _ = await fund_grant(stack, regions=("allowed/reg",), models=(H100,))
    spec = JobSpec(name="j", project_id=project, command=("true",), grant_id=grant)
    inside = Job(
        job_id=new_job_id(),
        spec=spec,
        owner="alice",
        placement=(TaskPlacement(0, "allowed", "reg", "n0", ("GPU-0",)),),
    )
    outside = replace(
        inside,
        job_id=new_job_id(),
        placement=(TaskPlacement(0, "cheap", "reg", "n0", ("GPU-0",)),),
    )
    service = metadata(stack.token("scheduler", Role.SERVICE))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        admission = GrantAdmission(grant_pb2_grpc.GrantServiceStub(channel), service)
        amount = Decimal("0.001")
        models = {inside.job_id: H100, outside.job_id: H100}
        held, refused = await admission.place_holds([(inside, amount), (outside, amount)], models)
        no_model = await admission.place_hold(replace(inside, job_id=new_job_id()), amount)
        single = await admission.place_hold(
            replace(outside, job_id=new_job_id()), amount, "A100-SXM4-80GB"
        )
    assert held.status == "held"
    assert refused.status == "rejected"
    assert "region 'cheap/reg'" in refused.message
    assert no_model.status == "held"
    assert single.status == "rejected"
    assert "A100-SXM4-80GB" in single.message
