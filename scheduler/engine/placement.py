"""Search the free-capacity index for a job's tasks, without changing anything.

Whole accelerators go best fit: the node with the fewest free accelerators that still fits,
so that empty nodes stay empty for gangs. A fractional task goes first to the shared
accelerator with the least room that fits, then to a fresh accelerator on the fullest node.
Multi-node gangs fill the emptiest nodes first so they span as few nodes as possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scheduler.engine.fleet import Domain, Fleet, NodeRecord, Pool
from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, JobSpec, Topology


@dataclass(frozen=True, slots=True)
class TaskPlan:
    task_index: int
    node: NodeRecord
    indices: tuple[int, ...]
    millis: int


Excluded = frozenset[int]
"""Node ordinals a search must skip (kept for a reservation)."""


def first_allowed(ordinals: Iterable[int], excluded: Excluded) -> int | None:
    for ordinal in ordinals:
        if ordinal not in excluded:
            return ordinal
    return None


def best_fit_node(
    fleet: Fleet, pools: Sequence[Pool], count: int, excluded: Excluded
) -> NodeRecord | None:
    """Return the up node with the fewest free whole accelerators that is at least ``count``.

    Ties go to the pool listed first and then to the lowest node ordinal.
    """
    best: tuple[int, int] | None = None
    need = count * MILLIS_PER_ACCELERATOR
    for pool in pools:
        # Inline Pool.smallest_fit: this loop runs for every candidate pool of every job.
        above = pool.nonempty >> count
        if not above:
            continue
        free: int | None = count + (above & -above).bit_length() - 1
        if best is not None and free is not None and free >= best[0]:
            continue
        if pool.available_millis() < need:
            continue
        while free is not None:
            bucket = pool.buckets[free]
            ordinal = bucket[0] if not excluded else first_allowed(bucket, excluded)
            if ordinal is not None:
                best = (free, ordinal)
                break
            free = pool.smallest_fit(free + 1)
        if best is not None and best[0] == count:
            break
    return None if best is None else fleet.nodes[best[1]]


def best_fit_share(
    fleet: Fleet, pools: Sequence[Pool], millis: int, excluded: Excluded
) -> tuple[NodeRecord, int] | None:
    """Return ``(node, accelerator index)`` for a fractional task of ``millis``."""
    best: tuple[int, int, int, int] | None = None
    for pool in pools:
        if not pool.shared or pool.available_millis() < millis:
            continue
        start = pool.shared.bisect_left((millis, -1, -1))
        for entry in pool.shared.islice(start):
            if entry[1] not in excluded:
                if best is None or (entry[0], pool.ordinal) < best[:2]:
                    best = (entry[0], pool.ordinal, entry[1], entry[2])
                break
    if best is not None:
        return fleet.nodes[best[2]], best[3]
    node = best_fit_node(fleet, pools, 1, excluded)
    if node is None:
        return None
    return node, node.free_indices(1)[0]


def plan_same_node(
    fleet: Fleet, job: JobSpec, pools: Sequence[Pool], excluded: Excluded
) -> list[TaskPlan] | None:
    """Place every whole-accelerator task of ``job`` on one node."""
    per_task = job.accelerators_per_task
    node = best_fit_node(fleet, pools, per_task * job.task_count, excluded)
    if node is None:
        return None
    free = node.free_indices(per_task * job.task_count)
    return [
        TaskPlan(t, node, tuple(free[t * per_task : (t + 1) * per_task]), MILLIS_PER_ACCELERATOR)
        for t in range(job.task_count)
    ]


def task_slots(pool: Pool, per_task: int) -> int:
    """Count tasks of ``per_task`` whole accelerators the pool's up nodes can take now."""
    cap_slots = pool.available_millis() // (per_task * MILLIS_PER_ACCELERATOR)
    return min(pool.whole_slots(per_task), cap_slots)


def fill_nodes(
    nodes: Iterable[NodeRecord], task_count: int, per_task: int, first_task: int = 0
) -> list[TaskPlan]:
    """Take tasks from ``nodes`` in order until ``task_count`` are planned (or nodes run out)."""
    plans: list[TaskPlan] = []
    task = first_task
    for node in nodes:
        fits = min(node.free_whole // per_task, first_task + task_count - task)
        free = node.free_indices(fits * per_task)
        for slot in range(fits):
            indices = tuple(free[slot * per_task : (slot + 1) * per_task])
            plans.append(TaskPlan(task, node, indices, MILLIS_PER_ACCELERATOR))
            task += 1
        if task == first_task + task_count:
            break
    return plans


def emptiest_first(
    fleet: Fleet, pool: Pool, per_task: int, excluded: Excluded
) -> Iterable[NodeRecord]:
    for free in range(len(pool.buckets) - 1, per_task - 1, -1):
        for ordinal in pool.buckets[free]:
            if ordinal not in excluded:
                yield fleet.nodes[ordinal]


def plan_spread(
    fleet: Fleet, job: JobSpec, groups: Sequence[Sequence[Pool]], excluded: Excluded
) -> list[TaskPlan] | None:
    """Place a whole-accelerator gang over the nodes of one group of pools.

    Every group is a set of pools the job's topology lets one gang span (one pool for
    same_region). The group with the fewest free task slots that still fits is chosen.
    """
    per_task = job.accelerators_per_task
    task_millis = per_task * MILLIS_PER_ACCELERATOR
    ranked: list[tuple[int, int, Sequence[Pool]]] = []
    for position, group in enumerate(groups):
        # task_slots() inlined: this runs for every candidate pool of every gang search.
        slots = 0
        for pool in group:
            whole = pool.whole_slots(per_task)
            if whole:
                slots += min(whole, pool.available_millis() // task_millis)
        if slots >= job.task_count:
            ranked.append((slots, position, group))
    ranked.sort(key=lambda item: item[:2])
    for _, _, group in ranked:
        plans: list[TaskPlan] = []
        for pool in group:
            remaining = job.task_count - len(plans)
            limit = min(remaining, task_slots(pool, per_task))
            if limit:
                nodes = emptiest_first(fleet, pool, per_task, excluded)
                plans.extend(fill_nodes(nodes, limit, per_task, len(plans)))
            if len(plans) == job.task_count:
                return plans
    return None


def domain_slots(domain: Domain, per_task: int, excluded: Excluded) -> int:
    return sum(
        node.free_whole // per_task
        for node in domain.nodes
        if node.schedulable and node.ordinal not in excluded
    )


def plan_domain(
    fleet: Fleet, job: JobSpec, pools: Sequence[Pool], excluded: Excluded
) -> list[TaskPlan] | None:
    """Place a whole-accelerator gang inside one interconnect domain (best fit by domain)."""
    per_task = job.accelerators_per_task
    need = job.task_count * per_task
    best: tuple[int, int, Pool, Domain] | None = None
    for pool in pools:
        if pool.available_millis() < need * MILLIS_PER_ACCELERATOR:
            continue
        domain_free = pool.domain_free()
        start = domain_free.bisect_left((need, -1))
        for free, ordinal in domain_free.islice(start):
            if best is not None and (free, pool.ordinal) >= best[:2]:
                break
            domain = pool.domain_list[ordinal]
            if domain_slots(domain, per_task, excluded) >= job.task_count:
                best = (free, pool.ordinal, pool, domain)
                break
    if best is None:
        return None
    nodes = sorted(
        (n for n in best[3].nodes if n.schedulable and n.ordinal not in excluded),
        key=lambda n: (-n.free_whole, n.ordinal),
    )
    return fill_nodes(nodes, job.task_count, per_task)


def topology_groups(job: JobSpec, pools: Sequence[Pool]) -> list[list[Pool]]:
    """Split candidate pools into the groups one gang may span."""
    groups: dict[tuple[str, ...], list[Pool]] = {}
    for pool in pools:
        if job.topology is Topology.SAME_REGION:
            key: tuple[str, ...] = pool.key
        elif job.allow_cross_provider:
            key = (pool.model,)
        else:
            key = (pool.provider, pool.model)
        groups.setdefault(key, []).append(pool)
    return list(groups.values())
