"""Checkpoint references reported by tasks: stored per job and passed to the next attempt."""

from __future__ import annotations

from acsp.v1 import agent_pb2, events_pb2
from scheduler.service.jobbook import MAX_CHECKPOINT_REF_BYTES, Effects, JobBook
from scheduler.service.model import Job
from scheduler.service.pledges import PledgeRecord, RecallRecord

from .test_jobbook import NOW, held, make_book, make_job, place, report


def checkpoint(book: JobBook, job: Job, reference: str, attempt: int = 0) -> Effects:
    fx = Effects(NOW + 3)
    attempt = attempt or book.jobs[job.job_id].attempt
    task_id = f"{job.job_id}/{attempt}/0"
    book.apply_checkpoint(task_id, reference, NOW + 2.5, fx)
    book.apply_task("prov.reg.n1", task_id, "checkpointed", 0, "", fx)
    return fx


def running(book: JobBook, job: Job) -> None:
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 1, "started")


def start_references(fx: Effects) -> list[str]:
    starts = [r for r in fx.commands if r.kind == "start"]
    return [agent_pb2.AgentCommand.FromString(r.payload).checkpoint_reference for r in starts]


def test_checkpoint_is_stored_with_its_time() -> None:
    book = make_book()
    job = make_job()
    running(book, job)
    fx = checkpoint(book, job, "s3://ckpt/step-100")
    stored, cause = fx.changed[job.job_id]
    assert stored.checkpoint_ref == "s3://ckpt/step-100"
    assert stored.checkpoint_at == NOW + 2.5
    assert cause == "task:checkpointed"
    assert stored.state == "running"
    assert [t.state for t in stored.placement] == ["started", "started"]


def test_repeated_checkpoint_changes_nothing() -> None:
    book = make_book()
    job = make_job()
    running(book, job)
    checkpoint(book, job, "s3://ckpt/step-100")
    fx = checkpoint(book, job, "s3://ckpt/step-100")
    assert fx.changed == {}
    assert book.jobs[job.job_id].checkpoint_at == NOW + 2.5


def test_oversized_checkpoint_is_ignored() -> None:
    book = make_book()
    job = make_job()
    running(book, job)
    fx = checkpoint(book, job, "x" * (MAX_CHECKPOINT_REF_BYTES + 1))
    assert fx.changed == {}
    assert book.jobs[job.job_id].checkpoint_ref == ""


def test_requeued_attempt_starts_from_last_checkpoint() -> None:
    book = make_book()
    job = make_job()
    running(book, job)
    checkpoint(book, job, "s3://ckpt/step-100")
    checkpoint(book, job, "s3://ckpt/step-200")
    fx = report(book, job, 1, "lost")
    requeued = book.jobs[job.job_id]
    assert requeued.attempt == 2
    assert requeued.checkpoint_ref == "s3://ckpt/step-200"
    events = [events_pb2.JobEvent.FromString(e.payload) for e in fx.events]
    assert [e.kind for e in events] == [events_pb2.JOB_EVENT_KIND_REQUEUED]
    assert events[0].last_checkpoint_time.ToSeconds() == int(NOW + 2.5)
    book.engine.tasks_stopped("prov.reg.n1", job.job_id)
    fx = place(book, requeued, NOW + 10)
    fx = held(book, requeued)
    assert start_references(fx) == ["s3://ckpt/step-200", "s3://ckpt/step-200"]


def test_checkpoint_of_older_attempt_is_ignored() -> None:
    book = make_book()
    job = make_job()
    running(book, job)
    report(book, job, 1, "lost")
    fx = checkpoint(book, job, "s3://ckpt/late", attempt=1)
    assert fx.changed == {}
    assert book.jobs[job.job_id].checkpoint_ref == ""


def test_preempted_job_keeps_checkpoint_from_its_stop() -> None:
    book = make_book(gpus=2)
    pledge = PledgeRecord("pl-1", "prov", "reg", "A100-SXM4-80GB", 0, 2, NOW - 100, NOW + 86400)
    book.engine.set_pledge(pledge)
    job = make_job(tasks=2)
    running(book, job)
    book.engine.add_recall(RecallRecord("rc-1", "pl-1", 2, NOW + 3, None, "maintenance"), pledge)
    book.apply_pass(book.engine.schedule(NOW + 3), Effects(NOW + 3))
    assert book.jobs[job.job_id].state == "stopping"
    report(book, job, 0, "stopped", -15)
    # The agent attaches the reference written during the grace period to the stop event.
    fx = Effects(NOW + 4)
    task_id = f"{job.job_id}/1/1"
    book.apply_checkpoint(task_id, "s3://ckpt/at-sigterm", NOW + 3.5, fx)
    book.apply_task("prov.reg.n1", task_id, "stopped", 143, "", fx)
    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert requeued.checkpoint_ref == "s3://ckpt/at-sigterm"
    events = [events_pb2.JobEvent.FromString(e.payload) for e in fx.events]
    assert [e.event_id for e in events] == [f"{job.job_id}/1/preempted", f"{job.job_id}/1/requeued"]
    assert all(e.last_checkpoint_time.ToSeconds() == int(NOW + 3.5) for e in events)
