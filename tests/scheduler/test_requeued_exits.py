"""A requeued one-task job whose earlier attempt's task exits 0 ends as completed."""

from __future__ import annotations

from decimal import Decimal

from scheduler.service.admission import HoldOutcome
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job
from tests.scheduler.test_jobbook import NOW, make_book, make_job, place

NODE = "prov.reg.n1"


def task_event(book: JobBook, job: Job, attempt: int, state: str, now: float) -> Effects:
    fx = Effects(now)
    book.apply_task(NODE, f"{job.job_id}/{attempt}/0", state, 0, "", fx)
    return fx


def hold(book: JobBook, job: Job, now: float, attempt: int = 0) -> Effects:
    fx = Effects(now)
    attempt = attempt or book.jobs[job.job_id].attempt
    outcome = HoldOutcome("held", f"h{attempt}", "g1", Decimal(1))
    book.apply_hold(job.job_id, attempt, outcome, fx)
    return fx


def lose_first_attempt(book: JobBook, job: Job) -> None:
    """Start the job's first attempt and requeue it, as a lost task does."""
    place(book, job)
    hold(book, job, NOW + 2)
    task_event(book, job, 1, "started", NOW + 3)
    task_event(book, job, 1, "lost", NOW + 4)
    assert book.jobs[job.job_id].attempt == 2


def test_exit_while_requeued_completes_job() -> None:
    book = make_book()
    job = make_job(tasks=1)
    lose_first_attempt(book, job)
    assert book.jobs[job.job_id].state == "pending"

    fx = task_event(book, job, 1, "exited", NOW + 5)
    ended = fx.changed[job.job_id][0]
    assert ended.state == "completed"
    assert job.job_id not in book.jobs
    assert fx.commands == []


def test_exit_before_next_start_completes_job() -> None:
    book = make_book()
    job = make_job(tasks=1)
    lose_first_attempt(book, job)
    place(book, job, NOW + 5)
    hold(book, job, NOW + 6)
    assert book.jobs[job.job_id].state == "starting"

    # The second attempt's start command is out, but its task has not started.
    fx = task_event(book, job, 1, "exited", NOW + 7)
    assert book.jobs[job.job_id].state == "stopping"
    assert [(c.kind, c.attempt) for c in fx.commands] == [("stop", 2)]

    fx = task_event(book, job, 2, "stopped", NOW + 8)
    ended = fx.changed[job.job_id][0]
    assert ended.state == "completed"
    assert "attempt 1 exited with code 0" in ended.reason
    assert job.job_id not in book.jobs


def test_exit_while_admitting_completes_job() -> None:
    book = make_book()
    job = make_job(tasks=1)
    lose_first_attempt(book, job)
    place(book, job, NOW + 5)  # the second attempt waits for its hold

    fx = task_event(book, job, 1, "exited", NOW + 6)
    assert fx.changed[job.job_id][0].state == "completed"
    assert fx.commands == []
    # The hold placed meanwhile is released.
    fx = hold(book, job, NOW + 7, attempt=2)
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/2/requeued"]


def test_exit_after_next_start_keeps_it() -> None:
    book = make_book()
    job = make_job(tasks=1)
    lose_first_attempt(book, job)
    place(book, job, NOW + 5)
    hold(book, job, NOW + 6)
    task_event(book, job, 2, "started", NOW + 7)

    # Stopping the second attempt now would waste the work it has done.
    fx = task_event(book, job, 1, "exited", NOW + 8)
    assert book.jobs[job.job_id].state == "running"
    assert fx.commands == []
