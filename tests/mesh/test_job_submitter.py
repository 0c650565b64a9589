"""The SDK's JobSubmitter against an in-process scheduler stub: batching and per-job errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from acsp.submitter import JobSubmitter
from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc


class RecordingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Creates a job named after each spec; a spec named "bad" is invalid."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.single_calls = 0
        self.request_ids: list[str] = []

    async def SubmitJobs(
        self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobsResponse:
        self.batches.append(len(request.jobs))
        for index, item in enumerate(request.jobs):
            if item.spec.name == "bad":
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"jobs[{index}].spec.name: is bad"
                )
        self.request_ids.extend(item.request_id for item in request.jobs)
        return scheduler_pb2.SubmitJobsResponse(results=[_created(item) for item in request.jobs])

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        self.single_calls += 1
        if request.spec.name == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.name: is bad")
        return _created(request)


def _created(request: scheduler_pb2.SubmitJobRequest) -> scheduler_pb2.SubmitJobResponse:
    return scheduler_pb2.SubmitJobResponse(job=scheduler_pb2.Job(job_id=f"j-{request.spec.name}"))


def _request(name: str) -> scheduler_pb2.SubmitJobRequest:
    return scheduler_pb2.SubmitJobRequest(spec=scheduler_pb2.JobSpec(name=name))


Stubbed = tuple[RecordingScheduler, scheduler_pb2_grpc.SchedulerServiceStub]


@pytest.fixture
async def scheduler() -> AsyncIterator[Stubbed]:
    servicer = RecordingScheduler()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def test_concurrent_submits_share_calls(scheduler: Stubbed) -> None:
    servicer, stub = scheduler
    submitter = JobSubmitter(stub, max_batch=40, max_in_flight=2)
    names = [f"n{i}" for i in range(100)]

    responses = await asyncio.gather(*(submitter.submit(_request(name)) for name in names))
    await submitter.close()

    assert [r.job.job_id for r in responses] == [f"j-{name}" for name in names]
    assert sum(servicer.batches) == 100
    assert max(servicer.batches) <= 40
    assert len(servicer.batches) < 10
    assert servicer.single_calls == 0


async def test_missing_request_ids_are_filled(scheduler: Stubbed) -> None:
    servicer, stub = scheduler
    submitter = JobSubmitter(stub)

    await asyncio.gather(submitter.submit(_request("a")), submitter.submit(_request("b")))
    await submitter.close()

    assert len(servicer.request_ids) == 2
    assert all(servicer.request_ids)
    assert servicer.request_ids[0] != servicer.request_ids[1]


async def test_invalid_job_fails_alone(scheduler: Stubbed) -> None:
    servicer, stub = scheduler
    submitter = JobSubmitter(stub, linger_s=0.05)

    results = await asyncio.gather(
        submitter.submit(_request("good")),
        submitter.submit(_request("bad")),
        submitter.submit(_request("other")),
        return_exceptions=True,
    )
    await submitter.close()

    good, bad, other = results
    assert isinstance(good, scheduler_pb2.SubmitJobResponse)
    assert good.job.job_id == "j-good"
    assert isinstance(other, scheduler_pb2.SubmitJobResponse)
    assert other.job.job_id == "j-other"
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.batches == [3]
    assert servicer.single_calls == 3


async def test_submit_after_close_raises(scheduler: Stubbed) -> None:
    _, stub = scheduler
    submitter = JobSubmitter(stub)
    await submitter.submit(_request("a"))
    await submitter.close()

    with pytest.raises(RuntimeError, match="closed"):
        await submitter.submit(_request("b"))


async def test_rejects_bad_settings(scheduler: Stubbed) -> None:
    _, stub = scheduler
    with pytest.raises(ValueError, match="max_batch"):
        JobSubmitter(stub, max_batch=0)
    with pytest.raises(ValueError, match="linger_s"):
        JobSubmitter(stub, linger_s=-1)


class StallingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Delays every SubmitJobs response by 60 s."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def SubmitJobs(
        self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobsResponse:
        self.called.set()
        await asyncio.sleep(60)
        return scheduler_pb2.SubmitJobsResponse()


async def test_closed_channel_ends_waiting_submit() -> None:
    servicer = StallingScheduler()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        submitter = JobSubmitter(scheduler_pb2_grpc.SchedulerServiceStub(channel))
        waiting = asyncio.create_task(submitter.submit(_request("a")))
        await asyncio.wait_for(servicer.called.wait(), timeout=10)

        # Closing the channel cancels the call in flight, as it would a direct SubmitJob.
        await channel.close()
        finished, _ = await asyncio.wait([waiting], timeout=10)
        await asyncio.wait_for(submitter.close(), timeout=10)
    finally:
        await server.stop(None)

    assert finished == {waiting}
    assert waiting.cancelled()


async def test_large_specs_split_into_fitting_calls(scheduler: Stubbed) -> None:
    servicer, stub = scheduler
    submitter = JobSubmitter(stub, linger_s=0.05)
    # Twelve specs of 400 KB each exceed gRPC's default 4 MiB message limit together.
    requests = [_request(f"n{i}") for i in range(12)]
    for request in requests:
        request.spec.command.append("x" * 400_000)

    results = await asyncio.gather(
        *(submitter.submit(request) for request in requests), return_exceptions=True
    )
    await submitter.close()

    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert sum(servicer.batches) == 12
    assert len(servicer.batches) > 1
    assert servicer.single_calls == 0
