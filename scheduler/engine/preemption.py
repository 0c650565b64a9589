"""Choosing which running jobs to preempt, for a higher class or for a shrinking pool.

A job is never chosen twice for the same cause (the same preempting job, recall or pledge),
and a job that already has a preemption decision is not chosen again, so preemption cannot
loop.

Priority preemption stops as few preemptible jobs as it needs, the cheapest first. A set of
victims costs, compared in this order: the jobs placed through an advance reservation on
protected capacity, the accelerator-seconds lost by victims that cannot checkpoint (their
current attempt so far), the number of victims, and the accelerator-seconds run by
checkpointable victims, which save their work within the grace period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.engine.decisions import Cause
from scheduler.engine.fleet import Domain, NodeRecord, Pool
from scheduler.engine.placement import Excluded
from scheduler.engine.records import JobRecord, job_of
from scheduler.engine.spec import JobSpec, PriorityClass, Topology

Cost = tuple[int, int, int, int]
"""Cost of stopping jobs: protected jobs, milli-accelerator-seconds lost by jobs that cannot
checkpoint, jobs stopped, milli-accelerator-seconds run by checkpointable jobs. Tuples add
element by element and compare in order."""

_NO_COST: Cost = (0, 0, 0, 0)

MAX_OPTIONS = 64
"""Nodes with room to win that one preemption search compares, so a search stays bounded.

NOTE: the search compares the first ``MAX_OPTIONS`` nodes where stopping preemptible jobs
wins room, taking pools in candidate order and each pool's nodes in the order they began
running preemptible tasks (since they last ran none). It picks the cheapest victims among
those nodes only, so a cheaper node beyond them is not considered. A gang spread over nodes
takes them cheapest per slot first, and from the last one only the slots still missing,
which is cheap but not always the cheapest combination.
"""


@dataclass(frozen=True, slots=True)
class _Offer:
    """The cheapest victims on one node for each count of extra task slots it can win."""

    node: NodeRecord
    levels: tuple[tuple[Cost, frozenset[str]], ...]
    """``levels[k - 1]``: the cost and victims that win ``k`` slots beyond the usable ones."""

    def per_slot(self) -> tuple[tuple[float, ...], int]:
        """Return the sort key of the cost per slot when the node gives all it can."""
        cost, _ = self.levels[-1]
        slots = len(self.levels)
        return tuple(part / slots for part in cost), self.node.ordinal


def shrink_victims(
    pool: Pool,
    over_millis: int,
    jobs: Mapping[str, JobRecord],
    cause: tuple[Cause, str],
) -> list[JobRecord]:
    """Pick running jobs of ``pool`` to free at least ``over_millis`` there.

    Preemptible jobs go first, then standard, then interactive; jobs placed through an
    advance reservation on protected capacity go last; the most recently started first. A job
    picked in that order is then spared when the jobs picked after it free enough without it.
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
    freed = 0
    victims: list[tuple[JobRecord, int]] = []
    for *_, record, millis in candidates:
        if freed >= over_millis:
            break
        victims.append((record, millis))
        freed += millis
    # The last victim is needed. The others are checked from the costliest to stop down, so
    # the jobs spared are those that cost most to stop.
    spared: set[int] = set()
    for index in range(len(victims) - 2, -1, -1):
        millis = victims[index][1]
        if freed - millis >= over_millis:
            freed -= millis
            spared.add(index)
    return [record for index, (record, _) in enumerate(victims) if index not in spared]


def stop_cost(record: JobRecord, now: float) -> Cost:
    """Return what stopping ``record`` at ``now`` costs (see :data:`Cost`)."""
    start = record.start if record.start is not None else now
    run = int(record.spec.total_millis * max(0.0, now - start))
    if record.spec.checkpointable:
        return (int(record.protected), 0, 1, run)
    return (int(record.protected), run, 1, 0)


def _add(left: Cost, right: Cost) -> Cost:
    return (left[0] + right[0], left[1] + right[1], left[2] + right[2], left[3] + right[3])


def _classify_owner(owner: str, jobs: Mapping[str, JobRecord], cause: tuple[Cause, str]) -> int:
    """Classify an owner of accelerators: 1 if its job may be stopped for ``cause``, 0 if the
    share is already leaving, -1 if it stays."""
    record = jobs.get(job_of(owner))
    if record is None or record.spec.priority is not PriorityClass.PREEMPTIBLE:
        return -1
    # The fenced share of an earlier attempt stays until its stop is confirmed, and no
    # preemption of the job's current attempt (pending, or running elsewhere) frees it.
    if record.tasks is None or owner != record.owner:
        return -1
    if record.stopping:
        return 0
    return -1 if cause in record.preempted_by else 1


def _node_units(
    node: NodeRecord, jobs: Mapping[str, JobRecord], cause: tuple[Cause, str]
) -> tuple[int, list[tuple[int, frozenset[str]]]]:
    """Return the accelerators of ``node`` that are free or leaving, and its units.

    A unit is a set of jobs to stop together and the accelerators that stopping them frees:
    one job for whole accelerators, or the jobs that share accelerators with each other.
    """
    have = 0
    kinds: dict[str, int] = {}
    group_of: dict[str, int] = {}
    groups: list[set[str]] = []
    freed: list[int] = []
    failed = node.failed
    for index, owners in enumerate(node.owners):
        # Stopping the jobs on a failed accelerator frees nothing that can be placed.
        if index in failed:
            continue
        victims: set[str] = set()
        for owner in owners:
            kind = kinds.get(owner)
            if kind is None:
                kind = kinds[owner] = _classify_owner(owner, jobs, cause)
            if kind < 0:
                break
            if kind > 0:
                victims.add(owner)
        else:
            if not victims:
                have += 1
            elif len(victims) == 1 and (owner := next(iter(victims))) in group_of:
                # The common case: another accelerator of a whole-accelerator job.
                freed[group_of[owner]] += 1
            else:
                _merge(victims, group_of, groups, freed)
    units = [
        (freed[g], frozenset(job_of(owner) for owner in groups[g]))
        for g in range(len(groups))
        if groups[g]
    ]
    return have, units


def _merge(
    victims: set[str], group_of: dict[str, int], groups: list[set[str]], freed: list[int]
) -> None:
    """Add one freeable accelerator owned by ``victims`` (owner ids) to the groups of owners
    that share accelerators, merging the groups it joins."""
    found = sorted({group_of[v] for v in victims if v in group_of})
    if not found:
        target = len(groups)
        groups.append(set())
        freed.append(0)
    else:
        target = found[0]
        for other in found[1:]:
            for member in groups[other]:
                group_of[member] = target
            groups[target] |= groups[other]
            freed[target] += freed[other]
            groups[other] = set()
            freed[other] = 0
    for owner in victims:
        group_of[owner] = target
    groups[target] |= victims
    freed[target] += 1


def _cheapest_covers(
    units: Sequence[tuple[int, frozenset[str], Cost]], deficits: Sequence[int]
) -> list[tuple[Cost, frozenset[str]]]:
    """Return, for each of the non-decreasing ``deficits``, the cheapest units that free at least
    that many accelerators. No deficit may exceed what all ``units`` free together.

    This is a 0/1 covering knapsack. It takes O(units x largest deficit) steps, and a node has
    at most one unit per accelerator.
    """
    cap = deficits[-1]
    best: list[tuple[Cost, tuple[int, ...]] | None] = [None] * (cap + 1)
    best[0] = (_NO_COST, ())
    for number, (size, _, cost) in enumerate(units):
        # Downwards, so each unit is counted at most once.
        for reached in range(cap, -1, -1):
            entry = best[reached]
            if entry is None:
                continue
            target = min(cap, reached + size)
            candidate = _add(entry[0], cost)
            current = best[target]
            if current is None or candidate < current[0]:
                best[target] = (candidate, (*entry[1], number))
    # Freeing more than a deficit also covers it.
    for reached in range(cap - 1, -1, -1):
        entry, above = best[reached], best[reached + 1]
        if above is not None and (entry is None or above[0] < entry[0]):
            best[reached] = above
    covers = []
    for deficit in deficits:
        entry = best[deficit]
        assert entry is not None
        covers.append((entry[0], frozenset().union(*(units[n][1] for n in entry[1]))))
    return covers


def _usable_whole(node: NodeRecord) -> int:
    """Return the free whole accelerators a new job could get on ``node`` now: none while the
    node runs as many jobs as it may, because then it takes no other job."""
    return 0 if node.full else node.free_whole


def _node_offer(
    node: NodeRecord,
    size: int,
    max_slots: int,
    jobs: Mapping[str, JobRecord],
    cause: tuple[Cause, str],
    costs: dict[str, Cost],
    now: float,
) -> _Offer | None:
    """Find the cheapest victims on ``node`` for 1..``max_slots`` extra slots of ``size``
    accelerators; ``None`` when stopping its preemptible jobs wins no slot."""
    have, units = _node_units(node, jobs, cause)
    if not units:
        return None
    priced = []
    for size_freed, victims in units:
        cost = _NO_COST
        for victim in sorted(victims):
            if victim not in costs:
                costs[victim] = stop_cost(jobs[victim], now)
            cost = _add(cost, costs[victim])
        priced.append((size_freed, victims, cost))
    priced.sort(key=lambda unit: (unit[2], sorted(unit[1])))
    total = sum(unit[0] for unit in priced)
    base = _usable_whole(node) // size
    deficits: list[int] = []
    for slots in range(1, max_slots + 1):
        # At least one victim: room that is only leaving is not this search's to win, and
        # on a node at its job limit a stop is what frees a job slot.
        deficit = max(1, (base + slots) * size - have)
        if deficit > total:
            break
        deficits.append(deficit)
    if not deficits:
        return None
    levels = _cheapest_covers(priced, deficits)
    return _Offer(node, tuple(levels))


def priority_victims(
    job: JobSpec,
    pools: Sequence[Pool],
    nodes_of: Iterable[NodeRecord],
    jobs: Mapping[str, JobRecord],
    now: float,
    reserved: Sequence[NodeRecord] = (),
) -> list[str] | None:
    """Pick the cheapest preemptible jobs whose stop lets ``job`` (of a higher class) fit.

    ``nodes_of`` are the up nodes of ``pools`` that run preemptible jobs. The free room of the
    ``reserved`` nodes is kept for other jobs, so it does not count. Returns victim job ids, or
    ``None`` when stopping every preemptible job there would still not be enough.
    """
    cause = (Cause.PRIORITY, job.job_id)
    per_task = job.accelerators_per_task
    single = job.task_count == 1 or job.topology is Topology.SAME_NODE
    size = per_task * (job.task_count if single else 1)
    max_slots = 1 if single else job.task_count
    costs: dict[str, Cost] = {}
    offers: list[_Offer] = []
    for node in nodes_of:
        if len(offers) >= MAX_OPTIONS:
            break
        offer = _node_offer(node, size, max_slots, jobs, cause, costs, now)
        if offer is not None:
            offers.append(offer)
    if not offers:
        return None
    if single:
        cheapest = min(offers, key=lambda o: (o.levels[0][0], o.node.ordinal))
        return sorted(cheapest.levels[0][1])
    offers.sort(key=_Offer.per_slot)
    reserved_ordinals = frozenset(node.ordinal for node in reserved)
    if job.topology is Topology.SAME_INTERCONNECT_DOMAIN:
        return _domain_victims(job, pools, offers, costs, reserved_ordinals)
    free_slots = sum(
        sum(len(pool.buckets[f]) * (f // per_task) for f in range(per_task, len(pool.buckets)))
        for pool in pools
    )
    free_slots -= sum(
        node.free_whole // per_task for node in reserved if node.schedulable and node.pool in pools
    )
    chosen = _fill(offers, free_slots, job.task_count)
    return sorted(chosen) if chosen is not None else None


def _fill(offers: Sequence[_Offer], slots: int, needed: int) -> set[str] | None:
    """Take slots from ``offers`` in order, beyond ``slots`` free ones, until ``needed`` are
    reached, and from each node only the slots still missing.

    Returns the victims, or ``None`` when all offers together are not enough.
    """
    chosen: set[str] = set()
    for offer in offers:
        if slots >= needed:
            break
        take = min(len(offer.levels), needed - slots)
        chosen |= offer.levels[take - 1][1]
        slots += take
    return chosen if slots >= needed else None


def _domain_victims(
    job: JobSpec,
    pools: Sequence[Pool],
    offers: Sequence[_Offer],
    costs: Mapping[str, Cost],
    reserved: Excluded,
) -> list[str] | None:
    """Pick the victims for a gang bound to one interconnect domain, all inside one domain.

    Each domain is filled from its free slots off the ``reserved`` nodes, then from its nodes
    cheapest per slot (``offers`` is sorted that way). The domain where the gang fits for the
    cheapest victims wins, and the first found on a tie.
    """
    per_task = job.accelerators_per_task
    by_domain: dict[Domain, list[_Offer]] = {}
    for offer in offers:
        if offer.node.pool in pools:
            by_domain.setdefault(offer.node.domain, []).append(offer)
    best: tuple[Cost, list[str]] | None = None
    for domain, domain_offers in by_domain.items():
        slots = sum(
            n.free_whole // per_task
            for n in domain.nodes
            if n.schedulable and n.ordinal not in reserved
        )
        chosen = _fill(domain_offers, slots, job.task_count)
        if chosen is None:
            continue
        cost = _NO_COST
        for victim in chosen:
            cost = _add(cost, costs[victim])
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
