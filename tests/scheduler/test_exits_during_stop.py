"""Tasks that exit on their own while the scheduler stops their job."""

from __future__ import annotations

from acsp.v1 import events_pb2
from tests.scheduler.test_jobbook import make_book, make_job, recalled, report


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
