"""Tasks that exit on their own while the scheduler stops their job."""

from __future__ import annotations

from decimal import Decimal

from acsp.v1 import events_pb2
from scheduler.service.admission import HoldOutcome
from scheduler.service.jobbook import Effects
from tests.scheduler.test_jobbook import NOW, make_book, make_job, place, recalled, report


def test_exit_during_preemption_completes_job() -> None:
    book = make_book(gpus=2)
    job = make_job(tasks=2)
    recalled(book, job)

    # Both tasks finished their work before the preemption's stop reached them.
    report(book, job, 0, "exited", 0)
    fx = report(book, job, 1, "exited", 0)

    ended = fx.changed[job.job_id][0]
    events = [events_pb2.JobEvent.FromString(e.payload) for e in fx.events]
    assert ended.state == "completed"
    assert ended.exit_code == 0
    assert job.job_id not in book.jobs
    assert [e.event_id for e in events] == [f"{job.job_id}/1/ended"]
    assert events[0].hold_id == "h1"


def test_stop_during_preemption_requeues_job() -> None:
    book = make_book(gpus=2)
    job = make_job(tasks=2)
    recalled(book, job)

    report(book, job, 0, "exited", 0)
    fx = report(book, job, 1, "stopped", -15)

    # Task 1 did not finish, so the whole gang runs again.
    assert fx.changed[job.job_id][0].state == "pending"
    assert book.jobs[job.job_id].attempt == 2


def test_requeued_exit_completes_with_code_zero() -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), fx)
    report(book, job, 0, "started")
    report(book, job, 0, "lost")
    place(book, job, NOW + 5)
    fx = Effects(NOW + 6)
    book.apply_hold(job.job_id, 2, HoldOutcome("held", "h2", "g1", Decimal(1)), fx)

    fx = Effects(NOW + 7)
    book.apply_task("prov.reg.n1", f"{job.job_id}/1/0", "exited", 0, "", fx)
    fx = Effects(NOW + 8)
    book.apply_task("prov.reg.n1", f"{job.job_id}/2/0", "stopped", -15, "", fx)

    # Attempt 1 exited with code 0, so the stopped attempt 2 does not make the code -15.
    ended = fx.changed[job.job_id][0]
    assert ended.state == "completed"
    assert ended.exit_code == 0
