"""Pass steps that act on running jobs: shrinking pools, repairing gangs, preempting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from scheduler.engine.decisions import (
    Cause,
    Claim,
    Preempt,
    ReplaceTask,
    Requeue,
    TaskPlacement,
)
from scheduler.engine.fleet import TENTATIVE_OWNER, NodeRecord, Pool
from scheduler.engine.placement import (
    Excluded,
    TaskPlan,
    best_fit_share,
    emptiest_first,
    fill_nodes,
)
from scheduler.engine.preemption import grace_deadline, priority_victims, shrink_victims
from scheduler.engine.records import JobRecord
from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, PriorityClass, Topology

if TYPE_CHECKING:
    from scheduler.engine.cycle import PassState


def apply_caps(state: PassState) -> tuple[object, ...]:
    """Set every pool's caps for ``now``; return them, so a pass can tell they changed."""
    engine = state.engine
    caps = []
    for pool in engine.fleet.pools.values():
        cap = engine.capacity.cap(pool, state.now)
        pool.cap_millis = cap.placement_millis
        pool.protected_millis = cap.protected_millis
        pool.pledge_millis = cap.pledge_millis
        pool.recall_id = cap.recall_id
        caps.append((cap.placement_millis, cap.pledge_millis, cap.recall_id))
    return tuple(caps)


def shrink_pools(state: PassState) -> None:
    """Preempt running jobs over a recalled or ended pledge.

    Each step of :meth:`CapacityPlan.shrink_steps` stops what its cap requires by its deadline,
    beyond what earlier steps already stop.
    """
    engine = state.engine
    for pool in engine.fleet.pools.values():
        steps = engine.capacity.shrink_steps(pool, state.now)
        if not steps:
            continue
        stopping_jobs = [engine.jobs[j] for j in pool.jobs if engine.jobs[j].stopping]
        stopping = sum(_pool_millis(record, pool) for record in stopping_jobs)
        for step in steps:
            over = pool.used_millis - stopping - step.pledge_millis
            if over > 0:
                # Shares fenced until the stops of a requeued attempt are confirmed are on
                # their way out too, like those of the stopping jobs.
                over -= _fenced_millis(pool, {record.owner for record in stopping_jobs})
            if over <= 0:
                continue
            if step.recall_id:
                cause, cause_id = Cause.PROVIDER_RECALL, step.recall_id
            else:
                cause, cause_id = Cause.PLEDGE_ENDED, pool.name
            for victim in shrink_victims(pool, over, engine.jobs, (cause, cause_id)):
                deadline = max(
                    step.deadline,
                    grace_deadline(victim, state.now, engine.config.preemption_grace_s),
                )
                _preempt(state, victim, cause, cause_id, deadline)
                stopping_jobs.append(victim)
                stopping += _pool_millis(victim, pool)


def _pool_millis(record: JobRecord, pool: Pool) -> int:
    """Return the millis ``record``'s tasks hold on ``pool``."""
    return sum(
        allocation.millis * len(allocation.indices)
        for allocation in (record.tasks or {}).values()
        if allocation.node.pool is pool
    )


def _fenced_millis(pool: Pool, counted: set[str]) -> int:
    """Return the millis fenced on ``pool``'s nodes for owners not in ``counted``."""
    total = 0
    for node in pool.nodes:
        for owner in node.fenced:
            if owner in counted:
                continue
            for index in node.jobs.get(owner, ()):
                total += node.owners[index].get(owner, 0)
    return total


def _preempt(
    state: PassState, victim: JobRecord, cause: Cause, cause_id: str, deadline: float
) -> None:
    victim.stopping = True
    victim.stop_deadline = deadline
    victim.preempted_by.add((cause, cause_id))
    state.decisions.append(Preempt(victim.job_id, cause, cause_id, deadline))


def preempt_for(state: PassState, record: JobRecord, pools: tuple[Pool, ...]) -> list[str]:
    """Preempt preemptible jobs so that ``record`` fits later; return the victims."""
    engine = state.engine
    fleet = engine.fleet
    spec = record.spec

    def nodes(skip: Excluded) -> Iterator[NodeRecord]:
        for pool in pools:
            for ordinal in pool.preemptible_nodes:
                found = fleet.nodes[ordinal]
                # A node at its job limit counts too: stopping its victims frees a job slot.
                if found.up and not found.busy and ordinal not in skip:
                    yield found

    # The nodes of the reservations the job must avoid, other preemptors' among them, are kept
    # for those jobs. So no victim is chosen there, and their free room does not count.
    avoided = state.excluded_prefix[state.reservations_to_avoid(spec)]
    reserved_ordinals = avoided | state.preemptor_nodes()
    reserved = [fleet.nodes[ordinal] for ordinal in sorted(reserved_ordinals)]
    victims = None
    if spec.avoid_nodes:
        # Prefer victims off the nodes the job avoids, because its placement tries those first.
        skip = state.avoided(spec) | reserved_ordinals
        victims = priority_victims(spec, pools, nodes(skip), engine.jobs, state.now, reserved)
    if not victims:
        victims = priority_victims(
            spec, pools, nodes(reserved_ordinals), engine.jobs, state.now, reserved
        )
    if not victims:
        return []
    for job_id in victims:
        victim = engine.jobs[job_id]
        if victim.stopping:
            # An earlier decision stops it already, so the job only starts to wait for it.
            state.decisions.append(Claim(job_id, record.job_id))
            continue
        deadline = grace_deadline(victim, state.now, engine.config.preemption_grace_s)
        _preempt(state, victim, Cause.PRIORITY, record.job_id, deadline)
    record.awaiting_victims = frozenset(victims)
    return victims


def repair_broken(state: PassState) -> None:
    """Replace the lost tasks of broken gangs in place, or requeue them whole."""
    engine = state.engine
    broken = sorted(
        (engine.jobs[j] for j in engine.broken if j in engine.jobs), key=lambda r: r.sequence
    )
    engine.broken.clear()
    for record in broken:
        if record.tasks is None:
            continue
        spec = record.spec
        if record.hardware_fault is not None:
            # Never repaired in place: the task on the failed accelerator lost its work, so
            # the gang restarts together from its last checkpoint. Each of its tasks, the one
            # on the failed accelerator too, may run until its agent confirms the stop, so
            # every share stays fenced until then.
            _fence_shares(record)
            event_id, message = record.hardware_fault
            engine._requeue(record, f"requeued: {message}")
            state.decisions.append(
                Requeue(spec.job_id, Cause.ACCELERATOR_FAILURE, message, event_id)
            )
            continue
        if not record.lost:
            continue
        if record.stopping:
            _fence_shares(record)
        plans = None
        # Task 0's node is the rendezvous host that every other task connects to, so a gang
        # that lost it restarts whole at a new rendezvous.
        rendezvous_lost = 0 in record.lost
        if (
            not record.stopping
            and not rendezvous_lost
            and len(record.lost) < spec.task_count
            and spec.topology is not Topology.SAME_NODE
        ):
            plans = _plan_replacements(state, record)
        if plans is None:
            by_id = engine.fleet.by_id
            names = {by_id[n].spec.name if n in by_id else n for n in record.lost_nodes.values()}
            lost_nodes = ",".join(sorted(names))
            if record.stopping:
                message = f"lost task(s) on node {lost_nodes} while it stopped"
            elif rendezvous_lost:
                message = f"lost task 0, the rendezvous host, on node {lost_nodes}"
                _fence_shares(record)
            else:
                message = f"lost task(s) on node {lost_nodes} and found no replacement"
                _fence_shares(record)
            engine._requeue(record, f"requeued: {message}")
            state.decisions.append(Requeue(spec.job_id, Cause.NODE_FAILURE, message))
            continue
        for plan in plans:
            lost_node = record.lost_nodes[plan.task_index]
            if spec.priority is PriorityClass.PREEMPTIBLE:
                engine._forget_preemptible(record.tasks[plan.task_index].node)
            engine._allocate_task(record, plan)
            placement = TaskPlacement(
                plan.task_index,
                plan.node.spec.node_id,
                tuple(plan.node.spec.accelerator_ids[i] for i in plan.indices),
                plan.millis,
            )
            state.decisions.append(ReplaceTask(spec.job_id, placement, lost_node))
        record.lost.clear()
        record.lost_nodes.clear()


def _fence_shares(record: JobRecord) -> None:
    """Fence every share of a job about to be requeued, so that its requeue frees none of them.

    Its tasks on nodes still up get stop commands (or already got them, when it was stopping)
    and may still run until their agents confirm. So each node's shares stay until
    TasksStopped for the job there, as they do on an unknown node. A node that already
    released them (down, or drained with eviction) is left as it is.
    """
    assert record.tasks is not None
    owner = record.owner
    for allocation in record.tasks.values():
        node = allocation.node
        if owner in node.jobs:
            node.fenced.add(owner)


def _plan_replacements(state: PassState, record: JobRecord) -> list[TaskPlan] | None:
    spec = record.spec
    assert record.tasks is not None
    fleet = state.engine.fleet
    survivor = next(h for i, h in sorted(record.tasks.items()) if i not in record.lost)
    lost = sorted(record.lost)
    _, candidates = state.candidate_pools(spec)
    if spec.topology is Topology.SAME_REGION:
        pools = [survivor.node.pool]
    elif spec.allow_cross_provider:
        pools = [p for p in candidates if p.model == survivor.node.pool.model]
    else:
        pools = [
            p
            for p in candidates
            if p.key[0] == survivor.node.pool.provider and p.model == survivor.node.pool.model
        ]
    if spec.fractional:
        plans: list[TaskPlan] = []
        for task in lost:
            found = best_fit_share(fleet, pools, spec.millis_per_task, frozenset())
            if found is None:
                break
            plans.append(TaskPlan(task, found[0], (found[1],), spec.millis_per_task))
            fleet.allocate(found[0], found[1], TENTATIVE_OWNER, spec.millis_per_task)
        for node in {p.node.ordinal: p.node for p in plans}.values():
            fleet.release_job(node, TENTATIVE_OWNER)
        return plans if len(plans) == len(lost) else None
    per_task = spec.accelerators_per_task
    if spec.topology is Topology.SAME_INTERCONNECT_DOMAIN:
        nodes = sorted(
            (n for n in survivor.node.domain.nodes if n.schedulable),
            key=lambda n: (-n.free_whole, n.ordinal),
        )
        found_plans = fill_nodes(nodes, len(lost), per_task)
    else:
        found_plans = []
        for pool in pools:
            if len(found_plans) == len(lost):
                break
            if pool.available_millis() < per_task * MILLIS_PER_ACCELERATOR:
                continue
            remaining = len(lost) - len(found_plans)
            found_plans.extend(
                fill_nodes(
                    emptiest_first(fleet, pool, per_task, frozenset()),
                    remaining,
                    per_task,
                    len(found_plans),
                )
            )
    if len(found_plans) < len(lost):
        return None
    return [
        TaskPlan(lost[i], plan.node, plan.indices, plan.millis)
        for i, plan in enumerate(found_plans)
    ]
