"""The scheduler end to end: real grant service, NATS, simulated agents and scheduler processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import grant_pb2, grant_pb2_grpc, scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for

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


def job_spec(project: str, grant: str, **fields: object) -> scheduler_pb2.JobSpec:
    values: dict[str, object] = {
        "name": "e2e",
        "project_id": project,
        "grant_id": grant,
        "task_count": 2,
        "accelerator_millis_per_task": 1000,
        "gang": True,
        "wall_time_seconds": 600,
        "command": ["true"],
    }
    values.update(fields)
    return scheduler_pb2.JobSpec(**values)  # type: ignore[arg-type]


async def test_job_runs_to_completion_with_hold(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(request_id="e2e-1", spec=job_spec(project, grant)),
            metadata=md,
            timeout=10,
        )
        job_id = submitted.job.job_id

        async def state() -> int:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job.state if job.state == scheduler_pb2.JOB_STATE_COMPLETED else 0

        await wait_for(state, 60, "the job to complete", 0.2)
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
    assert job.hold_id != ""
    assert len(job.placements) == 2
    assert all(p.state == "exited" for p in job.placements)
    assert job.HasField("start_time")
    async with grpc.aio.insecure_channel(stack.grant_address) as grant_channel:
        grants = grant_pb2_grpc.GrantServiceStub(grant_channel)
        office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
        entries = await grants.ListLedgerEntries(
            grant_pb2.ListLedgerEntriesRequest(grant_id=grant), metadata=office, timeout=10
        )
    holds = [e for e in entries.entries if e.job_id == job_id]
    assert holds, "the grant's ledger has no entry for the job's hold"
