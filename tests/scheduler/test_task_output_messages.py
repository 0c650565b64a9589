"""Why ReadTaskOutput finds no node for a task: the message for each kind of job."""

from __future__ import annotations

from scheduler.service.model import Job, JobSpec
from scheduler.service.task_output import _never_started

SPEC = JobSpec(name="j", project_id="proj", command=("true",), grant_id="grant-1", task_count=2)


def test_pending_task_read_once_running() -> None:
    message = _never_started(Job(job_id="j1", spec=SPEC, owner="alice"), 1)
    assert "task 1 of job j1 has not started on any node (the job is pending)" in message


def test_job_cancelled_before_start_never_started() -> None:
    job = Job(job_id="j1", spec=SPEC, owner="alice", state="cancelled")
    message = _never_started(job, 1)
    assert message.startswith("task 1 of job j1 never started, so it has no output")
    assert "ACSP_SCHEDULER_OUTBOX_RETENTION_S" not in message


def test_started_job_names_outbox_retention() -> None:
    job = Job(job_id="j1", spec=SPEC, owner="alice", state="completed", started_at=1.0)
    assert "ACSP_SCHEDULER_OUTBOX_RETENTION_S" in _never_started(job, 0)


def test_requeued_job_names_outbox_retention() -> None:
    # A requeue clears started_at, but the first attempt had start commands.
    job = Job(job_id="j1", spec=SPEC, owner="alice", state="cancelled", attempt=2)
    assert "ACSP_SCHEDULER_OUTBOX_RETENTION_S" in _never_started(job, 0)
