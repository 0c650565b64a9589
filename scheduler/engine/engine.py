"""The engine: fleet, queue and policy state, events, and the entry point of a pass."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from scheduler.engine import events as ev
from scheduler.engine.capacity import CapacityPlan
from scheduler.engine.catalog import Catalog
from scheduler.engine.decisions import Cause, ScheduleResult, TaskPlacement
from scheduler.engine.fairshare import FairShare, Level
from scheduler.engine.fleet import Fleet, NodeRecord
from scheduler.engine.handlers import HANDLERS
from scheduler.engine.ordering import JobQueue
from scheduler.engine.placement import TaskPlan
from scheduler.engine.records import JobRecord, TaskAllocation, job_of
from scheduler.engine.shapes import ShapeIndex
from scheduler.engine.spec import (
    MILLIS_PER_ACCELERATOR,
    EngineConfig,
    InvalidInputError,
    JobSpec,
    Limit,
    LimitScope,
    NodeSpec,
    Pledge,
    PriorityClass,
)

QueueKey = tuple[PriorityClass, str]
"""``(priority class, project)``: one FIFO of pending jobs."""


class Engine:
    """A pure, deterministic scheduler: feed it facts, call :meth:`schedule`, act on decisions.

    Nothing here reads a clock or does I/O; every time is a number the caller passes in.
    """

    def __init__(self, config: EngineConfig, catalog: Catalog | None = None) -> None:
        config.validate()
        assert config.half_life_s is not None
        self.config = config
        self.catalog = catalog or Catalog()
        self.fleet = Fleet()
        self.capacity = CapacityPlan()
        self.fair_share = FairShare(config.half_life_s, config.default_weight)
        self.jobs: dict[str, JobRecord] = {}
        self.queues: dict[QueueKey, JobQueue] = {}
        """Pending jobs: ``(submit_time, sequence, job_id)`` per class and project."""
        self.limits: dict[tuple[LimitScope, str], int] = {}
        self.in_use: dict[tuple[LimitScope, str], int] = {}
        """Millis running per project and per institution."""
        self.no_budget: dict[tuple[str, str], float] = {}
        """Per project and :attr:`JobSpec.payer`, the smallest :attr:`JobSpec.budget_size`
        whose hold failed: jobs of that size or larger wait, smaller ones may still be paid
        for."""
        self.budget_blocks: dict[tuple[str, str], ev.BudgetChanged] = {}
        """Per project and payer, the block that set :attr:`no_budget`, for the reasons of the
        jobs it holds back."""
        self.advance_jobs: set[str] = set()
        """Pending jobs with an advance reservation (``start_at``)."""
        self.preemptors: set[str] = set()
        """Pending jobs that preempted others; each pass reserves the room they free for them."""
        self.unclaimed_victims: set[str] = set()
        """Preempted jobs, maybe still stopping, whose preemptor no longer waits for them
        because it started or left the queue. Another preemptor may claim their room."""
        self.broken: set[str] = set()
        """Running jobs that lost tasks and await repair or requeue in the next pass."""
        self.clock: float | None = None
        self.changes = 0
        """Bumped by every event and policy change; part of the signature of a pass."""
        self.new_jobs: list[str] = []
        """Jobs queued since the last pass."""
        self.last_pass: object | None = None
        """What the last pass left for the next one (see :mod:`scheduler.engine.cycle`)."""
        self._sequence = 0
        self.shapes = ShapeIndex(self.fleet, self.catalog)
        """Candidate pools and job shapes, shared by the jobs that have the same ones."""

    # Fleet, pledges, limits, weights.

    def add_node(self, spec: NodeSpec) -> None:
        if spec.model not in self.catalog:
            raise InvalidInputError(
                f"node {spec.node_id}: model {spec.model!r} is not in the accelerator catalog"
            )
        self.fleet.add_node(spec)

    def add_nodes(self, specs: Iterable[NodeSpec]) -> None:
        for spec in specs:
            self.add_node(spec)

    def remove_node(self, node_id: str) -> None:
        """Forget a node that no job has accelerators on, e.g. a retired machine.

        Raises :class:`InvalidInputError`, changing nothing, for a node not in the fleet or
        one with accelerators allocated to a running job or to a copy whose stop is not
        confirmed. Reservations of earlier passes that name the node stay valid, and the next
        pass plans without it. A node added later with the same id is a new node.
        """
        self.fleet.remove_node(self.fleet.node(node_id))
        self.changes += 1

    def set_max_jobs(self, node_id: str, max_jobs: int) -> None:
        """Set the number of jobs ``node_id`` runs at once at most; 0 is no limit."""
        node = self.fleet.node(node_id)
        if node.max_jobs != max_jobs:
            self.changes += 1
            self.fleet.set_max_jobs(node, max_jobs)

    def set_busy(self, node_id: str, busy: bool) -> None:
        """Keep new jobs off ``node_id`` whatever its limit, or stop doing so.

        For a node whose agent rejected a start because it runs as many jobs as it can,
        although the fleet counts fewer (a job's user is still being freed, or the pool is
        shared with other nodes).
        """
        node = self.fleet.node(node_id)
        if node.busy != busy:
            self.changes += 1
            self.fleet.set_busy(node, busy)

    def add_pledge(self, pledge: Pledge) -> None:
        self.changes += 1
        self.capacity.add_pledge(pledge)

    def set_limit(self, limit: Limit) -> None:
        self.changes += 1
        if limit.max_millis < 0:
            raise InvalidInputError(f"limit {limit.scope}/{limit.key}: max_millis must be >= 0")
        if limit.scope is LimitScope.POOL:
            self.capacity.pool_limits[limit.key] = limit.max_millis
        else:
            self.limits[(limit.scope, limit.key)] = limit.max_millis

    def set_weight(self, level: Level, name: str, weight: float) -> None:
        self.changes += 1
        self.fair_share.set_weight(level, name, weight)

    # Jobs.

    def submit(self, spec: JobSpec) -> None:
        """Add a job to the queue; raise :class:`InvalidInputError` for an invalid one."""
        spec.validate()
        if spec.job_id in self.jobs:
            raise InvalidInputError(f"job {spec.job_id}: already submitted")
        for model in spec.models:
            if model not in self.catalog:
                raise InvalidInputError(
                    f"job {spec.job_id}: models: {model!r} is not in the catalog"
                )
        self.fair_share.register(spec.project, spec.institution, spec.program)
        record = JobRecord(spec, self._sequence, shape=self.shapes.shape_of(spec))
        self._sequence += 1
        self.jobs[spec.job_id] = record
        self._enqueue(record)

    def adopt(self, spec: JobSpec, tasks: Sequence[TaskPlacement], start: float) -> None:
        """Enter a job that already runs on ``tasks`` (e.g. after a service restart).

        Raises :class:`InvalidInputError`, changing nothing, when a task names an unknown node
        or accelerator, an accelerator without room for its share, or a start that is not a
        finite number of seconds.
        """
        if not math.isfinite(start):
            raise InvalidInputError(
                f"job {spec.job_id}: start is {start}, not a finite number of seconds. "
                "Pass the time the job started."
            )
        plans: list[TaskPlan] = []
        wanted: dict[tuple[int, int], int] = {}
        for task in tasks:
            node = self.fleet.node(task.node_id)
            ids = node.spec.accelerator_ids
            indices = []
            for accelerator in task.accelerator_ids:
                if accelerator not in ids:
                    raise InvalidInputError(
                        f"job {spec.job_id}: accelerator {accelerator} is not on node "
                        f"{task.node_id}"
                    )
                index = ids.index(accelerator)
                key = (node.ordinal, index)
                wanted[key] = wanted.get(key, 0) + task.millis
                if node.used[index] + wanted[key] > MILLIS_PER_ACCELERATOR:
                    raise InvalidInputError(
                        f"job {spec.job_id}: accelerator {accelerator} has no room for "
                        f"{task.millis} millis"
                    )
                indices.append(index)
            plans.append(TaskPlan(task.task_index, node, tuple(indices), task.millis))
        self.submit(spec)
        self._commit(self.jobs[spec.job_id], plans, start)
        self.changes += 1
        for plan in plans:
            for index in plan.indices:
                if index in plan.node.failed:
                    # It ran there before the failure was known: the next pass requeues it.
                    self._fault_jobs_on(plan.node, index, plan.node.failed[index], "")

    def adopt_fence(
        self, node_id: str, owner: str, accelerator_ids: Sequence[str], millis: int
    ) -> bool:
        """Hold accelerators of ``node_id`` for a task copy whose stop is not yet confirmed.

        For a service restart: the copy's ``owner`` (``job_id#attempt``) keeps its share of
        ``accelerator_ids`` until a TasksStopped event for its job on this node, as it would
        had the node become unknown under it. Returns False and changes nothing when the node
        is not in the fleet or the owner runs a live task there. The same goes for an
        accelerator that is not on the node or has no room for the share: the copy no longer
        had it.
        """
        node = self.fleet.by_id.get(node_id)
        if node is None or not accelerator_ids or millis <= 0:
            return False
        if owner in node.jobs and owner not in node.fenced:
            return False
        ids = node.spec.accelerator_ids
        indices: list[int] = []
        for accelerator in accelerator_ids:
            if accelerator not in ids:
                return False
            index = ids.index(accelerator)
            if node.used[index] + millis * (indices.count(index) + 1) > MILLIS_PER_ACCELERATOR:
                return False
            indices.append(index)
        self.fleet.allocate_many(node, tuple(indices), owner, millis)
        node.fenced.add(owner)
        self.changes += 1
        return True

    def mark_stopping(self, job_id: str) -> None:
        """Record that the caller is stopping a running job for a reason of its own (a cancel
        or a failure), as a preemption decision does.

        A stopping job is not chosen to preempt. If it loses a node or an accelerator before
        its tasks stopped, every share allocated to it stays fenced until TasksStopped for its
        job on that node, because its tasks on the other nodes may still be stopping. A job
        that is not running changes nothing.
        """
        record = self.jobs.get(job_id)
        if record is not None and record.running:
            # No change count: the mark frees nothing, so a pass that skips the waiting jobs
            # because nothing changed still decides the same.
            record.stopping = True

    def mark_preempted(
        self, job_id: str, cause: Cause, cause_id: str, deadline: float | None = None
    ) -> None:
        """Record that a running job stops for a preemption decision an earlier engine made.

        For a service that rebuilds the engine after a restart. The job is marked stopping and
        is not chosen again for ``cause``. For a priority preemption, the preempting job
        ``cause_id``, while it is pending, waits for this job to stop before it preempts
        others, and keeps the room the stop frees, as it did before the restart. So call this
        after the preempting job is submitted or adopted. A preempting job that is running
        or unknown (it left the queue) leaves this job unclaimed, as leaving the queue did
        before the restart, so the next preemptor that needs its room claims it. ``deadline``
        is the decision's :attr:`Preempt.deadline`. Until then, the room the job frees may
        backfill jobs that end sooner. Without a deadline, because the caller did not store
        it, that room is kept from now. A job that is not running changes nothing.
        """
        record = self.jobs.get(job_id)
        if record is None or not record.running:
            return
        record.stopping = True
        record.stop_deadline = deadline
        record.preempted_by.add((cause, cause_id))
        if cause is not Cause.PRIORITY:
            return
        preemptor = self.jobs.get(cause_id)
        if preemptor is not None and not preemptor.running:
            preemptor.awaiting_victims = preemptor.awaiting_victims | {job_id}
            self.preemptors.add(cause_id)
        else:
            self.unclaimed_victims.add(job_id)
        self.changes += 1

    def release_fences(self, node_id: str, job_id: str, keep_running: bool) -> None:
        """Free the shares of ``job_id`` fenced on ``node_id``, as TasksStopped does.

        With ``keep_running``, only older attempts' shares and adopted copies are freed. The
        share of the job's running attempt stays, because the caller still has a live task of
        that attempt there.
        """
        node = self.fleet.node(node_id)
        record = self.jobs.get(job_id)
        kept = record.owner if keep_running and record is not None and record.running else ""
        for owner in sorted(node.fenced):
            if owner != kept and job_of(owner) == job_id:
                self.fleet.release_job(node, owner)
                self.changes += 1

    def remove(self, job_id: str) -> None:
        """Forget a job: a pending one leaves the queue, a running one (already stopped by the
        caller) releases its accelerators."""
        record = self._job(job_id)
        self.changes += 1
        if record.running:
            self._release(record)
        else:
            self._dequeue(record)
        self.broken.discard(job_id)
        del self.jobs[job_id]

    def pending(self) -> list[str]:
        return sorted(j.job_id for j in self.jobs.values() if not j.running)

    def running(self) -> list[str]:
        return sorted(j.job_id for j in self.jobs.values() if j.running)

    # Events.

    def apply(self, event: ev.Event, now: float | None = None) -> None:
        """Apply one fact; ``now`` (when given) first advances the fair-share clock."""
        if now is not None:
            self._advance(now)
        self.changes += 1
        handler = HANDLERS.get(type(event))
        if handler is None:
            raise InvalidInputError(f"event {type(event).__name__}: not an engine event")
        handler(self, event)

    def schedule(self, now: float) -> ScheduleResult:
        """Run one scheduling pass at ``now`` and return its decisions and waiting reasons."""
        from scheduler.engine.cycle import run_pass

        self._advance(now)
        return run_pass(self, now)

    # Internals shared with the pass.

    def _advance(self, now: float) -> None:
        if not math.isfinite(now):
            raise InvalidInputError(
                f"now is {now}, not a finite number of seconds. Pass the current time."
            )
        if self.clock is not None and now < self.clock:
            raise InvalidInputError(
                f"now={now} is earlier than the last time the engine saw ({self.clock})"
            )
        self.clock = now
        self.fair_share.advance(now)

    def _job(self, job_id: str) -> JobRecord:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise InvalidInputError(f"job {job_id}: not known to the engine") from None

    def _enqueue(self, record: JobRecord) -> None:
        spec = record.spec
        if spec.start_at is not None:
            self.advance_jobs.add(spec.job_id)
        key = (spec.priority, spec.project)
        queue = self.queues.get(key)
        if queue is None:
            queue = JobQueue()
            self.queues[key] = queue
        queue.add(record)
        self.new_jobs.append(spec.job_id)

    def _dequeue(self, record: JobRecord) -> None:
        spec = record.spec
        self.advance_jobs.discard(spec.job_id)
        if spec.job_id in self.preemptors:
            self.preemptors.discard(spec.job_id)
            self.unclaimed_victims |= record.awaiting_victims
            record.awaiting_victims = frozenset()
        key = (spec.priority, spec.project)
        queue = self.queues[key]
        queue.remove(spec.job_id)
        if not queue:
            del self.queues[key]

    def _commit(self, record: JobRecord, plans: list[TaskPlan], now: float) -> None:
        """Allocate the planned accelerators to a pending job and mark it running."""
        self._dequeue(record)
        record.attempt += 1
        record.tasks = {}
        record.start = now
        record.requeue_message = ""
        owner = record.owner
        pools = set()
        for plan in plans:
            self._allocate_task(record, plan, owner, track_end=False)
            pools.add(plan.node.pool)
        end = record.end_estimate
        if end is not None:
            # A new attempt has no entry yet: one per pool it runs in.
            for pool in pools:
                pool.ends.add((end, record.sequence, record.spec.job_id))
        spec = record.spec
        self._count(spec, spec.total_millis)

    def _allocate_task(
        self, record: JobRecord, plan: TaskPlan, owner: str = "", track_end: bool = True
    ) -> None:
        """Allocate one task's accelerators; ``owner`` defaults to the record's current one."""
        assert record.tasks is not None
        self.fleet.allocate_many(plan.node, plan.indices, owner or record.owner, plan.millis)
        record.tasks[plan.task_index] = TaskAllocation(plan.node, plan.indices, plan.millis)
        pool = plan.node.pool
        pool.jobs.add(record.spec.job_id)
        if record.spec.priority is PriorityClass.PREEMPTIBLE:
            ordinal = plan.node.ordinal
            pool.preemptible_nodes[ordinal] = pool.preemptible_nodes.get(ordinal, 0) + 1
        end = record.end_estimate
        if track_end and end is not None:
            entry = (end, record.sequence, record.job_id)
            if entry not in pool.ends:
                pool.ends.add(entry)

    def _count(self, spec: JobSpec, millis: int) -> None:
        for key in ((LimitScope.PROJECT, spec.project), (LimitScope.INSTITUTION, spec.institution)):
            self.in_use[key] = self.in_use.get(key, 0) + millis
        self.fair_share.add_running(spec.project, millis)

    def _release(self, record: JobRecord, keep_fenced: bool = True) -> None:
        """Release a running job's accelerators, except fenced ones on unknown nodes."""
        assert record.tasks is not None
        for allocation in record.tasks.values():
            node = allocation.node
            if record.spec.priority is PriorityClass.PREEMPTIBLE:
                self._forget_preemptible(node)
            if keep_fenced and record.owner in node.fenced:
                continue
            self.fleet.release_job(node, record.owner)
        end = record.end_estimate
        for pool in {allocation.node.pool for allocation in record.tasks.values()}:
            pool.jobs.discard(record.job_id)
            if end is not None:
                pool.ends.discard((end, record.sequence, record.job_id))
        self._count(record.spec, -record.spec.total_millis)
        record.tasks = None
        record.start = None
        record.lost.clear()
        record.lost_nodes.clear()
        record.hardware_fault = None
        record.stopping = False
        record.stop_deadline = None
        record.awaiting_victims = frozenset()

    @staticmethod
    def _forget_preemptible(node: NodeRecord) -> None:
        counts = node.pool.preemptible_nodes
        left = counts.get(node.ordinal, 0) - 1
        if left > 0:
            counts[node.ordinal] = left
        else:
            counts.pop(node.ordinal, None)

    def _fence_tasks(self, record: JobRecord, stopping: Iterable[tuple[int, str]]) -> None:
        """Fence the shares of the tasks that ``stopping`` lists by task index and node id, so
        that releasing the running job keeps them until TasksStopped for their node.

        The fleet frees a job's shares on a node together. So on a node where other tasks
        of the job are not stopping, its shares are released and those of the stopping tasks
        allocated again. A node that already released the job (down, or drained with
        eviction) or already fences it (unknown) is left as it is.
        """
        assert record.tasks is not None
        owner = record.owner
        kept: dict[int, set[int]] = {}
        for task_index, node_id in stopping:
            allocation = record.tasks.get(task_index)
            if allocation is not None and allocation.node.spec.node_id == node_id:
                kept.setdefault(allocation.node.ordinal, set()).add(task_index)
        for ordinal, task_indexes in sorted(kept.items()):
            node = self.fleet.nodes[ordinal]
            if owner not in node.jobs or owner in node.fenced:
                continue
            on_node = {i for i, allocation in record.tasks.items() if allocation.node is node}
            if on_node != task_indexes:
                self.fleet.release_job(node, owner)
                for task_index in sorted(task_indexes):
                    allocation = record.tasks[task_index]
                    self.fleet.allocate_many(node, allocation.indices, owner, allocation.millis)
            node.fenced.add(owner)

    def avoid_nodes(self, record: JobRecord, node_ids: Iterable[str]) -> None:
        """Place the later attempts of ``record`` elsewhere than ``node_ids`` if there is room."""
        avoided = record.spec.avoid_nodes | frozenset(node_ids)
        if avoided != record.spec.avoid_nodes:
            record.spec = replace(record.spec, avoid_nodes=avoided)
            record.shape = self.shapes.shape_of(record.spec)

    def _requeue(self, record: JobRecord, message: str) -> None:
        self._release(record)
        record.requeue_message = message
        self.broken.discard(record.job_id)
        self._enqueue(record)

    def _accelerator_index(self, node: NodeRecord, accelerator_id: str) -> int:
        try:
            return node.spec.accelerator_ids.index(accelerator_id)
        except ValueError:
            raise InvalidInputError(
                f"accelerator_id: {accelerator_id} is not on node {node.spec.node_id}"
            ) from None

    def _fault_jobs_on(self, node: NodeRecord, index: int, event_id: str, reason: str) -> None:
        """Mark every running job with a share of a failed accelerator for a requeue."""
        accelerator = node.spec.accelerator_ids[index]
        message = f"accelerator {accelerator} on node {node.spec.name} failed"
        if reason:
            message = f"{message}: {reason}"
        message = f"{message} (health event {event_id})"
        for owner in sorted(node.owners[index]):
            record = self.jobs.get(job_of(owner))
            if record is None or record.owner != owner or record.tasks is None:
                continue
            if owner in node.fenced:
                # Its tasks here are already lost; TasksStopped releases them.
                continue
            if record.hardware_fault is None:
                record.hardware_fault = (event_id, message)
            self.broken.add(record.job_id)

    def _lose_tasks(self, node: NodeRecord, fence: bool) -> None:
        """Mark every task on ``node`` lost; with ``fence`` its accelerators stay allocated."""
        for owner in sorted(node.jobs):
            job_id = job_of(owner)
            record = self.jobs.get(job_id)
            if record is None or record.owner != owner or record.tasks is None:
                # A fence of an earlier attempt or a forgotten job: keep it until confirmed.
                continue
            if fence:
                node.fenced.add(owner)
            else:
                self.fleet.release_job(node, owner)
            for task_index, allocation in record.tasks.items():
                if allocation.node is node:
                    record.lost.add(task_index)
                    record.lost_nodes[task_index] = node.spec.node_id
            self.broken.add(job_id)
        if not fence:
            for owner in list(node.jobs):
                if owner not in node.fenced:
                    self.fleet.release_job(node, owner)
