"""Jobs the engine cannot place: rejected at submission, failed alone when already stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from acsp.v1 import scheduler_pb2
from scheduler.service.jobbook import Effects
from scheduler.service.model import Job, JobSpec, new_job_id
from scheduler.service.store import JobStore
from services.runtime.auth import Role
from services.runtime.errors import field_violations

from .harness import Stack, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec
from .test_jobbook import NOW, make_book

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


def unknown_model_job() -> Job:
    spec = JobSpec(name="bad", project_id="proj", command=("true",), models=("NOPE",))
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=NOW)


def test_book_fails_rejected_job() -> None:
    book = make_book()
    job = unknown_model_job()
    book.add([job], NOW)
    fx = Effects(NOW + 1)
    book.settle_reloaded(fx)
    ended, cause = fx.changed[job.job_id]
    assert ended.state == "failed"
    assert "NOPE" in ended.reason
    assert cause == "engine:rejected"
    assert job.job_id not in book.jobs
    assert len(fx.events) == 1


async def test_submit_rejects_unknown_model(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    md = metadata(stack.token("alice", Role.RESEARCHER))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec=job_spec("proj-a", "", accelerators={"models": ["NOPE"]})
                ),
                metadata=md,
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as memory:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec=job_spec("proj-a", "", accelerators={"min_memory_gib": 4096})
                ),
                metadata=md,
                timeout=10,
            )
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = field_violations(caught.value)["spec.accelerators.models[0]"]
    assert "'NOPE'" in reason
    assert "A100-SXM4-80GB" in reason
    assert memory.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "192 GiB" in field_violations(memory.value)["spec.accelerators.min_memory_gib"]
    assert list(listed.jobs) == []


async def test_restart_fails_stored_unknown_model(stack: Stack) -> None:
    process, address = await stack.start_scheduler()
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        shard, epoch = await conn.fetchrow("SELECT shard, epoch FROM scheduler.leaders")
    finally:
        await conn.close()
    process.kill()
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2)
    try:
        # A scheduler without the submission check stored jobs like this one.
        job = unknown_model_job()
        await JobStore(pool, shard).insert_jobs([job], [None], epoch, "submit")
        restarted, address = await stack.start_scheduler("scheduler-2")

        async def failed() -> bool:
            stored = await JobStore(pool, shard).get_job(job.job_id)
            return stored is not None and stored.state == "failed"

        await wait_for(failed, 30, "the refused job to fail", 0.2)
        stored = await JobStore(pool, shard).get_job(job.job_id)
        assert stored is not None
        assert "NOPE" in stored.reason
        assert restarted.alive()
        await stack._leads(restarted, address)
    finally:
        await pool.close()


async def test_submit_rejects_fractional_gang_on_one_node(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    md = metadata(stack.token("alice", Role.RESEARCHER))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec=job_spec(
                        "proj-a",
                        "",
                        accelerator_millis_per_task=500,
                        topology=scheduler_pb2.TOPOLOGY_SAME_NODE,
                    )
                ),
                metadata=md,
                timeout=10,
            )
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = field_violations(caught.value)["spec.topology"]
    assert "same_node" in reason
    assert "same_region" in reason
    assert list(listed.jobs) == []
