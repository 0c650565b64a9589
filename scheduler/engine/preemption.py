"""Choosing which running jobs to preempt, for a higher class or for a shrinking pool.

A job is never chosen twice for the same cause (the same preempting job, recall or pledge),
and a job that already has a preemption decision is not chosen again, so preemption cannot
loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from scheduler.engine.decisions import Cause
from scheduler.engine.fleet import Domain, NodeRecord, Pool
from scheduler.engine.records import JobRecord, job_of
from scheduler.engine.spec import JobSpec, PriorityClass, Topology

_Option = tuple[int, int, NodeRecord, set[str], int]
"""A node to preempt on: cost per slot won, node ordinal, node, victim job ids, slots won."""

MAX_OPTIONS = 64
"""Nodes with room to win that one preemption search compares, so a search stays bounded.

NOTE: the cheapest victims among the first nodes found are chosen, not the cheapest overall.
"""


def shrink_victims(
    pool: Pool,
    over_millis: int,
    jobs: Mapping[str, JobRecord],
    cause: tuple[Cause, str],
) -> list[JobRecord]:
    """Pick running jobs of ``pool`` to free at least ``over_millis`` there.

    Preemptible jobs go first, then standard, then interactive; jobs placed through an
    advance reservation on protected capacity go last; the most recently started first.
    """
    candidates: list[tuple[int, int, float, int, JobRecord, int]] = []
    for job_id in sorted(pool.jobs):
        record = jobs[job_id]
        if record.stopping or cause in record.preempted_by or record.tasks is None:
            continue
        millis = sum(
            allocation.millis * len(allocation.indices)
            for allocation in record.tasks.values()
            if allocation.node.pool is pool
        )
        start = record.start if record.start is not None else 0.0
        key = (int(record.protected), int(record.spec.priority), -start, record.sequence)
        candidates.append((*key, record, millis))
    candidates.sort(key=lambda c: c[:4])
    victims: list[JobRecord] = []
    freed = 0
    for *_, record, millis in candidates:
        if freed >= over_millis:
            break
        victims.append(record)
        freed += millis
    return victims


def _node_victims(
    node: NodeRecord, jobs: Mapping[str, JobRecord], cause: tuple[Cause, str]
) -> tuple[int, set[str]] | None:
    """Return (accelerators that would be free, jobs to preempt) if the node's preemptible
    jobs were stopped; ``None`` when it has none to stop."""
    victims: set[str] = set()
    reclaimable = 0
    failed = node.failed
    for index, owners in enumerate(node.owners):
        # Stopping the jobs on a failed accelerator frees nothing that can be placed.
        if index in failed:
            continue
        if not owners:
            reclaimable += 1
            continue
        ids = {job_of(owner) for owner in owners}
        records = [jobs.get(job_id) for job_id in ids]
        if all(
            r is not None
            and r.spec.priority is PriorityClass.PREEMPTIBLE
            and (r.stopping or cause not in r.preempted_by)
            for r in records
        ):
            reclaimable += 1
            victims.update(r.job_id for r in records if r is not None and not r.stopping)
    if not victims:
        return None
    return reclaimable, victims


def _usable_whole(node: NodeRecord) -> int:
    """Return the free whole accelerators a new job could get on ``node`` now: none while the
    node runs as many jobs as it may, because then it takes no other job."""
    return 0 if node.full else node.free_whole


def priority_victims(
    job: JobSpec,
    pools: Sequence[Pool],
    nodes_of: Iterable[NodeRecord],
    jobs: Mapping[str, JobRecord],
) -> list[str] | None:
    """Pick preemptible jobs whose stop lets ``job`` (of a higher class) fit.

    ``nodes_of`` are the up nodes of ``pools`` that run preemptible jobs. Returns victim job
    ids, or ``None`` when stopping every preemptible job there would still not be enough.
    """
    cause = (Cause.PRIORITY, job.job_id)
    per_task = job.accelerators_per_task
    single = job.task_count == 1 or job.topology is Topology.SAME_NODE
    need = per_task * (job.task_count if single else 1)
    options: list[_Option] = []
    for node in nodes_of:
        if len(options) >= MAX_OPTIONS:
            break
        found = _node_victims(node, jobs, cause)
        if found is None:
            continue
        reclaimable, victims = found
        extra = reclaimable // need - _usable_whole(node) // need
        if extra > 0:
            cost = sum(jobs[v].spec.total_millis for v in victims)
            options.append((cost // extra, node.ordinal, node, victims, extra))
    options.sort(key=lambda o: o[:2])
    if single:
        return sorted(options[0][3]) if options else None
    if job.topology is Topology.SAME_INTERCONNECT_DOMAIN:
        return _domain_victims(job, pools, options, jobs)
    free_slots = sum(
        sum(len(pool.buckets[f]) * (f // per_task) for f in range(per_task, len(pool.buckets)))
        for pool in pools
    )
    chosen: set[str] = set()
    slots = free_slots
    for _, _, node, victims, _ in options:
        if slots >= job.task_count:
            break
        slots += (_node_victims(node, jobs, (Cause.PRIORITY, job.job_id)) or (0, set()))[0] // (
            per_task
        ) - _usable_whole(node) // per_task
        chosen.update(victims)
    if slots < job.task_count:
        return None
    return sorted(chosen)


def _domain_victims(
    job: JobSpec,
    pools: Sequence[Pool],
    options: Sequence[_Option],
    jobs: Mapping[str, JobRecord],
) -> list[str] | None:
    """Pick the victims for a gang bound to one interconnect domain, all inside one domain.

    Each domain is filled from its free slots, then from its nodes cheapest to preempt
    (``options`` is sorted by cost per slot won). The domain where the gang fits for the least
    preempted work wins, and the first found on a tie.
    """
    per_task = job.accelerators_per_task
    by_domain: dict[Domain, list[_Option]] = {}
    for option in options:
        if option[2].pool in pools:
            by_domain.setdefault(option[2].domain, []).append(option)
    best: tuple[int, list[str]] | None = None
    for domain, domain_options in by_domain.items():
        slots = sum(n.free_whole // per_task for n in domain.nodes if n.schedulable)
        chosen: set[str] = set()
        for _, _, _, victims, won in domain_options:
            if slots >= job.task_count:
                break
            slots += won
            chosen.update(victims)
        if slots < job.task_count:
            continue
        cost = sum(jobs[v].spec.total_millis for v in chosen)
        if best is None or cost < best[0]:
            best = (cost, sorted(chosen))
    return best[1] if best is not None else None


def grace_deadline(record: JobRecord, now: float, grace_s: float) -> float:
    """Return when a preempted job must have stopped: checkpointable jobs get ``grace_s``."""
    return now + grace_s if record.spec.checkpointable else now


def total_millis(record: JobRecord) -> int:
    if record.tasks is None:
        return 0
    return sum(allocation.millis * len(allocation.indices) for allocation in record.tasks.values())
