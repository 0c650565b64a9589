"""A repeated SubmitJob or SubmitJobs request id returns the jobs its first call created."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from acsp.submitter import JobSubmitter
from acsp.v1 import scheduler_pb2
from scheduler.service.validation import MAX_ARRAY_SIZE
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


async def test_retried_array_returns_first_parent(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    request = scheduler_pb2.SubmitJobRequest(
        request_id="array-1", spec=job_spec(project, grant, task_count=1, array_size=3)
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        first = await scheduler.SubmitJob(request, metadata=md, timeout=10)
        retried = await scheduler.SubmitJob(request, metadata=md, timeout=10)
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(array_job_id=retried.job.job_id),
            metadata=md,
            timeout=10,
        )
    assert retried.job.job_id == first.job.job_id
    assert list(retried.array_job_ids) == list(first.array_job_ids)
    assert sorted(job.job_id for job in listed.jobs) == sorted(first.array_job_ids)


async def test_repeated_id_in_batch_scheduled_once(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    item = scheduler_pb2.SubmitJobRequest(
        request_id="twice-1", spec=job_spec(project, grant, task_count=1)
    )
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(jobs=[item, item]), metadata=md, timeout=10
        )
        job_id = submitted.results[0].job.job_id

        async def seen_by_engine() -> bool:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            # Without nodes the job stays pending, and the engine records why.
            return job.pending_reason != scheduler_pb2.PENDING_REASON_UNSPECIFIED

        await wait_for(seen_by_engine, 30, "the engine to consider the job")
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
    assert submitted.results[1].job.job_id == job_id
    assert [job.job_id for job in listed.jobs] == [job_id]


async def test_request_id_scoped_to_submitter(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    pi_md = metadata(stack.token(pi, Role.PI))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    request = scheduler_pb2.SubmitJobRequest(
        request_id="shared-1", spec=job_spec(project, grant, task_count=1)
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        by_pi = await scheduler.SubmitJob(request, metadata=pi_md, timeout=10)
        by_office = await scheduler.SubmitJob(request, metadata=office, timeout=10)
        again_by_office = await scheduler.SubmitJob(request, metadata=office, timeout=10)
    assert by_office.job.job_id != by_pi.job.job_id
    assert by_office.job.owner_subject == "office"
    assert again_by_office.job.job_id == by_office.job.job_id


async def test_sdk_submitter_isolates_invalid_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    good = [
        scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1))
        for _ in range(20)
    ]
    bad = scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1))
    bad.spec.wall_time_seconds = 0
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitter = JobSubmitter(scheduler, linger_s=0.05, metadata=md)
        results = await asyncio.gather(
            *(submitter.submit(request) for request in [*good[:10], bad, *good[10:]]),
            return_exceptions=True,
        )
        await submitter.close()
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(project_id=project), metadata=md, timeout=10
        )
    rejected = results.pop(10)
    assert isinstance(rejected, grpc.aio.AioRpcError)
    assert rejected.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wall_time_seconds" in (rejected.details() or "")
    created = [r.job.job_id for r in results if isinstance(r, scheduler_pb2.SubmitJobResponse)]
    assert len(set(created)) == 20
    assert sorted(job.job_id for job in listed.jobs) == sorted(created)


async def test_reused_id_with_other_spec_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    first = scheduler_pb2.SubmitJobRequest(
        request_id="reused-1", spec=job_spec(project, grant, task_count=1)
    )
    other = scheduler_pb2.SubmitJobRequest(
        request_id="reused-1", spec=job_spec(project, grant, task_count=1, name="other")
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        stored = await scheduler.SubmitJob(first, metadata=md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await scheduler.SubmitJob(other, metadata=md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as batched:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[other]), metadata=md, timeout=10
            )
        retried = await scheduler.SubmitJob(first, metadata=md, timeout=10)
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)

    assert single.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (single.value.details() or "").startswith("request_id: was used before for job")
    assert batched.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (batched.value.details() or "").startswith("jobs[0].request_id: was used before")
    assert retried.job.job_id == stored.job.job_id
    assert [job.job_id for job in listed.jobs] == [stored.job.job_id]


async def test_rejected_batch_stores_no_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    stored = scheduler_pb2.SubmitJobRequest(
        request_id="batch-1", spec=job_spec(project, grant, task_count=1)
    )
    fresh = scheduler_pb2.SubmitJobRequest(
        request_id="batch-2", spec=job_spec(project, grant, task_count=1, name="fresh")
    )
    reused = scheduler_pb2.SubmitJobRequest(
        request_id="batch-1", spec=job_spec(project, grant, task_count=1, name="reused")
    )
    twice = scheduler_pb2.SubmitJobRequest(
        request_id="batch-3", spec=job_spec(project, grant, task_count=1, name="twice")
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        first = await scheduler.SubmitJob(stored, metadata=md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as across:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[fresh, reused]), metadata=md, timeout=10
            )
        twice_changed = scheduler_pb2.SubmitJobRequest()
        twice_changed.CopyFrom(twice)
        twice_changed.spec.name = "changed"
        with pytest.raises(grpc.aio.AioRpcError) as within:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[fresh, twice, twice_changed]),
                metadata=md,
                timeout=10,
            )
        large = scheduler_pb2.SubmitJobRequest(
            spec=job_spec(project, grant, task_count=1, array_size=MAX_ARRAY_SIZE // 2 + 1)
        )
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[large, large]), metadata=md, timeout=30
            )
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)

    assert across.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (across.value.details() or "").startswith("jobs[1].request_id: was used before")
    assert within.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[2].request_id" in (within.value.details() or "")
    assert "jobs[1]" in (within.value.details() or "")
    assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid request: jobs would create" in (oversized.value.details() or "")
    assert [job.job_id for job in listed.jobs] == [first.job.job_id]


async def test_request_id_reused_with_other_array_size(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))

    def request(request_id: str, array_size: int) -> scheduler_pb2.SubmitJobRequest:
        spec = job_spec(project, grant, task_count=1, array_size=array_size)
        return scheduler_pb2.SubmitJobRequest(request_id=request_id, spec=spec)

    channel, scheduler = scheduler_stub(address)
    async with channel:
        array = await scheduler.SubmitJob(request("array-2", 2), metadata=md, timeout=10)
        single = await scheduler.SubmitJob(request("single-1", 0), metadata=md, timeout=10)
        errors = []
        for reuse in (request("array-2", 3), request("array-2", 0), request("single-1", 2)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await scheduler.SubmitJob(reuse, metadata=md, timeout=10)
            errors.append(error.value)
        smaller = scheduler_pb2.SubmitJobRequest(request_id="array-3", spec=request("", 3).spec)
        await scheduler.SubmitJob(smaller, metadata=md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as shrunk:
            await scheduler.SubmitJob(request("array-3", 2), metadata=md, timeout=10)
        errors.append(shrunk.value)
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)

    for error in errors:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (error.details() or "").startswith("request_id: was used before for job")
    assert len(listed.jobs) == 2 + 1 + 3
    assert {job.array_job_id for job in listed.jobs if job.array_job_id} >= {array.job.job_id}
    assert single.job.job_id in {job.job_id for job in listed.jobs}


async def test_retry_after_dependency_ended_returns_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        earlier = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
            metadata=md,
            timeout=10,
        )
        awaited = earlier.job.job_id
        request = scheduler_pb2.SubmitJobRequest(
            request_id="after-1",
            spec=job_spec(project, grant, task_count=1, after_job_ids=[awaited]),
        )
        first = await scheduler.SubmitJob(request, metadata=md, timeout=10)
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=awaited, reason="not needed"),
            metadata=md,
            timeout=10,
        )
        # The retry of a call whose reply was lost returns the job it created, although the
        # job it waits for has ended since and a new submission would be rejected.
        retried = await scheduler.SubmitJob(request, metadata=md, timeout=10)
        batched = await scheduler.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(jobs=[request]), metadata=md, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as fresh:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(request_id="after-2", spec=request.spec),
                metadata=md,
                timeout=10,
            )

    assert retried.job.job_id == first.job.job_id
    assert batched.results[0].job.job_id == first.job.job_id
    assert fresh.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"job {awaited} ended cancelled" in (fresh.value.details() or "")
