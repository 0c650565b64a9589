"""A job whose task succeeds while its agent is down ends completed, and does not run again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import scheduler_pb2
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
        await stack.start_metering()
        yield stack
    finally:
        await stack.close()


async def test_task_done_while_node_lost(stack: Stack, tmp_path: Path) -> None:
    _, address = await stack.start_scheduler()
    agents = stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    runs = tmp_path / "runs.txt"
    done = tmp_path / "done.txt"
    # The task outlives the agent, ends while the node is unknown, and records each run.
    command = ["/bin/sh", "-c", f"echo run >> {runs}; sleep 4; echo done >> {done}"]
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, command=command)
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )
        job_id = submitted.job.job_id

        async def get() -> scheduler_pb2.Job:
            return await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )

        async def running() -> bool:
            return (await get()).state == scheduler_pb2.JOB_STATE_RUNNING

        async def requeued() -> bool:
            job = await get()
            return job.state == scheduler_pb2.JOB_STATE_PENDING and job.attempt == 2

        async def ended() -> scheduler_pb2.Job | None:
            job = await get()
            return job if job.HasField("end_time") else None

        await wait_for(running, 60, "the job to run", 0.2)
        agents.kill()
        await wait_for(requeued, 30, "the lost node's job to be requeued", 0.2)
        await wait_for(done.exists, 30, "the task to finish while its agent is down", 0.2)
        stack.start_agents(nodes=1)
        job = await wait_for(ended, 60, "the job to end", 0.2)
    assert job.state == scheduler_pb2.JOB_STATE_COMPLETED
    assert "exited with code 0" in job.state_message
    assert runs.read_text().splitlines() == ["run"]
