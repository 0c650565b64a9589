"""One scheduling pass: caps, shrinking pools, repairs, then the queue in order.

The queue is served class by class (interactive, standard, preemptible) and, inside a class,
project by project in hierarchical fair-share order, each project's jobs first come first
served. Capacity only shrinks while the queue is served, so a job shape that found no room
once in a pass is not searched again. The cache key includes the reservations the job must
respect.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from scheduler.engine.decisions import (
    Decision,
    Place,
    ReasonCode,
    Reserve,
    ScheduleResult,
    TaskPlacement,
    Waiting,
    new_waiting,
)
from scheduler.engine.engine import Engine, QueueKey
from scheduler.engine.fleet import TENTATIVE_OWNER, Pool
from scheduler.engine.ordering import QueueItem, ShareOrder
from scheduler.engine.placement import (
    Excluded,
    TaskPlan,
    best_fit_share,
    plan_domain,
    plan_same_node,
    plan_spread,
    topology_groups,
)
from scheduler.engine.preemptor_reservations import (
    claim_victims,
    forget_stopped_victims,
    outranks_preemptors,
    place_on_reservation,
    reserve_for_preemptors,
    reserve_for_victims,
)
from scheduler.engine.reasons import at, budget_message, capacity_reason, no_pool_message
from scheduler.engine.records import JobRecord
from scheduler.engine.repair import apply_caps, preempt_for, repair_broken, shrink_pools
from scheduler.engine.reservations import Reservation, earliest_start
from scheduler.engine.shapes import JobShape
from scheduler.engine.spec import JobSpec, LimitScope, PriorityClass, Topology

RESERVATION_TRIES = 4
"""Reservation searches per pass, per reservation the pass may make."""
_CAPACITY_REASONS = frozenset(
    {ReasonCode.NO_CAPACITY, ReasonCode.FAIR_SHARE, ReasonCode.PRIORITY, ReasonCode.TOPOLOGY}
)


@dataclass
class PassState:
    engine: Engine
    now: float
    decisions: list[Decision] = field(default_factory=list)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    reservations: list[Reservation] = field(default_factory=list)
    """Sorted by start time."""
    reservation_starts: list[float] = field(default_factory=list)
    queue_reservations: int = 0
    reservation_tries: int = 0
    reserving: bool = True
    """False once this pass may make no more queue reservations."""
    avoid_counts: dict[float | None, int] = field(default_factory=dict)
    """Wall-time limit -> :meth:`reservations_to_avoid`, until the reservations change."""
    excluded_prefix: list[Excluded] = field(default_factory=lambda: [frozenset()])
    """``excluded_prefix[n]``: nodes of the ``n`` earliest reservations."""
    pass_id: int = 0
    """Stamps :attr:`JobShape.preemption_failed_pass`; unique per pass."""
    epoch: int = 0
    """Stamps :attr:`JobShape.failed`; renewed by every new reservation."""
    placed_classes: dict[int, PriorityClass] = field(default_factory=dict)
    """Pool ordinal -> highest class placed there in this pass."""
    charged: dict[str, float] = field(default_factory=dict)
    group_cache: dict[tuple[int, Topology, bool], tuple[tuple[Pool, ...], list[list[Pool]]]] = (
        field(default_factory=dict)
    )
    """Groups of candidate pools per pool tuple, topology and cross-provider flag."""
    preemptions_left: int = 0
    preemptor_reservations: dict[str, Reservation] = field(default_factory=dict)
    """Preemptor job id -> the reservation that keeps the room of its victims for it."""
    previous_preemptor_reservations: dict[str, Reservation] = field(default_factory=dict)
    """:attr:`preemptor_reservations` of the last pass, read only."""

    # Pools and exclusions.

    def candidate_pools(self, spec: JobSpec) -> tuple[tuple[object, ...], tuple[Pool, ...]]:
        """Return the cache key and the pools of accepted models in allowed regions."""
        return self.engine.shapes.candidate_pools(spec)

    def reservations_to_avoid(self, spec: JobSpec) -> int:
        """Count the reservations a job would delay, the earliest first.

        A job may use a reservation's nodes only if its wall-time limit ends before the
        reservation starts; ``excluded_prefix[count]`` are the nodes it must avoid.
        """
        end = math.inf if spec.wall_time_s is None else self.now + spec.wall_time_s
        return bisect.bisect_left(self.reservation_starts, end)

    def add_reservation(self, reservation: Reservation, *, announce: bool = True) -> None:
        """Make later jobs avoid ``reservation``; ``announce`` adds a :class:`Reserve`."""
        self.reservations.append(reservation)
        self._reservations_changed()
        if announce:
            nodes = self.engine.fleet.nodes
            node_ids = tuple(sorted(nodes[o].spec.node_id for o in reservation.nodes))
            self.decisions.append(Reserve(reservation.job_id, reservation.start, node_ids))

    def remove_reservation(self, reservation: Reservation) -> None:
        self.reservations.remove(reservation)
        self._reservations_changed()

    def _reservations_changed(self) -> None:
        self.reservations.sort(key=lambda r: (r.start, r.job_id))
        self.reservation_starts = [r.start for r in self.reservations]
        prefix: list[Excluded] = [frozenset()]
        for r in self.reservations:
            prefix.append(prefix[-1] | r.nodes)
        self.excluded_prefix = prefix
        # The nodes jobs must avoid changed, so earlier failed searches no longer apply.
        self.epoch = self.engine.shapes.next_epoch()
        self.avoid_counts.clear()

    def preemptor_nodes(self) -> Excluded:
        """Return the ordinals of the nodes reserved for preemptors in this pass."""
        reservations = self.preemptor_reservations.values()
        return frozenset().union(*(reservation.nodes for reservation in reservations))

    # Planning.

    def plan(
        self, spec: JobSpec, pools: tuple[Pool, ...], excluded: Excluded, *, avoid: bool = False
    ) -> list[TaskPlan] | None:
        """Plan ``spec`` on ``pools`` off the ``excluded`` nodes and, with ``avoid``, off the
        nodes the job avoids."""
        if avoid and spec.avoid_nodes:
            excluded = excluded | self.avoided(spec)
        fleet = self.engine.fleet
        if spec.fractional:
            return self._plan_fractional(spec, pools, excluded)
        if spec.task_count == 1 or spec.topology is Topology.SAME_NODE:
            return plan_same_node(fleet, spec, pools, excluded)
        if spec.topology is Topology.SAME_INTERCONNECT_DOMAIN:
            return plan_domain(fleet, spec, pools, excluded)
        return plan_spread(fleet, spec, self.groups(spec, pools), excluded)

    def avoided(self, spec: JobSpec) -> Excluded:
        """Return the ordinals of the fleet's nodes that ``spec`` avoids.

        Placement, preemption and reservations try without them first and fall back to them,
        so a job starts on a node it avoids rather than wait longer.
        """
        by_id = self.engine.fleet.by_id
        return frozenset(by_id[n].ordinal for n in spec.avoid_nodes if n in by_id)

    def groups(self, spec: JobSpec, pools: tuple[Pool, ...]) -> list[list[Pool]]:
        """Return :func:`topology_groups`, computed once per pass for the same pools."""
        key = (id(pools), spec.topology, spec.allow_cross_provider)
        found = self.group_cache.get(key)
        if found is None:
            # The entry keeps ``pools`` alive, so its id stays unique for the pass.
            found = (pools, topology_groups(spec, pools))
            self.group_cache[key] = found
        return found[1]

    def _plan_fractional(
        self, spec: JobSpec, pools: tuple[Pool, ...], excluded: Excluded
    ) -> list[TaskPlan] | None:
        fleet = self.engine.fleet
        if spec.task_count == 1:
            found = best_fit_share(fleet, pools, spec.millis_per_task, excluded)
            if found is None:
                return None
            return [TaskPlan(0, found[0], (found[1],), spec.millis_per_task)]
        for group in self.groups(spec, pools):
            plans: list[TaskPlan] = []
            for task in range(spec.task_count):
                found = best_fit_share(fleet, group, spec.millis_per_task, excluded)
                if found is None:
                    break
                fleet.allocate(found[0], found[1], TENTATIVE_OWNER, spec.millis_per_task)
                plans.append(TaskPlan(task, found[0], (found[1],), spec.millis_per_task))
            for node in {plan.node.ordinal: plan.node for plan in plans}.values():
                fleet.release_job(node, TENTATIVE_OWNER)
            if len(plans) == spec.task_count:
                return plans
        return None

    # Serving one job.

    def try_job(self, record: JobRecord) -> bool:
        """Place ``record`` or record why it waits; return whether it was placed.

        Every job of a shape that already failed in this pass takes the short path: a few
        attribute reads, one dictionary lookup and its :class:`Waiting`.
        """
        spec = record.spec
        engine = self.engine
        if engine.no_budget:
            budget_key = (spec.project, spec.payer)
            ceiling = engine.no_budget.get(budget_key)
            if ceiling is not None and spec.budget_size >= ceiling:
                block = engine.budget_blocks.get(budget_key)
                return self.wait(record, ReasonCode.BUDGET, budget_message(block, spec.job_id))
        shape = record.shape
        assert shape is not None
        if shape.pools_version == engine.fleet.version:
            pools = shape.pools
        else:
            pools = engine.shapes.pools_of(shape, spec)
        if not pools:
            return self.wait(
                record,
                ReasonCode.NO_MATCHING_MODEL,
                no_pool_message(spec, engine.fleet.pools.values()),
            )
        if engine.limits:
            blocked = self.limit_blocking(spec)
            if blocked:
                return self.wait(record, ReasonCode.LIMIT, blocked)
        if record.awaiting_victims:
            jobs = engine.jobs
            record.awaiting_victims = frozenset(
                v for v in record.awaiting_victims if v in jobs and jobs[v].running
            )
        kept = self.preemptor_reservations.get(spec.job_id)
        if kept is not None:
            placed = place_on_reservation(self, record, pools, kept)
            if placed is not None:
                return placed
        count = 0
        if self.reservations:
            count = self.avoid_counts.get(spec.wall_time_s, -1)
            if count < 0:
                count = self.reservations_to_avoid(spec)
                self.avoid_counts[spec.wall_time_s] = count
        if shape.failed_epoch != self.epoch:
            shape.failed = {}
            shape.failed_epoch = self.epoch
        cached = shape.failed.get(count)
        if cached is None:
            excluded = self.excluded_prefix[count]
            plans = self.plan(spec, pools, excluded, avoid=True)
            if plans is None and spec.avoid_nodes:
                # The nodes a job avoids are a preference: the job starts there rather than wait.
                plans = self.plan(spec, pools, excluded)
            if plans is not None:
                self.place(record, plans)
                return True
            cached = self.explain(spec, pools, count)
            shape.failed[count] = cached
        code, message = cached
        # A job that awaits its victims keeps their room whatever the reason it did not fit
        # now, e.g. room that another job's reservation covers.
        if record.awaiting_victims or (
            code in _CAPACITY_REASONS and (self.reserving or self.preemptions_left > 0)
        ):
            return self.wait_for_capacity(record, shape, pools, code, message)
        return self.wait(record, code, message)

    def known_wait(self, record: JobRecord, spec: JobSpec) -> tuple[ReasonCode, str] | None:
        """Return the reason a job waits when try_job() would only repeat a failed search.

        That is the case when the job's shape failed in this pass with the same reservations
        to avoid, the job awaits no victims, and the failure leaves no preemption or
        reservation to try. The caller has checked that no budget block or limit applies.
        """
        shape = record.shape
        assert shape is not None
        if shape.failed_epoch != self.epoch or record.awaiting_victims:
            return None
        if spec.job_id in self.preemptor_reservations:
            return None
        count = self.avoid_counts.get(spec.wall_time_s, -1) if self.reservations else 0
        cached = shape.failed.get(count)
        if cached is None:
            return None
        if cached[0] in _CAPACITY_REASONS:
            if self.reserving:
                return None
            if (
                self.preemptions_left > 0
                and spec.priority > PriorityClass.PREEMPTIBLE
                and shape.preemption_failed_pass != self.pass_id
            ):
                return None
        return cached

    def wait_for_capacity(
        self,
        record: JobRecord,
        shape: JobShape,
        pools: tuple[Pool, ...],
        code: ReasonCode,
        message: str,
    ) -> bool:
        """Preempt or reserve for a job that found no room, within this pass's bounds."""
        if record.awaiting_victims:
            reserve_for_victims(self, record, pools)
            return self.wait_for_victims(record)
        if (
            self.preemptions_left > 0
            and record.spec.priority > PriorityClass.PREEMPTIBLE
            and shape.preemption_failed_pass != self.pass_id
        ):
            self.preemptions_left -= 1
            if claim_victims(self, record, pools):
                return self.wait_for_victims(record)
            victims = preempt_for(self, record, pools)
            if not victims:
                shape.preemption_failed_pass = self.pass_id
            else:
                self.engine.preemptors.add(record.job_id)
                reserve_for_victims(self, record, pools)
                return self.wait(
                    record,
                    ReasonCode.PRIORITY,
                    f"preempting {len(victims)} preemptible job(s) to make room",
                )
        if self.reserving:
            message = self.maybe_reserve(record, pools, message)
        return self.wait(record, code, message)

    def wait_for_victims(self, record: JobRecord) -> bool:
        count = len(record.awaiting_victims)
        return self.wait(
            record, ReasonCode.PRIORITY, f"waiting for {count} preempted job(s) to stop"
        )

    def explain(self, spec: JobSpec, pools: tuple[Pool, ...], count: int) -> tuple[ReasonCode, str]:
        if count and self.plan(spec, pools, frozenset()) is not None:
            first = self.reservations[0]
            return (
                ReasonCode.RESERVATION,
                f"starting now would delay the reservation of job {first.job_id} "
                f"from {at(first.start)}",
            )
        return capacity_reason(spec, pools, self.placed_classes)

    def maybe_reserve(self, record: JobRecord, pools: tuple[Pool, ...], message: str) -> str:
        """Reserve room for one of the first jobs that wait for capacity.

        The first ``reservation_depth`` successes end the search, and so do
        :data:`RESERVATION_TRIES` times as many tries, because each try replays running jobs.
        """
        depth = self.engine.config.reservation_depth
        if self.queue_reservations >= depth or self.reservation_tries >= depth * RESERVATION_TRIES:
            self.reserving = False
            return message
        self.reservation_tries += 1
        reservation = self.reserve(record.spec, pools, self.now)
        if reservation is None:
            return message
        self.queue_reservations += 1
        return f"{message}; reserved from {at(reservation.start)}"

    def reserve(
        self, spec: JobSpec, pools: tuple[Pool, ...], not_before: float
    ) -> Reservation | None:
        excluded = self.excluded_prefix[-1]
        reservation = earliest_start(
            self.engine.fleet, spec, pools, self._releases(pools), not_before, excluded
        )
        if reservation is not None and spec.avoid_nodes:
            # Take a reservation off the nodes the job avoids when it starts no later.
            elsewhere = earliest_start(
                self.engine.fleet,
                spec,
                pools,
                self._releases(pools),
                not_before,
                excluded | self.avoided(spec),
            )
            if elsewhere is not None and elsewhere.start <= reservation.start:
                reservation = elsewhere
        if reservation is not None:
            self.add_reservation(reservation)
        return reservation

    def _releases(self, pools: tuple[Pool, ...]) -> Iterator[tuple[float, JobRecord]]:
        """Yield running jobs of ``pools`` by expected end, each once."""
        seen: set[str] = set()
        jobs = self.engine.jobs
        for end, _, job_id in heapq.merge(*(pool.ends for pool in pools)):
            if job_id not in seen:
                seen.add(job_id)
                yield end, jobs[job_id]

    def limit_blocking(self, spec: JobSpec) -> str:
        engine = self.engine
        for scope, key in (
            (LimitScope.PROJECT, spec.project),
            (LimitScope.INSTITUTION, spec.institution),
        ):
            limit = engine.limits.get((scope, key))
            if limit is None:
                continue
            used = engine.in_use.get((scope, key), 0)
            if used + spec.total_millis > limit:
                return (
                    f"{scope} {key} limit is {limit / 1000:g} accelerators, {used / 1000:g} in "
                    f"use, the job needs {spec.total_millis / 1000:g}"
                )
        return ""

    def place(self, record: JobRecord, plans: list[TaskPlan]) -> None:
        engine = self.engine
        engine._commit(record, plans, self.now)
        spec = record.spec
        placed_classes = self.placed_classes
        tasks = []
        for plan in sorted(plans, key=lambda p: p.task_index):
            ordinal = plan.node.pool.ordinal
            placed = placed_classes.get(ordinal)
            if placed is None or placed < spec.priority:
                placed_classes[ordinal] = spec.priority
            node_spec = plan.node.spec
            ids = node_spec.accelerator_ids
            accelerators = tuple([ids[i] for i in plan.indices])
            tasks.append(
                TaskPlacement(plan.task_index, node_spec.node_id, accelerators, plan.millis)
            )
        self.decisions.append(Place(spec.job_id, tuple(tasks)))
        # Charge the job's expected decayed usage now, so that the next job of the same
        # project sorts behind its siblings inside this pass. finish() withdraws the charge.
        half_life = engine.config.half_life_s or 1.0
        horizon = min(spec.wall_time_s or half_life, half_life)
        charge = spec.total_millis * horizon
        engine.fair_share.charge(spec.project, charge)
        self.charged[spec.project] = self.charged.get(spec.project, 0.0) + charge

    def wait(self, record: JobRecord, code: ReasonCode, message: str) -> bool:
        if record.requeue_message:
            message = f"{record.requeue_message}; {message}"
        job_id = record.spec.job_id
        self.waiting[job_id] = new_waiting(job_id, code, message)
        return False

    # The queue.

    def serve_queue(self, only: list[str] | None = None) -> None:
        """Try every pending job (or those in ``only``) once, in class then fair-share order."""
        engine = self.engine
        snapshots: dict[QueueKey, list[QueueItem]]
        if only is None:
            snapshots = {key: queue.snapshot() for key, queue in engine.queues.items()}
        else:
            snapshots = {}
            for job_id in only:
                record = engine.jobs.get(job_id)
                if record is None or record.running:
                    continue
                spec = record.spec
                item = (spec.submit_time, record.sequence, record)
                snapshots.setdefault((spec.priority, spec.project), []).append(item)
            for items in snapshots.values():
                items.sort(key=lambda item: item[:2])
        for priority in sorted({key[0] for key in snapshots}, reverse=True):
            if only is None and engine.preemptors:
                reserve_for_preemptors(self, priority)
            queues = {key[1]: items for key, items in snapshots.items() if key[0] == priority}
            order = ShareOrder(engine.fair_share, queues)
            while (run := order.next_run()) is not None:
                queue, bound = run
                order.end_run(*self._serve_run(queue.items, queue.position, bound))

    def _serve_run(
        self, items: Sequence[QueueItem], position: int, bound: tuple[float, int] | None
    ) -> tuple[int, bool]:
        """Try a project's jobs from ``position`` on while they come first in the order.

        Stops after a placement (which changes the order), at the end of the queue, or at the
        first job that sorts at or after ``bound``. Returns the position after the last job
        tried and whether that job was placed.
        """
        try_job = self.try_job
        engine = self.engine
        # Without budget blocks and limits, a job whose shape already failed with the count of
        # reservations it must avoid waits for the same reason without calling try_job().
        shortcut = not engine.no_budget and not engine.limits
        end = len(items)
        while True:
            record = items[position][2]
            position += 1
            spec = record.spec
            if spec.start_at is None:
                reason = self.known_wait(record, spec) if shortcut else None
                if reason is not None:
                    self.wait(record, *reason)
                elif try_job(record):
                    return position, True
            if position == end:
                return position, False
            if bound is not None:
                submit, sequence, _ = items[position]
                if (submit, sequence) >= bound:
                    return position, False

    def serve_advance(self) -> None:
        """Place advance reservations that are due; reserve protected room for later ones."""
        engine = self.engine
        due = sorted(
            (engine.jobs[job_id] for job_id in engine.advance_jobs),
            key=lambda r: (r.spec.start_at, r.sequence),
        )
        for record in due:
            spec = record.spec
            assert spec.start_at is not None
            _, pools = self.candidate_pools(spec)
            protected = tuple(
                p
                for p in pools
                if p.protected_millis is None or p.protected_millis >= spec.total_millis
            )
            if spec.start_at <= self.now:
                plans = self.plan(spec, protected, self.excluded_prefix[-1]) if protected else None
                if plans is not None:
                    self.place(record, plans)
                    record.protected = True
                else:
                    code, message = self.explain(spec, protected or pools, 0)
                    self.wait(record, code, f"advance reservation is due; {message}")
                continue
            reservation = self.reserve(spec, protected, spec.start_at) if protected else None
            record.requeue_message = ""
            if reservation is None:
                self.wait(
                    record,
                    ReasonCode.RESERVATION,
                    f"advance reservation from {at(spec.start_at)} has no protected room yet",
                )
            else:
                self.wait(
                    record,
                    ReasonCode.RESERVATION,
                    f"advance reservation from {at(reservation.start)}",
                )

    def finish(self) -> ScheduleResult:
        for project, charge in sorted(self.charged.items()):
            self.engine.fair_share.charge(project, -charge)
        return ScheduleResult(self.now, tuple(self.decisions), tuple(self.waiting.values()))


@dataclass(frozen=True)
class LastPass:
    """State a pass leaves for the next one, which skips work when nothing was freed."""

    signature: tuple[object, ...]
    waiting: dict[str, Waiting]
    reservations: list[Reservation]
    excluded_prefix: list[Excluded]
    preemptor_reservations: dict[str, Reservation]


def _signature(engine: Engine, caps: tuple[object, ...]) -> tuple[object, ...]:
    fleet = engine.fleet
    return (fleet.freed, fleet.version, engine.changes, caps)


def run_pass(engine: Engine, now: float) -> ScheduleResult:
    """Run one pass.

    When nothing was freed, no event arrived and no cap changed since the last pass, every
    job that waited then would wait again. So only the jobs queued since are tried, and the
    others keep their reasons and the reservations stand. Jobs that the per-pass preemption
    bound skipped try again in the next full pass, which the next event brings.
    """
    epoch = engine.shapes.next_epoch()
    state = PassState(
        engine,
        now,
        pass_id=epoch,
        epoch=epoch,
        preemptions_left=engine.config.preemptions_per_pass,
    )
    caps = apply_caps(state)
    last = engine.last_pass
    # Advance reservations are served only by full passes: one that fell due, or a new one.
    due = any(
        (engine.jobs[job_id].spec.start_at or 0.0) <= now for job_id in engine.advance_jobs
    ) or bool(engine.advance_jobs and any(j in engine.advance_jobs for j in engine.new_jobs))
    # A new job of a higher class than a waiting preemptor must not avoid its room, because a
    # full pass serves that job before it reserves the room.
    incremental = (
        isinstance(last, LastPass)
        and last.signature == _signature(engine, caps)
        and not engine.broken
        and not due
        and not outranks_preemptors(engine, engine.new_jobs, last.preemptor_reservations)
    )
    if incremental:
        assert isinstance(last, LastPass)
        state.waiting = dict(last.waiting)
        state.reservations = list(last.reservations)
        state.reservation_starts = [r.start for r in state.reservations]
        state.excluded_prefix = list(last.excluded_prefix)
        state.preemptor_reservations = dict(last.preemptor_reservations)
        state.serve_queue(only=engine.new_jobs)
    else:
        if isinstance(last, LastPass):
            state.previous_preemptor_reservations = last.preemptor_reservations
        shrink_pools(state)
        repair_broken(state)
        state.serve_advance()
        forget_stopped_victims(state)
        state.serve_queue()
    engine.new_jobs = []
    result = state.finish()
    engine.last_pass = LastPass(
        _signature(engine, caps),
        state.waiting,
        state.reservations,
        state.excluded_prefix,
        state.preemptor_reservations,
    )
    return result
