"""Huge ids, environments, request ids and reasons get a short INVALID_ARGUMENT, never a
metadata overflow or a failed insert."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role
from services.runtime.errors import MAX_ID_LENGTH, field_violations

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


async def test_long_values_get_short_errors(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    md = metadata(stack.token("pi-long", Role.PI, institution="inst-long"))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as huge:
            await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id="a" * 20_000), metadata=md, timeout=10
            )
        assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "job_id" in (huge.value.details() or "")
        assert "20000 characters" in (huge.value.details() or "")

        longest = "b" * MAX_ID_LENGTH
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=longest), metadata=md, timeout=10
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        text = missing.value.details() or ""
        assert f"({MAX_ID_LENGTH} characters)" in text
        assert longest not in text

        env = {f"K{i}": "x" * 120_000 for i in range(10)}
        spec = job_spec("proj-long", "g-long", environment=env)
        with pytest.raises(grpc.aio.AioRpcError) as large:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
            )
        assert large.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(large.value)
        assert "spec.environment['K0']" in violations
        assert "spec.environment" in violations
        assert "at most 131072" in violations["spec.environment"]
        assert len(large.value.details() or "") < 2000


async def test_invalid_value_in_reason_is_cut(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    md = metadata(stack.token("pi-long", Role.PI, institution="inst-long"))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec("p" * 20_000, "g-long", priority_class=0)
        spec.accelerators.models.extend(["m/" * 10_000] * 30)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
            )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = bad.value.details() or ""
    assert "spec.project_id" in text
    assert "(20000 characters)" in text
    violations = field_violations(bad.value)
    assert violations["spec.project_id"].endswith("is not a valid project id")
    assert len(violations) == 10


async def test_long_request_ids_and_reasons_rejected(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    # Random hex does not compress, so a stored key this long would overflow its index row.
    long_id = os.urandom(3000).hex()
    channel, scheduler = scheduler_stub(address)
    async with channel:
        innocent = scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=1))
        bad_id = scheduler_pb2.SubmitJobRequest(
            request_id=long_id, spec=job_spec(project, grant, task_count=1)
        )
        results = await asyncio.gather(
            scheduler.SubmitJob(bad_id, metadata=md, timeout=10),
            scheduler.SubmitJob(innocent, metadata=md, timeout=10),
            return_exceptions=True,
        )
        submitted = results[1]
        assert isinstance(submitted, scheduler_pb2.SubmitJobResponse)
        job_id = submitted.job.job_id
        calls = {
            "jobs[0].request_id": scheduler.SubmitJobs(
                scheduler_pb2.SubmitJobsRequest(jobs=[bad_id]), metadata=md, timeout=10
            ),
            "reason": scheduler.CancelJob(
                scheduler_pb2.CancelJobRequest(job_id=job_id, reason="r" * 5000),
                metadata=md,
                timeout=10,
            ),
            "request_id": scheduler.RegisterProvider(
                scheduler_pb2.RegisterProviderRequest(
                    request_id=long_id,
                    provider=scheduler_pb2.Provider(provider_id="prov", display_name="P"),
                ),
                metadata=office,
                timeout=10,
            ),
            "recall.reason": scheduler.RecallCapacity(
                scheduler_pb2.RecallCapacityRequest(
                    recall=scheduler_pb2.Recall(pledge_id="pl-1", count=1, reason="r" * 5000)
                ),
                metadata=office,
                timeout=10,
            ),
        }
        errors = {}
        for field, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            errors[field] = error.value
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )

    assert isinstance(results[0], grpc.aio.AioRpcError)
    assert results[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid request_id: is 6000 characters long" in (results[0].details() or "")
    for field, error in errors.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (error.details() or "").startswith(f"invalid {field}: is "), field
    assert job.state == scheduler_pb2.JOB_STATE_PENDING
