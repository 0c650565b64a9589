"""ReadTaskOutput and ``acsp jobs logs`` against a real scheduler, NATS and simulated agents.

Tasks of a simulated agent that name a command run it as a process whose output goes to the
task's log in the agent's state folder. The scheduler reads that log's end from the agent.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp._channel import Credentials
from acsp.cli import job_logs
from acsp.cli.main import main
from acsp.client import Client
from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(240)

PRINTER = [
    "sh",
    "-c",
    'echo "out of $ACSP_TASK_ID"; echo "err of $ACSP_TASK_ID" >&2',
]
OUTPUT_TIMEOUT_S = "1"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


async def submit(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: tuple[tuple[str, str], ...],
    spec: scheduler_pb2.JobSpec,
) -> str:
    response = await scheduler.SubmitJob(
        scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
    )
    return response.job.job_id


async def wait_state(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: tuple[tuple[str, str], ...],
    job_id: str,
    state: int,
) -> None:
    async def reached() -> bool:
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
        return job.state == state

    await wait_for(reached, 90, f"job {job_id} to reach state {state}", 0.2)


async def read_error(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: tuple[tuple[str, str], ...],
    request: scheduler_pb2.ReadTaskOutputRequest,
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.ReadTaskOutput(request, metadata=md, timeout=10)
    return caught.value


def use_scheduler(monkeypatch: pytest.MonkeyPatch, address: str, token: str) -> None:
    """Point ``acsp jobs logs`` at ``address`` over plaintext, with ``token``."""

    def client(args: object) -> Client:
        endpoints = {"grant": address, "scheduler": address, "metering": address}
        return Client(endpoints, Credentials(token=token), wait_for_ready=False)

    monkeypatch.setattr(job_logs, "client_from_args", client)


async def test_output_read_back_through_rpc(stack: Stack) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    stranger = metadata(stack.token("stranger", Role.RESEARCHER, institution="elsewhere"))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_id = await submit(scheduler, md, job_spec(project, grant, command=PRINTER))
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_COMPLETED)

        response = await scheduler.ReadTaskOutput(
            scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=1),
            metadata=md,
            timeout=10,
        )
        assert sorted(response.output.splitlines()) == [
            f"err of {job_id}/1/1".encode(),
            f"out of {job_id}/1/1".encode(),
        ]
        assert not response.truncated
        assert (response.provider_id, response.region_id, response.node_id) == (
            "prov",
            "reg",
            "n0",
        )
        assert response.attempt == 1

        cut = await scheduler.ReadTaskOutput(
            scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=1, max_bytes=4),
            metadata=md,
            timeout=10,
        )
        assert cut.output == response.output[-4:]
        assert cut.truncated

        # Someone who may not read the job learns nothing about it, as with GetJob.
        hidden = await read_error(
            scheduler, stranger, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id)
        )
        assert hidden.code() == grpc.StatusCode.NOT_FOUND

        missing_task = await read_error(
            scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=2)
        )
        assert missing_task.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid task_index: is 2" in (missing_task.details() or "")
        assert "has only tasks 0 to 1" in (missing_task.details() or "")

        too_much = await read_error(
            scheduler,
            md,
            scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, max_bytes=(1 << 20) + 1),
        )
        assert too_much.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_bytes" in (too_much.details() or "")

        unknown = await read_error(
            scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id="j-no-such-job")
        )
        assert unknown.code() == grpc.StatusCode.NOT_FOUND


async def test_output_of_running_task(stack: Stack) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        command = ["sh", "-c", "echo warming up; sleep 120"]
        spec = job_spec(project, grant, task_count=1, command=command)
        job_id = await submit(scheduler, md, spec)
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_RUNNING)
        request = scheduler_pb2.ReadTaskOutputRequest(job_id=job_id)

        async def printed() -> bytes:
            response = await scheduler.ReadTaskOutput(request, metadata=md, timeout=10)
            return response.output

        assert await wait_for(printed, 30, "the running task's output", 0.2) == b"warming up\n"
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=job_id), metadata=md, timeout=10
        )


async def test_played_task_has_no_output(stack: Stack) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, simulated_run_seconds=0.5)
        job_id = await submit(scheduler, md, spec)
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_COMPLETED)
        error = await read_error(scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "task_index" in details
    assert "sets simulated_run_seconds, so a simulated agent played it" in details
    assert "prov/reg/n0" in details


async def test_unrunnable_command_has_no_output(stack: Stack) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=1, command=["/nonexistent/prog"])
        job_id = await submit(scheduler, md, spec)
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_FAILED)
        error = await read_error(scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "no log of task" in details
    assert "prov/reg/n0" in details
    assert "prov.reg.n0" not in details
    assert "simulated_run_seconds" not in details
    assert "/nonexistent/prog" in details


async def test_task_of_job_cancelled_while_pending(stack: Stack) -> None:
    # No agent runs, so the job waits for capacity until it is cancelled.
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_id = await submit(scheduler, md, job_spec(project, grant))
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=job_id, reason="not needed"),
            metadata=md,
            timeout=10,
        )
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_CANCELLED)
        error = await read_error(
            scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=1)
        )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert f"task 1 of job {job_id} never started, so it has no output" in details
    assert "ACSP_SCHEDULER_OUTBOX_RETENTION_S" not in details


async def test_task_never_started_fails_precondition(stack: Stack) -> None:
    # No agent runs, so the job waits for capacity.
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_id = await submit(scheduler, md, job_spec(project, grant))
        error = await read_error(
            scheduler, md, scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=1)
        )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "has not started on any node" in details
    assert "read its output once the job runs" in details


async def test_silent_agent_is_unavailable(stack: Stack) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    agents = stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_id = await submit(scheduler, md, job_spec(project, grant, task_count=1))
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_COMPLETED)
        request = scheduler_pb2.ReadTaskOutputRequest(job_id=job_id)

        # A paused agent stays connected, so the request waits for the timeout.
        os.killpg(agents.popen.pid, signal.SIGSTOP)
        try:
            paused = await read_error(scheduler, md, request)
        finally:
            os.killpg(agents.popen.pid, signal.SIGCONT)
        assert paused.code() == grpc.StatusCode.UNAVAILABLE
        assert f"did not reply within {OUTPUT_TIMEOUT_S} s" in (paused.details() or "")

        # A stopped agent has no subscription left, so NATS replies "no responders" at once.
        agents.kill()
        stopped = await read_error(scheduler, md, request)
        assert stopped.code() == grpc.StatusCode.UNAVAILABLE
        assert "no agent of node prov/reg/n0 is connected" in (stopped.details() or "")


async def test_logs_command_prints_raw_output(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    md = metadata(token)
    use_scheduler(monkeypatch, address, token)
    command = ["sh", "-c", r"printf 'caf\303\251\n\001\002 no newline'"]
    channel, scheduler = scheduler_stub(address)
    async with channel:
        job_id = await submit(
            scheduler, md, job_spec(project, grant, task_count=1, command=command)
        )
        await wait_state(scheduler, md, job_id, scheduler_pb2.JOB_STATE_COMPLETED)
    capfdbinary.readouterr()

    assert main(["jobs", "logs", job_id]) == 0
    whole = capfdbinary.readouterr()
    assert whole.out == b"caf\xc3\xa9\n\x01\x02 no newline"
    assert whole.err == b""

    assert main(["jobs", "logs", job_id, "--task", "0", "--bytes", "10"]) == 0
    cut = capfdbinary.readouterr()
    assert cut.out == b"no newline"
    assert b"note: output cut" in cut.err
    assert b"prov/reg/n0" in cut.err

    assert main(["jobs", "logs", job_id, "--task", "3"]) == 2
    missing = capfdbinary.readouterr().err
    assert b"INVALID_ARGUMENT" in missing
    assert f"job {job_id} has only task 0; pass task_index 0".encode() in missing
    assert b"task_index is set by --task" in missing


async def test_logs_command_notes_on_stderr(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    md = metadata(token)
    use_scheduler(monkeypatch, address, token)
    # More than the 1 MiB that one NATS message may carry by default.
    large = ["sh", "-c", "head -c 1200000 /dev/zero"]
    channel, scheduler = scheduler_stub(address)
    async with channel:
        silent_id = await submit(scheduler, md, job_spec(project, grant, task_count=1))
        await wait_state(scheduler, md, silent_id, scheduler_pb2.JOB_STATE_COMPLETED)
        large_id = await submit(
            scheduler, md, job_spec(project, grant, task_count=1, command=large)
        )
        await wait_state(scheduler, md, large_id, scheduler_pb2.JOB_STATE_COMPLETED)
    capfdbinary.readouterr()

    assert main(["jobs", "logs", silent_id]) == 0
    silent = capfdbinary.readouterr()
    assert silent.out == b""
    assert silent.err == f"note: task 0 of job {silent_id} wrote no output\n".encode()

    assert main(["jobs", "logs", large_id, "--bytes", str(job_logs.MAX_BYTES)]) == 0
    cut = capfdbinary.readouterr()
    assert 0 < len(cut.out) < job_logs.MAX_BYTES
    assert b"note: output cut" in cut.err
    assert b"NATS max payload" in cut.err
    assert b"pass --bytes" not in cut.err


async def test_logs_command_gives_next_step(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # No agent runs, so every job stays pending.
    _, address = await stack.start_scheduler(ACSP_SCHEDULER_OUTPUT_TIMEOUT_S=OUTPUT_TIMEOUT_S)
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)
    md = metadata(token)
    use_scheduler(monkeypatch, address, token)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        pending_id = await submit(scheduler, md, job_spec(project, grant, task_count=1))
        array_id = await submit(scheduler, md, job_spec(project, grant, task_count=1, array_size=2))
    capfdbinary.readouterr()

    assert main(["jobs", "logs", pending_id]) == 1
    pending = capfdbinary.readouterr().err
    assert b"has not started on any node" in pending
    assert f"hint: acsp jobs watch {pending_id}".encode() in pending
    # Another --task would not help, so the error does not point at it.
    assert b"set by --task" not in pending

    assert main(["jobs", "logs", array_id]) == 2
    array = capfdbinary.readouterr().err
    assert b"is a job array" in array
    assert f"hint: acsp jobs list --array {array_id}".encode() in array
