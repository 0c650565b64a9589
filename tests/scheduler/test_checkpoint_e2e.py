"""Requeued jobs resume from the checkpoint their task reported, after a node failure or a
preemption."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import common_pb2, scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(180)

# Records the reference each attempt starts from in <results>/<attempt>.ref. The first attempt
# then writes two checkpoints, each by a rename as agents/checkpoints.py recommends, and runs
# until killed. Later attempts exit 0.
TASK = """
import os, pathlib, sys, time
results = pathlib.Path(sys.argv[1])
attempt = os.environ["ACSP_TASK_ID"].split("/")[1]
(results / f"{attempt}.ref").write_text(os.environ.get("ACSP_CHECKPOINT_REF", ""))
if attempt != "1":
    sys.exit(0)
(results / "pid").write_text(str(os.getpid()))
target = pathlib.Path(os.environ["ACSP_CHECKPOINT_FILE"])
for step in ("ckpt-1", "ckpt-2"):
    temporary = target.with_suffix(".tmp")
    temporary.write_text(step)
    temporary.rename(target)
    time.sleep(0.5)
time.sleep(60)
"""


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


async def test_requeue_resumes_from_checkpoint(stack: Stack, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _, address = await stack.start_scheduler()
    first = stack.start_agents(nodes=1, name="agents-a", usage_s=0.5)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    spec = job_spec(
        project,
        grant,
        task_count=1,
        checkpointable=True,
        checkpoint_reference="ckpt-0",
        command=[sys.executable, "-c", TASK, str(results)],
    )
    channel, scheduler = scheduler_stub(address)
    try:
        async with channel:
            submitted = await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
            )
            job_id = submitted.job.job_id

            async def get() -> scheduler_pb2.Job:
                return await scheduler.GetJob(
                    scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
                )

            async def checkpointed() -> bool:
                return (await get()).checkpoint_reference == "ckpt-2"

            await wait_for(checkpointed, 40, "the job to report checkpoint ckpt-2", 0.2)
            before = await get()
            first.kill()
            stack.start_agents(nodes=1, name="agents-b", first=1, usage_s=0.5)

            async def completed() -> bool:
                return (await get()).state == scheduler_pb2.JOB_STATE_COMPLETED

            await wait_for(completed, 60, "the requeued job to complete", 0.2)
            job = await get()
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int((results / "pid").read_text()), signal.SIGKILL)
    assert before.state == scheduler_pb2.JOB_STATE_RUNNING
    assert before.HasField("checkpoint_time")
    assert (results / "1.ref").read_text() == "ckpt-0"
    assert (results / "2.ref").read_text() == "ckpt-2"
    assert job.attempt == 2
    assert job.checkpoint_reference == "ckpt-2"
    assert job.spec.checkpoint_reference == "ckpt-0"
    assert [p.node_id for p in job.placements] == ["n1"]


# On SIGTERM the first attempt writes the checkpoint it would save and exits, as a
# checkpointable job does in its preemption grace period. Later attempts exit 0.
PREEMPTIBLE_TASK = """
import os, pathlib, signal, sys, time
results = pathlib.Path(sys.argv[1])
attempt = os.environ["ACSP_TASK_ID"].split("/")[1]
(results / f"{attempt}.ref").write_text(os.environ.get("ACSP_CHECKPOINT_REF", ""))
if attempt != "1":
    sys.exit(0)

def save_and_exit(signum, frame):
    target = pathlib.Path(os.environ["ACSP_CHECKPOINT_FILE"])
    temporary = target.with_suffix(".tmp")
    temporary.write_text("ckpt-at-sigterm")
    temporary.rename(target)
    sys.exit(0)

signal.signal(signal.SIGTERM, save_and_exit)
(results / "running").write_text("")
time.sleep(60)
"""


async def test_preempted_job_resumes_from_grace_checkpoint(stack: Stack, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, gpus=1, usage_s=0.5)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    victim_spec = job_spec(
        project,
        grant,
        task_count=1,
        checkpointable=True,
        grace_seconds=10,
        priority_class=common_pb2.PRIORITY_CLASS_PREEMPTIBLE,
        command=[sys.executable, "-c", PREEMPTIBLE_TASK, str(results)],
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def get(job_id: str) -> scheduler_pb2.Job:
            return await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )

        victim = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=victim_spec), metadata=md, timeout=10
        )
        await wait_for((results / "running").exists, 40, "the preemptible job to run", 0.2)
        urgent_spec = job_spec(
            project,
            grant,
            task_count=1,
            priority_class=common_pb2.PRIORITY_CLASS_INTERACTIVE,
            command=["true"],
        )
        await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=urgent_spec), metadata=md, timeout=10
        )

        async def completed() -> bool:
            job = await get(victim.job.job_id)
            return job.state == scheduler_pb2.JOB_STATE_COMPLETED

        await wait_for(completed, 90, "the preempted job to complete", 0.2)
        job = await get(victim.job.job_id)
    assert (results / "1.ref").read_text() == ""
    assert (results / "2.ref").read_text() == "ckpt-at-sigterm"
    assert job.attempt == 2
    assert job.checkpoint_reference == "ckpt-at-sigterm"
    assert job.HasField("checkpoint_time")


async def test_array_parent_shows_no_checkpoint(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, usage_s=0.5)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    command = ["/bin/sh", "-c", 'echo ckpt > "$ACSP_CHECKPOINT_FILE"; sleep 60']
    spec = job_spec(project, grant, task_count=1, array_size=2, command=command)
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def get(job_id: str) -> scheduler_pb2.Job:
            return await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )

        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )

        async def checkpointed() -> bool:
            jobs = [await get(job_id) for job_id in submitted.array_job_ids]
            return all(job.checkpoint_reference == "ckpt" for job in jobs)

        await wait_for(checkpointed, 60, "every element to report its checkpoint", 0.2)
        parent = await get(submitted.job.job_id)
    # The elements' references differ in general, so the parent shows neither a reference
    # nor the time of one.
    assert parent.checkpoint_reference == ""
    assert not parent.HasField("checkpoint_time")
