"""Project members read their project's jobs, and only owners, PIs and the program office
cancel them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(180)

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


@dataclass
class Team:
    """Two projects and three pending jobs, with the callers' metadata.

    ``member_job`` (by the member) and ``pi_job`` (by the PI) run for ``project``, and
    ``other_job`` for ``other_project``, whose PI is neither caller.
    """

    project: str
    grant: str
    other_project: str
    pi: Metadata
    member: Metadata
    outsider: Metadata
    office: Metadata
    member_job: str
    pi_job: str
    other_job: str


async def add_member(stack: Stack, project: str, pi: str, member: str) -> None:
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        await grant_pb2_grpc.GrantServiceStub(channel).AddProjectMember(
            grant_pb2.AddProjectMemberRequest(
                request_id=uuid.uuid4().hex,
                project_id=project,
                member=grant_pb2.ProjectMember(subject=member, role=grant_pb2.PROJECT_ROLE_MEMBER),
            ),
            metadata=metadata(stack.token(pi, Role.PI)),
            timeout=10,
        )


async def submit(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub, md: Metadata, project: str, grant: str
) -> str:
    submitted = await scheduler.SubmitJob(
        scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
        metadata=md,
        timeout=10,
    )
    return submitted.job.job_id


async def form_team(stack: Stack, scheduler: scheduler_pb2_grpc.SchedulerServiceStub) -> Team:
    project, grant, pi = await fund_grant(stack)
    other_project, other_grant, other_pi = await fund_grant(stack)
    await add_member(stack, project, pi, "ana")
    pi_md = metadata(stack.token(pi, Role.PI))
    member_md = metadata(stack.token("ana", Role.RESEARCHER))
    return Team(
        project=project,
        grant=grant,
        other_project=other_project,
        pi=pi_md,
        member=member_md,
        outsider=metadata(stack.token("mallory", Role.RESEARCHER)),
        office=metadata(stack.token("office", Role.PROGRAM_OFFICE)),
        member_job=await submit(scheduler, member_md, project, grant),
        pi_job=await submit(scheduler, pi_md, project, grant),
        other_job=await submit(
            scheduler, metadata(stack.token(other_pi, Role.PI)), other_project, other_grant
        ),
    )


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def listed(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: Metadata,
    page_size: int = 0,
    **filters: object,
) -> list[str]:
    """Return the ids of every page of a ListJobs call with ``filters``."""
    ids: list[str] = []
    token = ""
    while True:
        response = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(
                page=common_pb2.PageRequest(page_size=page_size, page_token=token),
                **filters,  # type: ignore[arg-type]
            ),
            metadata=md,
            timeout=10,
        )
        ids += [job.job_id for job in response.jobs]
        token = response.page.next_page_token
        if not token:
            return ids


async def test_member_gets_project_jobs(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        team = await form_team(stack, scheduler)

        def get(job_id: str, md: Metadata) -> Awaitable[scheduler_pb2.Job]:
            return scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )

        by_member = await get(team.pi_job, team.member)
        by_pi = await get(team.member_job, team.pi)
        assert by_member.job_id == team.pi_job
        assert by_pi.job_id == team.member_job
        assert await status_of(get(team.member_job, team.outsider)) == grpc.StatusCode.NOT_FOUND
        assert await status_of(get(team.other_job, team.member)) == grpc.StatusCode.NOT_FOUND


async def test_member_lists_project_jobs(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        team = await form_team(stack, scheduler)
        both = {team.member_job, team.pi_job}
        paged = await listed(scheduler, team.member, page_size=1, project_id=team.project)
        assert sorted(paged) == sorted(both)
        pending = [scheduler_pb2.JOB_STATE_PENDING]
        by_state = await listed(scheduler, team.member, project_id=team.project, states=pending)
        assert set(by_state) == both
        running = [scheduler_pb2.JOB_STATE_RUNNING]
        assert await listed(scheduler, team.member, project_id=team.project, states=running) == []
        assert await listed(scheduler, team.member) == [team.member_job]
        everything = await listed(scheduler, team.office)
        assert set(everything) == {*both, team.other_job}

        foreign = listed(scheduler, team.member, project_id=team.other_project)
        assert await status_of(foreign) == grpc.StatusCode.NOT_FOUND
        outsider = listed(scheduler, team.outsider, project_id=team.project)
        assert await status_of(outsider) == grpc.StatusCode.NOT_FOUND
        unknown = listed(scheduler, team.member, project_id="no-such-project")
        assert await status_of(unknown) == grpc.StatusCode.NOT_FOUND
        by_office = await listed(scheduler, team.office, project_id=team.other_project)
        assert by_office == [team.other_job]
        too_long = listed(scheduler, team.member, project_id="p" * 300)
        assert await status_of(too_long) == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_limited_to_owner_pi_office(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        team = await form_team(stack, scheduler)

        def cancel(job_id: str, md: Metadata) -> Awaitable[scheduler_pb2.Job]:
            return scheduler.CancelJob(
                scheduler_pb2.CancelJobRequest(job_id=job_id), metadata=md, timeout=20
            )

        by_member = await status_of(cancel(team.pi_job, team.member))
        by_outsider = await status_of(cancel(team.member_job, team.outsider))
        by_foreign_pi = await status_of(cancel(team.other_job, team.pi))
        assert by_member == grpc.StatusCode.PERMISSION_DENIED
        assert by_outsider == grpc.StatusCode.NOT_FOUND
        assert by_foreign_pi == grpc.StatusCode.NOT_FOUND
        assert await status_of(cancel(team.member_job, team.pi)) == grpc.StatusCode.OK
        assert await status_of(cancel(team.other_job, team.office)) == grpc.StatusCode.OK
        survivor = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=team.pi_job), metadata=team.pi, timeout=10
        )
        assert survivor.state == scheduler_pb2.JOB_STATE_PENDING


async def test_member_watches_project_jobs(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        team = await form_team(stack, scheduler)
        stream = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(project_id=team.project, send_initial=True),
            metadata=team.member,
            timeout=60,
        )
        seen: set[str] = set()
        iterator = stream.__aiter__()
        while len(seen) < 2:
            seen.add((await asyncio.wait_for(iterator.__anext__(), 20)).job_id)
        assert seen == {team.member_job, team.pi_job}
        later = await submit(scheduler, team.pi, team.project, team.grant)
        while later not in seen:
            seen.add((await asyncio.wait_for(iterator.__anext__(), 20)).job_id)
        stream.cancel()
        assert seen == {team.member_job, team.pi_job, later}

        # Without a project the member watches only their own jobs, so the PI's next job is
        # skipped and the member's own next job is the first new one the stream sends.
        own = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(send_initial=True), metadata=team.member, timeout=60
        )
        own_changes = own.__aiter__()
        first_own = await asyncio.wait_for(own_changes.__anext__(), 20)
        skipped = await submit(scheduler, team.pi, team.project, team.grant)
        mine = await submit(scheduler, team.member, team.project, team.grant)
        change = first_own
        while change.job_id == team.member_job:
            change = await asyncio.wait_for(own_changes.__anext__(), 20)
        own.cancel()
        assert first_own.job_id == team.member_job
        assert change.job_id != skipped
        assert change.job_id == mine

        one_job = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=team.pi_job, send_initial=True),
            metadata=team.member,
            timeout=60,
        )
        first = await asyncio.wait_for(one_job.__aiter__().__anext__(), 20)
        one_job.cancel()
        assert first.job_id == team.pi_job

        for request, expected in [
            (
                scheduler_pb2.WatchJobsRequest(project_id=team.project, send_initial=True),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                scheduler_pb2.WatchJobsRequest(job_id=team.member_job),
                grpc.StatusCode.NOT_FOUND,
            ),
        ]:
            denied = scheduler.WatchJobs(request, metadata=team.outsider, timeout=20)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(denied.__aiter__().__anext__(), 20)
            assert raised.value.code() == expected


async def error_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def first_watched(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: Metadata,
    request: scheduler_pb2.WatchJobsRequest,
) -> scheduler_pb2.Job:
    stream = scheduler.WatchJobs(request, metadata=md, timeout=20)
    try:
        return await asyncio.wait_for(stream.__aiter__().__anext__(), 20)
    finally:
        stream.cancel()


async def test_hidden_ids_read_as_missing(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        team = await form_team(stack, scheduler)
        array = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(team.project, team.grant, task_count=1, array_size=2)
            ),
            metadata=team.pi,
            timeout=10,
        )
        hidden = {"project": team.project, "job": team.member_job, "array": array.job.job_id}
        missing = {"project": "no-such-project", "job": "no-such-job", "array": "no-such-array"}

        def calls(ids: dict[str, str]) -> dict[str, Callable[[], Awaitable[object]]]:
            md = team.outsider
            return {
                "GetJob job": lambda: scheduler.GetJob(
                    scheduler_pb2.GetJobRequest(job_id=ids["job"]), metadata=md, timeout=10
                ),
                "GetJob array": lambda: scheduler.GetJob(
                    scheduler_pb2.GetJobRequest(job_id=ids["array"]), metadata=md, timeout=10
                ),
                "ListJobs project": lambda: listed(scheduler, md, project_id=ids["project"]),
                "ListJobs array": lambda: listed(scheduler, md, array_job_id=ids["array"]),
                "CancelJob job": lambda: scheduler.CancelJob(
                    scheduler_pb2.CancelJobRequest(job_id=ids["job"]), metadata=md, timeout=10
                ),
                "CancelJob array": lambda: scheduler.CancelJob(
                    scheduler_pb2.CancelJobRequest(job_id=ids["array"]), metadata=md, timeout=10
                ),
                "WatchJobs project": lambda: first_watched(
                    scheduler, md, scheduler_pb2.WatchJobsRequest(project_id=ids["project"])
                ),
                "WatchJobs job": lambda: first_watched(
                    scheduler, md, scheduler_pb2.WatchJobsRequest(job_id=ids["job"])
                ),
                "WatchJobs array": lambda: first_watched(
                    scheduler, md, scheduler_pb2.WatchJobsRequest(job_id=ids["array"])
                ),
                "ReadTaskOutput job": lambda: scheduler.ReadTaskOutput(
                    scheduler_pb2.ReadTaskOutputRequest(job_id=ids["job"]), metadata=md, timeout=10
                ),
                "ReadTaskOutput array": lambda: scheduler.ReadTaskOutput(
                    scheduler_pb2.ReadTaskOutputRequest(job_id=ids["array"]),
                    metadata=md,
                    timeout=10,
                ),
                "SubmitJob project": lambda: scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(
                        spec=job_spec(ids["project"], team.grant, task_count=1)
                    ),
                    metadata=md,
                    timeout=10,
                ),
            }

        hidden_calls = calls(hidden)
        missing_calls = calls(missing)
        for name, call in hidden_calls.items():
            code, message = await error_of(call())
            missing_code, missing_message = await error_of(missing_calls[name]())
            assert code == grpc.StatusCode.NOT_FOUND, name
            assert missing_code == grpc.StatusCode.NOT_FOUND, name
            for kind, value in hidden.items():
                message = message.replace(value, missing[kind])
            assert message == missing_message, name

        # The program office reads and cancels every project's jobs and arrays.
        office_job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=team.member_job), metadata=team.office, timeout=10
        )
        office_array = await listed(scheduler, team.office, array_job_id=hidden["array"])
        office_watch = await first_watched(
            scheduler,
            team.office,
            scheduler_pb2.WatchJobsRequest(job_id=hidden["array"], send_initial=True),
        )
        cancelled = await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=hidden["array"]), metadata=team.office, timeout=20
        )
    assert office_job.job_id == team.member_job
    assert sorted(office_array) == sorted(array.array_job_ids)
    assert office_watch.job_id in array.array_job_ids
    assert cancelled.job_id == hidden["array"]
