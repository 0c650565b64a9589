"""The submission batcher: one request-id lookup per batch, and a reused id fails only its call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from scheduler.service.inputs import Input, Submitted
from scheduler.service.model import Job, JobSpec, new_job_id
from scheduler.service.request_ids import request_key
from scheduler.service.store import JobStore
from scheduler.service.submitter import SubmissionBatcher
from services.runtime.errors import FailedPrecondition

OWNER = "alice"


def make_job(name: str) -> Job:
    spec = JobSpec(name=name, project_id="p1", command=("true",), grant_id="g1")
    return Job(job_id=new_job_id(), spec=spec, owner=OWNER)


class MemoryStore:
    """The two JobStore calls the batcher makes, kept in a dict and counted."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.lookups = 0
        self.inserts = 0

    async def jobs_by_request_ids(self, request_ids: Sequence[str]) -> dict[str, Job]:
        self.lookups += 1
        return {rid: self.jobs[rid] for rid in request_ids if rid in self.jobs}

    async def insert_jobs(
        self, jobs: Sequence[Job], request_ids: Sequence[str | None], epoch: int, cause: str
    ) -> dict[str, Job]:
        self.inserts += 1
        for job, rid in zip(jobs, request_ids, strict=True):
            if rid is not None:
                self.jobs.setdefault(rid, job)
        return {rid: self.jobs[rid] for rid in request_ids if rid is not None}


async def submit(batcher: SubmissionBatcher, job: Job, request_id: str) -> list[Job]:
    key = request_key(OWNER, request_id)
    return await batcher.submit([job], [key], [([job], key, "request_id")])


async def test_calls_share_one_lookup() -> None:
    store = MemoryStore()
    stored_job = make_job("first")
    store.jobs[cast(str, request_key(OWNER, "taken"))] = stored_job
    inbox: asyncio.Queue[Input] = asyncio.Queue()
    batcher = SubmissionBatcher(cast(JobStore, store), 1, inbox, linger_s=0.05)
    runner = asyncio.create_task(batcher.run())
    fresh = [make_job(f"fresh-{index}") for index in range(3)]
    try:
        results: list[Any] = await asyncio.wait_for(
            asyncio.gather(
                *(submit(batcher, job, f"r{index}") for index, job in enumerate(fresh)),
                submit(batcher, make_job("other"), "taken"),
                return_exceptions=True,
            ),
            timeout=10,
        )
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    assert store.lookups == 1
    assert store.inserts == 1
    assert results[:3] == [[job] for job in fresh]
    assert isinstance(results[3], FailedPrecondition)
    assert stored_job.job_id in str(results[3])
    queued = inbox.get_nowait()
    assert isinstance(queued, Submitted)
    assert queued.jobs == tuple(fresh)
