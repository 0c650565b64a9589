"""Jobs that wait for others, end to end: real grant service, NATS, agents and schedulers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, scheduler_pb2
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


class Jobs:
    """Submits and reads jobs of one project as its PI."""

    def __init__(self, stack: Stack, address: str, project: str, grant: str, pi: str) -> None:
        self.channel, self.scheduler = scheduler_stub(address)
        self.md = metadata(stack.token(pi, Role.PI))
        self.project = project
        self.grant = grant

    async def submit(self, command: list[str], *after: str) -> str:
        spec = job_spec(
            self.project, self.grant, task_count=1, command=command, after_job_ids=list(after)
        )
        response = await self.scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=self.md, timeout=10
        )
        return response.job.job_id

    async def get(self, job_id: str) -> scheduler_pb2.Job:
        return await self.scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=self.md, timeout=10
        )

    async def wait_state(self, job_id: str, state: int, awaited: str) -> scheduler_pb2.Job:
        async def reached() -> scheduler_pb2.Job | None:
            job = await self.get(job_id)
            return job if job.state == state else None

        found = await wait_for(reached, 60, awaited, 0.2)
        assert found is not None
        return found


def wait_for_file(path: Path) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {path} ]; do sleep 0.1; done"]


async def test_job_starts_after_dependency_across_restart(stack: Stack, tmp_path: Path) -> None:
    scheduler_process, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    jobs = Jobs(stack, address, project, grant, pi)
    earlier = await jobs.submit(["true"])
    await jobs.wait_state(earlier, scheduler_pb2.JOB_STATE_COMPLETED, "an earlier job to complete")
    release = tmp_path / "release"
    first = await jobs.submit(wait_for_file(release))
    second = await jobs.submit(["true"], first)
    await jobs.wait_state(first, scheduler_pb2.JOB_STATE_RUNNING, "the first job to run")

    waiting = await jobs.get(second)
    assert waiting.state == scheduler_pb2.JOB_STATE_PENDING
    assert waiting.pending_reason == scheduler_pb2.PENDING_REASON_DEPENDENCY
    assert waiting.state_message == f"waiting for job {first} to complete"
    assert list(waiting.spec.after_job_ids) == [first]

    # A new leader loads the waiting job and keeps it waiting.
    await jobs.channel.close()
    scheduler_process.kill()
    _, address = await stack.start_scheduler("scheduler-restarted")
    jobs = Jobs(stack, address, project, grant, pi)
    reloaded = await jobs.get(second)
    assert reloaded.pending_reason == scheduler_pb2.PENDING_REASON_DEPENDENCY
    # The new leader reads from the store how a job that ended before it led ended.
    later = await jobs.submit(["true"], earlier)
    await jobs.wait_state(later, scheduler_pb2.JOB_STATE_COMPLETED, "a job after the earlier one")

    release.touch()
    done = await jobs.wait_state(
        second, scheduler_pb2.JOB_STATE_COMPLETED, "the second job to complete"
    )
    ended = await jobs.get(first)
    assert ended.state == scheduler_pb2.JOB_STATE_COMPLETED
    assert done.start_time.ToNanoseconds() >= ended.end_time.ToNanoseconds()
    await jobs.channel.close()


async def test_failed_dependency_cancels_waiting_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    jobs = Jobs(stack, address, project, grant, pi)
    failing = await jobs.submit(["sh", "-c", "sleep 1; exit 3"])
    waiting = await jobs.submit(["true"], failing)

    cancelled = await jobs.wait_state(
        waiting, scheduler_pb2.JOB_STATE_CANCELLED, "the waiting job to be cancelled"
    )
    assert cancelled.state_message == (
        f"job {failing} that it waits for ended failed, so it can never start"
    )
    assert not cancelled.placements

    # A job that ended failed is rejected as a dependency at submission.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.submit(["true"], failing)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"job {failing} ended failed" in (caught.value.details() or "")
    await jobs.channel.close()


async def test_unknown_dependency_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    jobs = Jobs(stack, address, project, grant, pi)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await jobs.submit(["true"], "j00000000000000nosuch")

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "invalid spec.after_job_ids[0]: job j00000000000000nosuch is not found in project "
        f"{project}; pass the id of a job or job array of the same project that this "
        "scheduler shard runs, as SubmitJob returned it"
    )
    listed = await jobs.scheduler.ListJobs(
        scheduler_pb2.ListJobsRequest(project_id=project), metadata=jobs.md, timeout=10
    )
    assert list(listed.jobs) == []
    await jobs.channel.close()


async def test_array_after_large_array_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    jobs = Jobs(stack, address, project, grant, pi)
    awaited = await jobs.scheduler.SubmitJob(
        scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1, array_size=400)),
        metadata=jobs.md,
        timeout=30,
    )
    # 251 elements that each wait for 400 jobs are 100,400 waits.
    spec = job_spec(
        project, grant, task_count=1, array_size=251, after_job_ids=[awaited.job.job_id]
    )

    with pytest.raises(grpc.aio.AioRpcError) as single:
        await jobs.scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=jobs.md, timeout=30
        )
    with pytest.raises(grpc.aio.AioRpcError) as batched:
        await jobs.scheduler.SubmitJobs(
            scheduler_pb2.SubmitJobsRequest(
                jobs=[
                    scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
                    scheduler_pb2.SubmitJobRequest(spec=spec),
                ]
            ),
            metadata=jobs.md,
            timeout=30,
        )
    listed = await jobs.scheduler.ListJobs(
        scheduler_pb2.ListJobsRequest(
            project_id=project, page=common_pb2.PageRequest(page_size=1000)
        ),
        metadata=jobs.md,
        timeout=10,
    )

    assert single.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (single.value.details() or "").startswith(
        "invalid spec.after_job_ids: would create 100400 waits"
    )
    assert batched.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (batched.value.details() or "").startswith("invalid jobs: would create 100400 waits")
    assert len(listed.jobs) == 400
    await jobs.channel.close()


async def test_job_waits_for_every_array_element(stack: Stack, tmp_path: Path) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    jobs = Jobs(stack, address, project, grant, pi)
    release = tmp_path / "release"
    array = await jobs.scheduler.SubmitJob(
        scheduler_pb2.SubmitJobRequest(
            spec=job_spec(
                project, grant, task_count=1, array_size=2, command=wait_for_file(release)
            )
        ),
        metadata=jobs.md,
        timeout=10,
    )
    array_id = array.job.job_id
    after = await jobs.submit(["true"], array_id)

    async def recorded() -> scheduler_pb2.Job | None:
        job = await jobs.get(after)
        return job if job.pending_reason else None

    waiting = await wait_for(recorded, 30, "the job's pending reason", 0.1)
    elements = sorted(array.array_job_ids)
    assert list(waiting.spec.after_job_ids) == [array_id]
    assert waiting.pending_reason == scheduler_pb2.PENDING_REASON_DEPENDENCY
    assert waiting.state_message == f"waiting for 2 jobs to complete: {', '.join(elements)}"

    release.touch()
    await jobs.wait_state(after, scheduler_pb2.JOB_STATE_COMPLETED, "the job after the array")
    await jobs.channel.close()
