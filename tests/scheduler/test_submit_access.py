"""SubmitJob checks project membership and grant ownership with the grant service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest
from nats.aio.msg import Msg

from acsp import subjects
from acsp.v1 import events_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub
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


async def test_submit_checks_membership_and_grant(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    other_project, other_grant, _ = await fund_grant(stack)
    outsider = metadata(stack.token("mallory", Role.RESEARCHER))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    owner = metadata(stack.token(pi, Role.PI))
    denied = {
        "non-member": (outsider, job_spec(project, grant, task_count=1)),
        "unknown project": (owner, job_spec("no-such-project", "", task_count=1)),
        "unknown grant": (owner, job_spec(project, "no-such-grant", task_count=1)),
        "grant of another project": (owner, job_spec(project, other_grant, task_count=1)),
    }
    expected = {
        "non-member": grpc.StatusCode.NOT_FOUND,
        "unknown project": grpc.StatusCode.NOT_FOUND,
        "unknown grant": grpc.StatusCode.NOT_FOUND,
        "grant of another project": grpc.StatusCode.NOT_FOUND,
    }
    channel, scheduler = scheduler_stub(address)
    async with channel:
        for case, (md, spec) in denied.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
                )
            assert caught.value.code() == expected[case], case
        written = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(), metadata=office, timeout=10
        )
        assert list(written.jobs) == []
        by_pi = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
            metadata=owner,
            timeout=10,
        )
        by_office = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=job_spec(other_project, other_grant, task_count=1)),
            metadata=office,
            timeout=10,
        )
    assert by_pi.job.job_id
    assert by_office.job.job_id


async def test_job_institution_from_project(stack: Stack) -> None:
    """A job's institution is its project's, not the submitter token's (which may be empty)."""
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    institution = "inst-" + project.removeprefix("proj-")
    admitted: asyncio.Queue[events_pb2.JobEvent] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        event = events_pb2.JobEvent()
        event.ParseFromString(msg.data)
        await admitted.put(event)

    client = await nats.connect(stack.nats_url)
    try:
        await client.subscribe(subjects.job_event_subject("admitted"), cb=collect)
        await client.flush(timeout=5)
        tokens = {
            "PI without institution": metadata(stack.token(pi, Role.PI)),
            "PI of another institution": metadata(stack.token(pi, Role.PI, institution="uni-x")),
        }
        channel, scheduler = scheduler_stub(address)
        async with channel:
            for case, md in tokens.items():
                reply = await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1)),
                    metadata=md,
                    timeout=10,
                )
                event = await asyncio.wait_for(admitted.get(), timeout=30)
                assert reply.job.institution_id == institution, case
                assert event.job_id == reply.job.job_id, case
                assert event.institution_id == institution, case
    finally:
        await client.close()
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        stored = await conn.fetch("SELECT DISTINCT institution FROM scheduler.jobs")
    finally:
        await conn.close()
    assert [row["institution"] for row in stored] == [institution]


async def test_list_unknown_array_not_found(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    owner = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, array_size=2)
            ),
            metadata=owner,
            timeout=10,
        )
        array_id = submitted.job.job_id
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(array_job_id=array_id), metadata=owner, timeout=10
        )
        none_running = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(
                array_job_id=array_id, states=[scheduler_pb2.JOB_STATE_RUNNING]
            ),
            metadata=owner,
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.ListJobs(
                scheduler_pb2.ListJobsRequest(array_job_id="jnope"), metadata=owner, timeout=10
            )
    assert len(listed.jobs) == 2
    assert list(none_running.jobs) == []
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'jnope'" in (caught.value.details() or "")
