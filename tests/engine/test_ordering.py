"""The queue order inside a class, and per-project queues, without a fleet."""

from __future__ import annotations

import random

from scheduler.engine.fairshare import FairShare, Level
from scheduler.engine.ordering import JobQueue, QueueItem, ShareOrder
from scheduler.engine.records import JobRecord
from scheduler.engine.spec import JobSpec


def record(job_id: str, project: str, submit: float, sequence: int) -> JobRecord:
    return JobRecord(JobSpec(job_id, project, "inst", submit), sequence)


def queues_of(records: list[JobRecord]) -> dict[str, list[QueueItem]]:
    queues: dict[str, list[QueueItem]] = {}
    for r in sorted(records, key=lambda r: (r.spec.submit_time, r.sequence)):
        queues.setdefault(r.spec.project, []).append((r.spec.submit_time, r.sequence, r))
    return queues


def drain(order: ShareOrder, placed: set[str] | None = None) -> list[str]:
    """Return job ids in the order the runs yield them; jobs in ``placed`` count as placed."""
    seen: list[str] = []
    while (run := order.next_run()) is not None:
        queue, bound = run
        position = queue.position
        while True:
            job = queue.items[position][2]
            position += 1
            seen.append(job.job_id)
            if placed and job.job_id in placed:
                order.end_run(position, True)
                break
            if position == len(queue.items):
                order.end_run(position, False)
                break
            if bound is not None and queue.items[position][:2] >= bound:
                order.end_run(position, False)
                break
    return seen


def test_equal_project_shares_interleave_by_submit() -> None:
    share = FairShare(3600.0, 1.0)
    records = [record(f"j{i}", f"p{i % 3}", float(i), i) for i in range(12)]
    for r in records:
        share.register(r.spec.project, r.spec.institution, "prog")

    order = drain(ShareOrder(share, queues_of(records)))

    assert order == [f"j{i}" for i in range(12)]


def test_lower_usage_project_runs_first() -> None:
    share = FairShare(3600.0, 1.0)
    records = [record(f"j{i}", f"p{i % 2}", float(i), i) for i in range(6)]
    for r in records:
        share.register(r.spec.project, r.spec.institution, "prog")
    share.charge("p0", 100.0)

    order = drain(ShareOrder(share, queues_of(records)))

    assert order == ["j1", "j3", "j5", "j0", "j2", "j4"]


def test_order_without_placements_is_a_sort_by_keys() -> None:
    rng = random.Random(7)
    share = FairShare(3600.0, 1.0)
    records = []
    for i in range(300):
        project = f"p{rng.randrange(12)}"
        records.append(
            JobRecord(
                JobSpec(f"j{i}", project, f"inst-{int(project[1:]) % 4}", float(rng.randrange(50))),
                i,
            )
        )
    for r in records:
        share.register(r.spec.project, r.spec.institution, f"prog-{r.spec.institution[-1] == '0'}")
    for p in range(12):
        share.charge(f"p{p}", float(rng.randrange(3)))

    order = drain(ShareOrder(share, queues_of(records)))

    def key(r: JobRecord) -> tuple[object, ...]:
        institution = share.parent(Level.PROJECT, r.spec.project)
        program = share.parent(Level.INSTITUTION, institution)
        return (
            share.component(Level.PROGRAM, program),
            program,
            share.component(Level.INSTITUTION, institution),
            institution,
            share.component(Level.PROJECT, r.spec.project),
            r.spec.submit_time,
            r.sequence,
        )

    assert order == [r.job_id for r in sorted(records, key=key)]


def test_placement_moves_project_behind_its_siblings() -> None:
    share = FairShare(3600.0, 1.0)
    records = [record(f"j{i}", f"p{i % 2}", float(i), i) for i in range(6)]
    for r in records:
        share.register(r.spec.project, r.spec.institution, "prog")
    order = ShareOrder(share, queues_of(records))
    run = order.next_run()
    assert run is not None
    assert run[0].items[run[0].position][2].job_id == "j0"

    # The pass charges a placed job's usage before moving on, as place() does.
    share.charge("p0", 50.0)
    order.end_run(run[0].position + 1, True)

    assert drain(order) == ["j1", "j3", "j5", "j2", "j4"]


def test_job_queue_sorts_a_requeued_job_back_in() -> None:
    queue = JobQueue()
    late = record("late", "p", 5.0, 2)
    queue.add(record("a", "p", 1.0, 0))
    queue.add(late)
    queue.add(record("b", "p", 2.0, 1))

    assert [item[2].job_id for item in queue.snapshot()] == ["a", "b", "late"]
    queue.remove("b")
    assert [item[2].job_id for item in queue.snapshot()] == ["a", "late"]
    assert len(queue) == 2
