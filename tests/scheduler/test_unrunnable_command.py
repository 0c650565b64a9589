"""Jobs whose command fails: a program that cannot run fails once, and the output's end is shown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import scheduler_pb2
from scheduler.service.agent_feed import output_summary
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(180)

_TERMINAL = {
    scheduler_pb2.JOB_STATE_COMPLETED,
    scheduler_pb2.JOB_STATE_FAILED,
    scheduler_pb2.JOB_STATE_CANCELLED,
    scheduler_pb2.JOB_STATE_TIMED_OUT,
}


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


async def test_missing_program_fails_job_once(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, command=["/no/such/program", "--flag"])
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )
        job_id = submitted.job.job_id

        async def ended() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job if job.state in _TERMINAL else None

        job = await wait_for(ended, 60, "the job to end", 0.2)
    assert job.state == scheduler_pb2.JOB_STATE_FAILED
    assert job.attempt == 1
    assert "/no/such/program" in job.state_message
    assert "exit code 127" in job.state_message
    # The agent's reason is also the task's whole output, so it is not repeated.
    assert job.state_message.count("/no/such/program") == 1
    assert [p.exit_code for p in job.placements] == [127]


async def test_bad_interpreter_fails_job_once(stack: Stack, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("#!/no/such/interpreter\nprint('never')\n")
    script.chmod(0o755)
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, command=[str(script)])
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )
        job_id = submitted.job.job_id

        async def ended() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job if job.state in _TERMINAL else None

        job = await wait_for(ended, 60, "the job to end", 0.2)
    # Every node would fail the same way, so the job is not placed again.
    assert job.state == scheduler_pb2.JOB_STATE_FAILED
    assert job.attempt == 1
    expected = (
        f"cannot run {script}: bad interpreter /no/such/interpreter: No such file or directory"
    )
    assert expected in job.state_message
    assert "exit code 127" in job.state_message
    assert job.state_message.count(str(script)) == 1
    assert [p.exit_code for p in job.placements] == [127]


async def test_failed_job_shows_output_end(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    script = "echo loading; echo 'RuntimeError: CUDA out of memory' >&2; exit 3"
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, command=["sh", "-c", script])
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )
        job_id = submitted.job.job_id

        async def ended() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job if job.state in _TERMINAL else None

        job = await wait_for(ended, 60, "the job to end", 0.2)
    assert job.state == scheduler_pb2.JOB_STATE_FAILED
    assert "exit code 3" in job.state_message
    assert "output ends with: loading | RuntimeError: CUDA out of memory" in job.state_message
    # The agent's message repeats only the state, which the reason already names.
    assert job.state_message.count("exited") == 1, job.state_message


def test_output_summary_keeps_the_end() -> None:
    assert output_summary("a\n\n  b  \nc\nd\n") == "b | c | d"
    long = output_summary("x" * 1000 + "\nlast line\n")
    assert long.endswith("x | last line")
    assert len(long) == len("...") + 400
    assert output_summary("") == ""
