"""WatchJobs streams: what a watch of a job array's parent id sends, who may open one, and
how many one caller may have open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import scheduler_pb2
from scheduler.service.watch import TooManyWatches, WatchHub
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


async def test_array_parent_watch_streams_elements(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    stranger = metadata(stack.token("stranger", Role.RESEARCHER))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # No node is up, so every element waits until it is cancelled.
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, array_size=2)
            ),
            metadata=md,
            timeout=10,
        )
        parent_id = submitted.job.job_id
        stream = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=parent_id, send_initial=True),
            metadata=md,
            timeout=30,
        )
        initial = [await stream.read(), await stream.read()]
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=parent_id), metadata=md, timeout=10
        )
        cancelled: set[str] = set()
        while len(cancelled) < 2:
            change = await stream.read()
            assert change is not grpc.aio.EOF
            if change.state == scheduler_pb2.JOB_STATE_CANCELLED:
                cancelled.add(change.job_id)
        stream.cancel()
        denied = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=parent_id), metadata=stranger, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await denied.read()

    assert sorted(job.job_id for job in initial) == sorted(submitted.array_job_ids)
    assert {job.array_job_id for job in initial} == {parent_id}
    assert cancelled == set(submitted.array_job_ids)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_watches_limited_per_caller() -> None:
    hub = WatchHub(max_per_caller=2)
    first = hub.subscribe(subject="alice")
    hub.subscribe(subject="alice")
    with pytest.raises(TooManyWatches) as error:
        hub.subscribe(subject="alice")
    hub.subscribe(subject="bob")
    hub.unsubscribe(first)
    hub.subscribe(subject="alice")

    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'alice' already has 2 open WatchJobs streams" in error.value.message
