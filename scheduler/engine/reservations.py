"""Reservations: when and where a pending job could start, from running jobs' wall times.

The search replays the expected ends of running jobs in the job's candidate pools on a copy of
the touched nodes, until some node, interconnect domain or topology group has room for the
whole job. A job's expected end is its start plus its wall-time limit, and a job without a
limit never ends for this purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace

from scheduler.engine.fleet import Fleet, NodeRecord, Pool
from scheduler.engine.placement import (
    Excluded,
    TaskPlan,
    emptiest_first,
    plan_domain,
    plan_same_node,
    plan_spread,
    topology_groups,
)
from scheduler.engine.records import JobRecord
from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, JobSpec, Topology


@dataclass(frozen=True, slots=True)
class Reservation:
    job_id: str
    start: float
    nodes: frozenset[int]
    """Ordinals of the nodes kept for the job."""


def plan_now(
    fleet: Fleet, job: JobSpec, pools: Sequence[Pool], excluded: Excluded
) -> list[TaskPlan] | None:
    """Plan a whole-accelerator job on free capacity now (fractional jobs count as one)."""
    if job.task_count == 1 or job.topology is Topology.SAME_NODE or job.fractional:
        if job.fractional:
            job = _as_whole(job)
        return plan_same_node(fleet, job, pools, excluded)
    if job.topology is Topology.SAME_INTERCONNECT_DOMAIN:
        return plan_domain(fleet, job, pools, excluded)
    return plan_spread(fleet, job, topology_groups(job, pools), excluded)


def _as_whole(job: JobSpec) -> JobSpec:
    # NOTE: a fractional job is reserved a whole accelerator, which over-reserves a share.
    return replace(job, millis_per_task=MILLIS_PER_ACCELERATOR, task_count=1)


def earliest_start(
    fleet: Fleet,
    job: JobSpec,
    pools: Sequence[Pool],
    releases: Iterable[tuple[float, JobRecord]],
    not_before: float,
    excluded: Excluded,
) -> Reservation | None:
    """Return the earliest reservation for ``job`` at or after ``not_before``, if any.

    ``releases`` yields running jobs of ``pools`` by expected end, earliest first; the search
    consumes only as many as it needs.
    """
    plans = plan_now(fleet, job, pools, excluded)
    if plans is not None:
        return Reservation(job.job_id, not_before, frozenset(p.node.ordinal for p in plans))
    if job.fractional:
        job = _as_whole(job)
    # NOTE: pool caps (pledges, recalls, pool limits) are not replayed, so a reservation may
    # name room that a cap will still deny when the job is due.
    if sum(pool.up_accelerators for pool in pools) < job.task_count * job.accelerators_per_task:
        return None
    single = job.task_count == 1 or job.topology is Topology.SAME_NODE
    per_slot = job.accelerators_per_task * (job.task_count if single else 1)
    slots_needed = 1 if single else job.task_count
    group_of = _grouping(job, pools, single)
    pool_set = {pool.ordinal for pool in pools}
    simulated: dict[int, list[int]] = {}
    group_slots: dict[Hashable, int] = {}
    changed: set[Hashable] = set()
    current: float | None = None
    for end, record in releases:
        if current is not None and end != current:
            found = _fitting_group(changed, group_slots, slots_needed)
            if found is not None:
                break
            changed.clear()
        current = end
        for allocation in (record.tasks or {}).values():
            node = allocation.node
            # A node at its job limit counts no slots until one of its jobs ends.
            if node.pool.ordinal not in pool_set or not node.up:
                continue
            if node.ordinal in excluded:
                continue
            used = simulated.get(node.ordinal)
            if used is None:
                used = node.usage_with_failed()
                simulated[node.ordinal] = used
                before = 0 if node.full else used.count(0) // per_slot
            else:
                before = used.count(0) // per_slot
            for index in allocation.indices:
                used[index] -= allocation.millis
            after = used.count(0) // per_slot
            group = group_of(node)
            if group not in group_slots:
                group_slots[group] = _initial_slots(
                    fleet, node, group, group_of, pools, per_slot, excluded
                )
            group_slots[group] += after - before
            changed.add(group)
    found = _fitting_group(changed, group_slots, slots_needed)
    if found is None or current is None:
        return None
    start = max(current, not_before)
    nodes = _pick_nodes(fleet, found, group_of, simulated, pools, per_slot, excluded)
    return Reservation(job.job_id, start, frozenset(nodes[:slots_needed]))


def _fitting_group(
    changed: set[Hashable], group_slots: dict[Hashable, int], slots_needed: int
) -> Hashable | None:
    fitting = [group for group in changed if group_slots[group] >= slots_needed]
    return min(fitting, key=repr) if fitting else None


def _grouping(
    job: JobSpec, pools: Sequence[Pool], single: bool
) -> Callable[[NodeRecord], Hashable]:
    if single:
        return lambda node: ("node", node.ordinal)
    if job.topology is Topology.SAME_INTERCONNECT_DOMAIN:
        return lambda node: ("domain", node.pool.ordinal, node.domain.ordinal)
    groups = topology_groups(job, pools)
    index = {pool.ordinal: position for position, group in enumerate(groups) for pool in group}
    return lambda node: ("group", index[node.pool.ordinal])


def _initial_slots(
    fleet: Fleet,
    node: NodeRecord,
    group: Hashable,
    group_of: Callable[[NodeRecord], Hashable],
    pools: Sequence[Pool],
    per_slot: int,
    excluded: Excluded,
) -> int:
    """Count the slots ``group`` has before any simulated release."""
    if group == ("node", node.ordinal):
        return 0 if node.full else node.free_whole // per_slot
    if group == ("domain", node.pool.ordinal, node.domain.ordinal):
        members = [n for n in node.domain.nodes if n.schedulable and n.ordinal not in excluded]
        return sum(n.free_whole // per_slot for n in members)
    total = 0
    for pool in pools:
        if pool.nodes and group_of(pool.nodes[0]) == group:
            for free in range(per_slot, len(pool.buckets)):
                total += len(pool.buckets[free]) * (free // per_slot)
    for ordinal in excluded:
        other = fleet.nodes[ordinal]
        if other.schedulable and group_of(other) == group:
            total -= other.free_whole // per_slot
    return total


def _pick_nodes(
    fleet: Fleet,
    group: Hashable,
    group_of: Callable[[NodeRecord], Hashable],
    simulated: dict[int, list[int]],
    pools: Sequence[Pool],
    per_slot: int,
    excluded: Excluded,
) -> list[int]:
    """Return node ordinals of ``group``, one per slot, emptiest first at the reserved time."""
    chosen: list[tuple[int, int]] = []
    for ordinal, used in simulated.items():
        node = fleet.nodes[ordinal]
        if group_of(node) == group:
            for _ in range(used.count(0) // per_slot):
                chosen.append((-used.count(0), ordinal))
    chosen.sort()
    ordinals = [ordinal for _, ordinal in chosen]
    for pool in pools:
        for node in emptiest_first(fleet, pool, per_slot, excluded):
            if node.ordinal not in simulated and group_of(node) == group:
                ordinals.extend([node.ordinal] * (node.free_whole // per_slot))
    return ordinals
