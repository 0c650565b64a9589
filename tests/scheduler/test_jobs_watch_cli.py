"""``acsp jobs watch`` against a real scheduler, grant service, NATS and simulated agents."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from acsp._channel import Credentials
from acsp.cli import jobs as jobs_cli
from acsp.cli._common import format_time
from acsp.cli.main import main
from acsp.client import AsyncClient
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
        yield stack
    finally:
        await stack.close()


def use_scheduler(monkeypatch: pytest.MonkeyPatch, address: str, token: str) -> None:
    """Point the CLI's asyncio client at ``address`` over plaintext, with ``token``."""

    def client(args: object) -> AsyncClient:
        endpoints = {"grant": address, "scheduler": address, "metering": address}
        return AsyncClient(endpoints, Credentials(token=token), wait_for_ready=False)

    monkeypatch.setattr(jobs_cli, "async_client_from_args", client)


async def submit(address: str, token: str, spec: scheduler_pb2.JobSpec) -> str:
    channel, scheduler = scheduler_stub(address)
    async with channel:
        response = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=metadata(token), timeout=10
        )
    return response.job.job_id


async def get_job(address: str, token: str, job_id: str) -> scheduler_pb2.Job:
    channel, scheduler = scheduler_stub(address)
    async with channel:
        return await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=metadata(token), timeout=10
        )


async def watch(capsys: pytest.CaptureFixture[str], job_id: str) -> tuple[int, list[str]]:
    """Run ``acsp jobs watch JOB_ID`` to its end; return its exit status and output lines."""
    code, lines, _ = await watch_with_errors(capsys, job_id)
    return code, lines


async def watch_with_errors(
    capsys: pytest.CaptureFixture[str], job_id: str
) -> tuple[int, list[str], str]:
    """Run ``acsp jobs watch JOB_ID`` to its end; return its exit status, lines and stderr."""
    code = await asyncio.wait_for(asyncio.to_thread(main, ["jobs", "watch", job_id]), 90)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


async def test_watch_exit_status_follows_outcome(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)

    passing = await submit(address, token, job_spec(project, grant, task_count=1))
    code, lines = await watch(capsys, passing)
    assert code == 0
    assert "completed" in lines[-1]
    changes = [line.split("  ", 1)[1] for line in lines]
    assert all(a != b for a, b in itertools.pairwise(changes))
    for line in lines:
        stamp = datetime.fromisoformat(line.split("  ", 1)[0])
        assert stamp.utcoffset() == timedelta(0)

    failing = await submit(
        address, token, job_spec(project, grant, task_count=1, command=["sh", "-c", "exit 3"])
    )
    code, lines = await watch(capsys, failing)
    assert code == 1
    assert "failed" in lines[-1]
    assert "exit code 3" in lines[-1]


async def test_watch_counts_stopped_task_as_started(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)
    spec = job_spec(project, grant, task_count=1, command=["sleep", "120"])
    job_id = await submit(address, token, spec)
    watching = asyncio.create_task(watch(capsys, job_id))
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def running() -> bool:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=metadata(token), timeout=10
            )
            return job.state == scheduler_pb2.JOB_STATE_RUNNING

        await wait_for(running, 60, "the job to run", 0.2)
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=job_id, reason="not needed"),
            metadata=metadata(token),
            timeout=10,
        )
    code, lines = await watching

    assert code == 1
    assert "cancelled" in lines[-1]
    assert "1/1 tasks started" in lines[-1]


async def test_watch_prints_time_scheduler_recorded(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)
    job_id = await submit(address, token, job_spec(project, grant, task_count=1))

    code, lines = await watch(capsys, job_id)

    assert code == 0
    job = await get_job(address, token, job_id)
    assert job.HasField("update_time")
    assert job.update_time == job.end_time
    assert lines[-1].split("  ", 1)[0] == format_time(job.end_time)

    # Watched again seconds later, the ended job shows when it ended, not when it arrived.
    ended = job.end_time.ToDatetime(tzinfo=UTC).timestamp()
    await wait_for(lambda: time.time() >= ended + 2, 10, "two seconds after the end")
    code, lines = await watch(capsys, job_id)

    assert code == 0
    assert len(lines) == 1
    assert lines[0].split("  ", 1)[0] == format_time(job.end_time)


async def test_watch_of_array_waits_for_last_element(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)
    # Each element takes the node's 8 accelerators, so the second starts after the first ends.
    spec = job_spec(
        project,
        grant,
        task_count=1,
        accelerator_millis_per_task=8000,
        array_size=2,
        command=["sleep", "1"],
    )
    array_id = await submit(address, token, spec)

    code, lines = await watch(capsys, array_id)
    parent = await get_job(address, token, array_id)

    assert code == 0
    assert parent.state == scheduler_pb2.JOB_STATE_COMPLETED
    assert sum("completed" in line for line in lines[:-1]) == 2
    assert lines[-1].endswith("array of 2 jobs: 2 completed")


async def test_watch_of_ended_array_counts_outcomes(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)
    # Element 1 fails, element 0 completes.
    spec = job_spec(
        project, grant, task_count=1, array_size=2, command=["sh", "-c", "exit $ACSP_ARRAY_INDEX"]
    )
    array_id = await submit(address, token, spec)

    async def ended() -> bool:
        parent = await get_job(address, token, array_id)
        return parent.state in jobs_cli.ENDED_STATES

    await wait_for(ended, 60, "the array to end")
    code, lines = await watch(capsys, array_id)

    assert code == 1
    assert lines[-1].endswith("array of 2 jobs: 1 failed, 1 completed")
    # Every element's final state comes before the array's line, once each.
    element_lines = [line.split("  ")[1:3] for line in lines[:-1]]
    assert element_lines == [[f"{array_id}-0", "completed"], [f"{array_id}-1", "failed"]]


async def test_watch_resumes_after_scheduler_restart(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    use_scheduler(monkeypatch, address, token)
    # Room for the restart and the new leader's election, at short intervals.
    monkeypatch.setattr(jobs_cli, "WATCH_RESUMES", 60)
    monkeypatch.setattr(jobs_cli, "WATCH_RESUME_MAX_DELAY_S", 1.0)
    printed = threading.Event()
    print_change = jobs_cli._print_change

    def print_and_signal(job: scheduler_pb2.Job, last_lines: dict[str, str]) -> bool:
        ended = print_change(job, last_lines)
        printed.set()
        return ended

    monkeypatch.setattr(jobs_cli, "_print_change", print_and_signal)
    # No node is up yet, so the job waits while the scheduler restarts.
    job_id = await submit(address, token, job_spec(project, grant, task_count=1))
    watching = asyncio.create_task(watch_with_errors(capsys, job_id))
    await wait_for(printed.is_set, 60, "the watch's first line")

    first.kill()
    await stack.start_scheduler(name="scheduler-again", ACSP_GRPC_LISTEN=address)
    stack.start_agents(nodes=1)
    code, lines, errors = await watching

    assert code == 0
    assert "pending" in lines[0]
    assert "completed" in lines[-1]
    assert "watch interrupted" in errors


def test_change_time_without_update_time_is_receive_time() -> None:
    job = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_RUNNING)
    before = datetime.now(UTC).replace(microsecond=0)

    stamp = datetime.fromisoformat(jobs_cli.change_time(job))

    assert before <= stamp <= datetime.now(UTC)
    job.update_time.FromSeconds(1_700_000_000)
    assert jobs_cli.change_time(job) == "2023-11-14T22:13:20+00:00"
