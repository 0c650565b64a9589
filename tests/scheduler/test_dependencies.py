"""Jobs that wait for others to complete, in the job book, without servers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from acsp.cli.jobs import job_details, spec_from_args
from acsp.cli.main import build_parser
from acsp.v1 import scheduler_pb2
from scheduler.service.dependencies import NOT_FOUND, RECENT_ENDS, Dependencies
from scheduler.service.dependency_check import MAX_AFTER_IDS, resolve_after_ids
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.evolve import evolve
from tests.scheduler.test_jobbook import NOW, held, make_book, make_job, place, report


def after(job: Job, *others: Job | str) -> Job:
    ids = tuple(o if isinstance(o, str) else o.job_id for o in others)
    return evolve(job, spec=replace(job.spec, after_job_ids=ids, awaited_job_ids=ids))


def run_to_end(book: JobBook, job: Job, code: int = 0) -> Effects:
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    return report(book, job, 0, "exited", code)


def settle(book: JobBook, now: float = NOW + 5) -> Effects:
    fx = Effects(now)
    book.settle_reloaded(fx)
    return fx


def test_dependent_waits_outside_engine() -> None:
    book = make_book()
    first = make_job(tasks=1)
    place(book, first)
    second = after(make_job(tasks=1), first)

    book.add([second], NOW + 1)
    fx = settle(book)

    waiting = book.jobs[second.job_id]
    assert waiting.pending_reason == "dependency"
    assert waiting.reason == f"waiting for job {first.job_id} to complete"
    assert second.job_id in fx.changed
    assert second.job_id not in book.engine.engine.jobs


def test_completed_dependency_releases_job() -> None:
    book = make_book()
    first = make_job(tasks=1)
    second = after(make_job(tasks=1), first)
    place(book, first)
    book.add([second], NOW + 1)
    settle(book)

    run_to_end(book, first)
    fx = settle(book)

    released = book.jobs[second.job_id]
    assert released.pending_reason == ""
    assert released.reason == ""
    assert fx.changed[second.job_id][1] == "dependency"
    assert second.job_id in book.engine.engine.jobs


def test_failed_dependency_cancels_chain() -> None:
    book = make_book()
    first = make_job(tasks=1)
    second = after(make_job(tasks=1), first)
    third = after(make_job(tasks=1), second)
    place(book, first)
    book.add([second, third], NOW + 1)
    settle(book)

    run_to_end(book, first, code=3)
    fx = settle(book)

    ended = {job_id: job for job_id, (job, _) in fx.changed.items()}
    assert ended[second.job_id].state == "cancelled"
    assert ended[second.job_id].reason == (
        f"job {first.job_id} that it waits for ended failed, so it can never start"
    )
    assert ended[third.job_id].state == "cancelled"
    assert first.job_id not in book.jobs
    assert second.job_id not in book.jobs
    assert third.job_id not in book.jobs


def test_job_waits_for_every_dependency() -> None:
    book = make_book()
    first = make_job(tasks=1)
    other = make_job(tasks=1)
    second = after(make_job(tasks=1), first, other)
    place(book, first)
    place(book, other)
    book.add([second], NOW + 1)
    settle(book)

    run_to_end(book, first)
    settle(book)

    waiting = book.jobs[second.job_id]
    assert waiting.pending_reason == "dependency"
    assert waiting.reason == f"waiting for job {other.job_id} to complete"
    assert second.job_id not in book.engine.engine.jobs


def test_recent_end_decides_at_once() -> None:
    book = make_book()
    first = make_job(tasks=1)
    run_to_end(book, first, code=1)
    settle(book)

    second = after(make_job(tasks=1), first)
    book.add([second], NOW + 6)
    fx = settle(book)

    assert fx.changed[second.job_id][0].state == "cancelled"
    assert book.dependencies.take_unresolved() == []


def test_unknown_dependency_read_from_store() -> None:
    book = make_book()
    second = after(make_job(tasks=1), "jstored", "jmissing")
    book.add([second], NOW + 1)
    settle(book)
    assert book.dependencies.take_unresolved() == ["jmissing", "jstored"]

    book.dependencies.apply_stored({"jstored": "completed", "jmissing": NOT_FOUND})
    fx = settle(book)

    cancelled = fx.changed[second.job_id][0]
    assert cancelled.state == "cancelled"
    assert cancelled.reason == (
        "job jmissing that it waits for is not found, so it can never start"
    )


def test_cancel_waiting_job() -> None:
    book = make_book()
    first = make_job(tasks=1)
    second = after(make_job(tasks=1), first)
    place(book, first)
    book.add([second], NOW + 1)
    settle(book)

    fx = Effects(NOW + 2)
    cancelled = book.cancel(second.job_id, "no longer needed", "rpc", fx)
    run_to_end(book, first)
    later = settle(book)

    assert cancelled is not None
    assert cancelled.state == "cancelled"
    assert second.job_id not in later.changed
    assert not book.dependencies.waits(second.job_id)


def test_recent_ends_are_bounded() -> None:
    dependencies = Dependencies()
    for index in range(RECENT_ENDS + 1):
        dependencies.ended(f"j{index}", "completed")

    assert dependencies.register("late", ["j0"], lambda _: False) is None
    assert dependencies.take_unresolved() == ["j0"]
    assert dependencies.register("later", [f"j{RECENT_ENDS}"], lambda _: False) is None
    assert not dependencies.waits("later")


def test_message_names_first_jobs() -> None:
    dependencies = Dependencies()
    dependencies.register("job", ["a", "b", "c", "d", "e"], lambda _: True)

    assert dependencies.message("job") == "waiting for 5 jobs to complete: a, b, c and 2 more"


STORED = [
    ("jdone", "", "proj", "completed"),
    ("jrun", "", "proj", "running"),
    ("jbad", "", "proj", "failed"),
    ("jother", "", "elsewhere", "running"),
    ("jarr-0", "jarr", "proj", "completed"),
    ("jarr-1", "jarr", "proj", "pending"),
]


async def read_stored(ids: list[str]) -> list[tuple[str, str, str, str]]:
    return [row for row in STORED if row[0] in ids or (row[1] and row[1] in ids)]


async def resolve(*ids: str) -> tuple[str, ...]:
    return await resolve_after_ids(ids, "proj", "spec.after_job_ids", read_stored)


async def test_arrays_resolve_to_elements() -> None:
    assert await resolve("jrun", "jarr", "jdone", "jrun") == ("jrun", "jarr-0", "jarr-1", "jdone")


@pytest.mark.parametrize("missing", ["jnone", "jother"])
async def test_unknown_or_foreign_job_rejected(missing: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await resolve("jrun", missing)

    assert caught.value.field == "spec.after_job_ids[1]"
    assert caught.value.reason == f"job {missing} is not found in project proj"


async def test_failed_job_rejected() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        await resolve("jbad")

    assert caught.value.field == "spec.after_job_ids[0]"
    assert caught.value.reason.startswith("job jbad ended failed")


async def test_too_many_ids_rejected() -> None:
    with pytest.raises(InvalidArgument, match="names 101 jobs, over the 100"):
        await resolve(*(f"j{i}" for i in range(MAX_AFTER_IDS + 1)))


def test_after_option_becomes_spec() -> None:
    args = build_parser().parse_args(
        ["jobs", "submit", "--project", "p1", "--after", "ja,jb", "--after", "jc", "--", "true"]
    )

    spec = spec_from_args(args)

    assert list(spec.after_job_ids) == ["ja", "jb", "jc"]


def test_details_count_awaited_jobs() -> None:
    job = scheduler_pb2.Job(
        job_id="j1", spec=scheduler_pb2.JobSpec(after_job_ids=[f"j{i}" for i in range(7)])
    )

    assert dict(job_details(job))["after"] == "j0 j1 j2 j3 j4 and 2 more"
