"""SubmitJob rejects a job whose hold its grant could never pay, and explains budget waits."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec
from .test_submit_grant_limits import add_member_with_allocation

pytestmark = pytest.mark.timeout(180)

H100 = "H100-SXM5-80GB"
DAY_S = 86_400


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


def h100_job(
    project: str, grant: str, accelerators: int, **fields: object
) -> scheduler_pb2.JobSpec:
    """A one-task job on H100s for a day: about 0.99 PF-days per accelerator at catalog rates."""
    return job_spec(
        project,
        grant,
        task_count=1,
        accelerator_millis_per_task=accelerators * 1000,
        wall_time_seconds=DAY_S,
        accelerators={"models": [H100]},
        **fields,
    )


async def supplement(stack: Stack, grant: str, pf_days: str) -> None:
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        await grant_pb2_grpc.GrantServiceStub(channel).SupplementGrant(
            grant_pb2.SupplementGrantRequest(
                request_id=uuid.uuid4().hex,
                grant_id=grant,
                amount_pf_days=common_pb2.Decimal(value=pf_days),
                reason="test supplement",
            ),
            metadata=office,
            timeout=10,
        )


async def add_grant(stack: Stack, project: str, pi: str, pf_days: str) -> str:
    """Award ``project`` (made by ``fund_grant``) one more exploratory grant; return its id."""
    institution = project.replace("proj-", "inst-", 1)
    owner = metadata(stack.token(pi, Role.PI, institution=institution))
    start = datetime.now(UTC) - timedelta(hours=1)
    window = common_pb2.TimeWindow()
    window.start_time.FromDatetime(start)
    window.end_time.FromDatetime(start + timedelta(days=30))
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        application = await grant_pb2_grpc.GrantServiceStub(channel).SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=uuid.uuid4().hex,
                application=grant_pb2.Application(
                    project_id=project,
                    tier=grant_pb2.GRANT_TIER_EXPLORATORY,
                    requested_pf_days=common_pb2.Decimal(value=pf_days),
                    validity=window,
                    justification="a second grant of the project",
                ),
            ),
            metadata=owner,
            timeout=10,
        )
    assert application.grant_id, "an exploratory grant within the tier limit is awarded at once"
    return application.grant_id


async def job_state(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    job_id: str,
    owner: tuple[tuple[str, str], ...],
) -> scheduler_pb2.Job:
    return await scheduler.GetJob(
        scheduler_pb2.GetJobRequest(job_id=job_id), metadata=owner, timeout=10
    )


async def test_hold_above_sub_allocation_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    allocation = await add_member_with_allocation(stack, project, grant, pi, "bob")
    bob = metadata(stack.token("bob", Role.RESEARCHER))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    # Four H100s for a day cost about 4 PF-days; the sub-allocation was funded with 2.
    too_big = h100_job(project, grant, 4, sub_allocation_id=allocation)
    fits = h100_job(project, grant, 1, sub_allocation_id=allocation)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=too_big), metadata=bob, timeout=10
            )
        array = scheduler_pb2.JobSpec()
        array.CopyFrom(too_big)
        array.array_size = 50
        with pytest.raises(grpc.aio.AioRpcError) as batch:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(
                    jobs=[
                        scheduler_pb2.SubmitJobRequest(spec=fits),
                        scheduler_pb2.SubmitJobRequest(spec=array),
                    ]
                ),
                metadata=bob,
                timeout=10,
            )
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=fits), metadata=bob, timeout=10
        )
    details = single.value.details() or ""
    assert single.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("spec.wall_time_seconds: ")
    assert f"sub-allocation {allocation} of grant {grant}" in details
    assert "more than the 2 PF-days" in details
    assert "is 3.958 PF-days" in details
    assert "spec.task_count" in details
    assert "spec.accelerator_millis_per_task" in details
    assert batch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (batch.value.details() or "").startswith("jobs[1].spec.wall_time_seconds: ")
    assert list(written.jobs) == []
    assert accepted.job.job_id


async def test_hold_above_supplemented_grant_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack, pf_days="10")
    await supplement(stack, grant, "1")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 12)),
                metadata=owner,
                timeout=10,
            )
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 11)),
            metadata=owner,
            timeout=10,
        )
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("spec.wall_time_seconds: ")
    assert f"more than the 11 PF-days grant {grant} was ever credited" in details
    assert "one supplement" in details
    assert accepted.job.job_id


async def test_hold_beyond_supplement_limit_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    # An exploratory grant of 5; its one supplement may add half the tier limit of 10.
    project, grant, pi = await fund_grant(stack, pf_days="5")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            # About 10.88 PF-days: more than the 10 the grant can ever be credited.
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 11)),
                metadata=owner,
                timeout=10,
            )
        # About 9.89 PF-days: payable once the grant gets its supplement.
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 10)),
            metadata=owner,
            timeout=10,
        )
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(project_id=project), metadata=owner, timeout=10
        )
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("spec.wall_time_seconds: ")
    assert "is 10.8845 PF-days" in details
    assert f"more than the 10 PF-days grant {grant} can ever be credited" in details
    assert "5 PF-days so far and at most 5 more from its one supplement" in details
    assert "lower spec.wall_time_seconds" in details
    assert [job.job_id for job in listed.jobs] == [accepted.job.job_id]


async def test_no_grant_job_beyond_supplement_limit_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack, pf_days="5")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 11)),
                metadata=owner,
                timeout=10,
            )
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"on grant {grant} it is 10.8845 PF-days at {H100}" in details
    assert "more than the 10 PF-days the grant can ever be credited" in details


async def test_no_grant_job_beyond_project_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack, pf_days="10")
    await supplement(stack, grant, "1")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(
                    jobs=[
                        scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 1)),
                        scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 12)),
                    ]
                ),
                metadata=owner,
                timeout=10,
            )
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(project_id=project), metadata=owner, timeout=10
        )
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 11)),
            metadata=owner,
            timeout=10,
        )
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"jobs[1].spec.wall_time_seconds: no grant of project {project} ")
    assert f"on grant {grant} it is 11.874 PF-days at {H100}" in details
    assert "more than the 11 PF-days the grant was ever credited" in details
    assert "jobs[1].spec.task_count" in details
    assert list(written.jobs) == []
    assert accepted.job.job_id


async def test_no_grant_job_sees_new_grant(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack, pf_days="3")
    await supplement(stack, grant, "1")
    owner = metadata(stack.token(pi, Role.PI))
    # Five H100s for a day: about 4.948 PF-days, more than the 4 the first grant was credited.
    request = scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 5))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(request, metadata=owner, timeout=10)
        await add_grant(stack, project, pi, "5")

        async def accepted() -> scheduler_pb2.SubmitJobResponse | None:
            try:
                return await scheduler.SubmitJob(request, metadata=owner, timeout=10)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                return None

        # The project's grants stay cached for 30 s, but a rejection reads a list older
        # than 5 s again.
        submitted = await wait_for(accepted, 20, "the job to be accepted", 0.5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert submitted.job.job_id


async def test_no_grant_job_of_growable_grant_accepted(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, _, pi = await fund_grant(stack, pf_days="2")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # About 3.958 PF-days against 2 that a supplement may still raise.
        accepted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, "", 4)),
            metadata=owner,
            timeout=10,
        )
    assert accepted.job.job_id
    assert accepted.job.spec.grant_id == ""


async def test_grant_that_may_grow_keeps_job_waiting(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, gpus=8, model=H100)
    project, grant, pi = await fund_grant(stack, pf_days="2")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # About 3.958 PF-days against an award of 2 without its supplement: it may still grow.
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 4)),
            metadata=owner,
            timeout=10,
        )

        async def budget_reason() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=submitted.job.job_id),
                metadata=owner,
                timeout=10,
            )
            return job if job.pending_reason == scheduler_pb2.PENDING_REASON_BUDGET else None

        waiting = await wait_for(budget_reason, 60, "a budget pending reason", 0.2)
    message = waiting.state_message
    assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
    assert message.startswith("needs 3.958 PF-days for this hold, more than the whole 2 ")
    assert f"grant {grant} was ever credited" in message
    assert "supplements the grant" in message
    assert "amount_pf_days" not in message


async def test_budget_block_spares_other_grant(stack: Stack) -> None:
    # Blocks are lifted only after 300 s, so a job held back by one gets no hold in this test.
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_BUDGET_RETRY_S="300")
    stack.start_agents(nodes=1, gpus=8, model=H100)
    project, small, pi = await fund_grant(stack, pf_days="2")
    large = await add_grant(stack, project, pi, "6")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # About 3.958 PF-days each: more than the 2 of the small grant, within the large one.
        unpaid = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, small, 4)),
            metadata=owner,
            timeout=10,
        )

        async def unpaid_waits() -> bool:
            job = await job_state(scheduler, unpaid.job.job_id, owner)
            return job.pending_reason == scheduler_pb2.PENDING_REASON_BUDGET

        await wait_for(unpaid_waits, 60, "the first job's budget pending reason", 0.2)
        paid = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, large, 4)),
            metadata=owner,
            timeout=10,
        )

        async def paid_started() -> scheduler_pb2.Job | None:
            job = await job_state(scheduler, paid.job.job_id, owner)
            return job if job.hold_id else None

        started = await wait_for(paid_started, 60, "the second job's hold", 0.2)
    assert started.spec.grant_id == large
    assert started.pending_reason != scheduler_pb2.PENDING_REASON_BUDGET


async def test_budget_reason_rounds_amounts(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, gpus=16, model=H100)
    project, grant, pi = await fund_grant(stack, pf_days="10")
    # Delegating 2 PF-days leaves the grant 8 available of the 10 it was credited.
    await add_member_with_allocation(stack, project, grant, pi, "bob")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 9)),
            metadata=owner,
            timeout=10,
        )

        async def budget_reason() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=submitted.job.job_id),
                metadata=owner,
                timeout=10,
            )
            return job if job.pending_reason == scheduler_pb2.PENDING_REASON_BUDGET else None

        waiting = await wait_for(budget_reason, 60, "a budget pending reason", 0.2)
    assert waiting.state_message.startswith(
        f"needs 8.9055 PF-days for this hold; grant {grant} has 8 PF-days available; "
        "the scheduler asks for the hold again after "
    )


async def test_job_fails_once_grant_supplemented(stack: Stack) -> None:
    # Holds are retried every second, so the job fails once the project cache, which holds
    # the grant for 30 s from the submission, shows the supplement.
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_BUDGET_RETRY_S="1")
    stack.start_agents(nodes=1, gpus=8, model=H100)
    project, grant, pi = await fund_grant(stack, pf_days="2")
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # About 3.958 PF-days: accepted against 2 that may still grow, then the grant's one
        # supplement brings it to 3 only.
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=h100_job(project, grant, 4)),
            metadata=owner,
            timeout=10,
        )
        await supplement(stack, grant, "1")

        async def failed() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=submitted.job.job_id),
                metadata=owner,
                timeout=10,
            )
            return job if job.state == scheduler_pb2.JOB_STATE_FAILED else None

        ended = await wait_for(failed, 90, "the job to fail", 0.5)
    message = ended.state_message
    assert "more than the 3 PF-days grant" in message
    assert "the grant has had its one supplement, so it could never start" in message
