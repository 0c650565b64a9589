"""The open jobs of a shard and their transitions, as pure code that returns its effects.

The scheduling loop owns one :class:`JobBook`. Each method changes jobs in memory, reports the
change to the engine adapter, and appends to :class:`Effects` what the loop must persist,
dispatch and publish. Nothing here awaits, so the transitions are tested without servers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from acsp.rendezvous import rendezvous_port
from scheduler.engine.decisions import Cause
from scheduler.engine.spec import InvalidInputError
from services.runtime.evolve import evolve

from .admission import HoldOutcome
from .commands import (
    JobEventOut,
    TaskId,
    command_action,
    hosts_records,
    job_event,
    replacement_kind,
    start_record,
    stop_record,
)
from .dependencies import NOT_FOUND, Dependencies
from .engine_adapter import AcceleratorHealth, EngineAdapter, PassResult, preemption_of
from .model import Job, JobState, TaskPlacement, node_name
from .reason_refresh import REASON_REFRESHES_PER_PASS, ReasonWriter
from .rendezvous import EndpointOf, RendezvousPorts, default_endpoint, rendezvous_fields
from .store import DispatchRecord, Orphan

logger = logging.getLogger(__name__)

# Agent task states (``acsp.v1.TaskState`` in lower case) by what they mean for the job.
_FAULTS = frozenset({"lost", "failed_hardware", "start_failed"})
TASK_STATES = frozenset({"started", "exited", "stopped", "timed_out"}) | _FAULTS
MAX_START_FAILURES = 5
"""Attempts in a row that fail to start before the job fails instead of being requeued."""
CHECKPOINTED = "checkpointed"
"""Task state of an event that only reports a new checkpoint of a running task."""
MAX_CHECKPOINT_REF_BYTES = 4096
"""Maximum length of a stored checkpoint reference in UTF-8 bytes. Agents send none longer."""
_LIVE = ("assigned", "started")
STOPPING = "stopping"
"""Task state of a task of an ended job that got a stop command its node has not confirmed.
The state its node reports, or ``stopped``, replaces it once the node confirms."""
_RAN = ("started", "exited")
"""Task states of a task that has started."""
REQUEUE = "requeue"
"""Stop outcome of a preempted job, which is queued again once its tasks stopped."""
PREEMPTED = "preempted: "
"""Start of a preempted job's stop reason, which the preemption's message follows."""
_STOP_OUTCOMES: dict[str, JobState] = {
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "timed_out",
}


@dataclass(slots=True)
class Effects:
    """Work that one batch of inputs leaves for the loop, in order: persist, dispatch, publish."""

    now: float
    changed: dict[str, tuple[Job, str]] = field(default_factory=dict)
    """Job id to its new value and the cause of the change."""
    commands: list[DispatchRecord] = field(default_factory=list)
    events: list[JobEventOut] = field(default_factory=list)
    admit: list[tuple[Job, str]] = field(default_factory=list)
    """Jobs placed by the engine that need a hold, with the model of their placement."""
    accelerators: list[AcceleratorHealth] = field(default_factory=list)
    """Accelerators that failed or recovered, persisted so a new leader keeps them."""
    nodes_down: dict[str, str | None] = field(default_factory=dict)
    """Node key to the reason of a down mark made in the turn, or None for a mark cleared,
    persisted so a new leader keeps the node down."""

    def change(self, job: Job, cause: str) -> None:
        self.changed[job.job_id] = (job, cause)


@dataclass(slots=True)
class _Stopping:
    """A job whose tasks are being stopped, and what it becomes once they are."""

    outcome: JobState | None
    """Terminal state to enter, or None to requeue."""
    reason: str
    pending: set[int]
    """Task indexes not yet confirmed stopped."""
    cause: str
    """Trigger of the stop, recorded again when the last task stops."""


class JobBook:
    """Open jobs by id and the transitions between their states."""

    def __init__(
        self,
        engine: EngineAdapter,
        epoch: int,
        endpoint_of: EndpointOf = default_endpoint,
        budget_retry_s: float = 30.0,
        reason_refreshes_per_pass: int = REASON_REFRESHES_PER_PASS,
    ) -> None:
        """``endpoint_of`` returns where a node's tasks are reached, for start commands.

        ``budget_retry_s`` is how long after a hold rejected for lack of budget the scheduler
        asks for the project's holds again, which the pending reasons state.
        ``reason_refreshes_per_pass`` bounds the pending jobs per pass whose message alone is
        rewritten (see :mod:`.reason_refresh`).
        """
        self.engine = engine
        self._reasons = ReasonWriter(reason_refreshes_per_pass)
        self.epoch = epoch
        self.budget_retry_s = budget_retry_s
        self._endpoint_of = endpoint_of
        self.ports = RendezvousPorts()
        self.jobs: dict[str, Job] = {}
        self._stopping: dict[str, _Stopping] = {}
        self._admitting: set[str] = set()
        self._abandoned: dict[tuple[str, int], Job] = {}
        """Attempts requeued while their hold request was in flight."""
        self._requeue_reloaded: list[str] = []
        """Reloaded jobs whose placement the engine could not take back, requeued next turn."""
        self._settle_reloaded: list[str] = []
        """Reloaded stopping jobs with no live task left, finished on the next turn."""
        self._rejected: list[tuple[str, str]] = []
        """Jobs the engine rejected, with its message, failed on the next turn."""
        self._cancel_after_hold: dict[str, tuple[str, str]] = {}
        """Jobs cancelled while their hold request was in flight, with reason and cause."""
        self._hold_reloaded: list[str] = []
        """Reloaded jobs cancelled while their hold request was in flight, whose hold is asked
        for again next turn so that a hold the grant service placed is released."""
        self._orphans: dict[str, set[str]] = {}
        """Node key to task ids of ended attempts, or of copies a replaced task left behind,
        not yet confirmed stopped there."""
        self._orphan_writes: dict[tuple[str, str], Orphan | None] = {}
        """Orphans added (the copy) or confirmed (None) since the last commit, by node key and
        task id. Only the last change of a copy is kept, so a commit never adds and deletes it."""
        self._ended: dict[str, Job] = {}
        """Ended jobs by id that have a task in the ``stopping`` state, so that the state its
        node confirms is recorded in the job."""
        self._down_reloaded: list[str] = []
        """Nodes a new leader loaded as down, whose stored copies are confirmed next turn."""
        self._starting_since: dict[str, float] = {}
        """Job id to the time its start commands went out, while it is starting."""
        self._replacing_since: dict[tuple[str, int, int], float] = {}
        """Job id, attempt and task index of a replaced task not yet started, to the time its
        start command went out."""
        self.dependencies = Dependencies()
        self._dependency_waits: list[str] = []
        """Jobs added since the last turn that wait for others, whose reason is recorded then."""
        self._dependency_failures: list[tuple[str, str, str]] = []
        """Jobs added since the last turn that can never start, with the job they named and its
        final state, cancelled on the next turn."""

    # Loading and submission.

    def add(self, jobs: list[Job], now: float) -> None:
        """Add submitted or reloaded jobs: pending ones are queued, others hold their place."""
        preempted: list[Job] = []
        for job in jobs:
            if job.job_id in self.jobs:
                continue
            self.jobs[job.job_id] = job
            if job.state == "stopping" and not job.hold_id and job.placement:
                # Cancelled while its hold request was in flight: no start command went out,
                # and the engine forgot the job at the cancel.
                self._cancel_after_hold[job.job_id] = (job.reason, "reload")
                self._hold_reloaded.append(job.job_id)
                continue
            if job.state != "pending" and job.hold_id:
                self._claim_port(job)
            try:
                if job.state == "pending":
                    if not (job.spec.awaited_job_ids and self._wait_for_dependencies(job)):
                        self.engine.add_job(job)
                    continue
                if not self.engine.add_running(job, now):
                    self._requeue_reloaded.append(job.job_id)
                    continue
            except InvalidInputError as exc:
                # A job stored before the submission checks existed fails alone, so it
                # cannot stop the service on every restart.
                logger.error("job %s failed: the engine rejected it: %s", job.job_id, exc)
                self._rejected.append((job.job_id, str(exc)))
                continue
            if job.state == "starting":
                self._starting_since[job.job_id] = now
            if job.state == "running":
                for task in job.placement:
                    if task.state == "assigned":
                        self._replacing_since[(job.job_id, job.attempt, task.task_index)] = now
            if job.state == "stopping":
                live = {t.task_index for t in job.placement if t.state in _LIVE}
                outcome = _reloaded_outcome(job.stop_outcome)
                self._stopping[job.job_id] = _Stopping(outcome, job.reason, live, "reload")
                self.engine.mark_stopping(job.job_id)
                if not live:
                    self._settle_reloaded.append(job.job_id)
                elif job.preemptor_id or (outcome is None and job.reason.startswith(PREEMPTED)):
                    # A victim cancelled while it stops still frees its preemptor's room.
                    preempted.append(self._keep_parsed_preemptor(job))
        # After the loop, because a job that preempted others may come after them.
        for job in preempted:
            message = job.reason.removeprefix(PREEMPTED) if job.reason.startswith(PREEMPTED) else ""
            self.engine.mark_preempted(job.job_id, job.preemptor_id, message, job.stop_deadline)

    def _keep_parsed_preemptor(self, job: Job) -> Job:
        """Copy the preempting job named in the stop reason of a row stored without its id.

        Its next write then stores the id, which a cancel's reason no longer names.
        """
        if job.preemptor_id:
            return job
        found = preemption_of(job.reason.removeprefix(PREEMPTED))
        if found is None or found[0] is not Cause.PRIORITY:
            return job
        job = evolve(job, preemptor_id=found[1])
        self.jobs[job.job_id] = job
        return job

    def _wait_for_dependencies(self, job: Job) -> bool:
        """Keep ``job`` out of the engine while jobs it names have not completed; return
        whether it is kept out."""
        failed = self.dependencies.register(
            job.job_id, job.spec.awaited_job_ids, self.jobs.__contains__
        )
        if failed is not None:
            self._dependency_failures.append((job.job_id, *failed))
            return True
        if not self.dependencies.waits(job.job_id):
            return False
        waiting = job.with_state("pending", self.dependencies.message(job.job_id), "dependency")
        self.jobs[job.job_id] = waiting
        self._dependency_waits.append(job.job_id)
        return True

    def adopt_orphans(self, orphans: list[Orphan]) -> None:
        """Take back the stored task copies that wait for a confirmed stop, after a restart.

        Call after :meth:`add` has re-entered the open jobs. The engine keeps each copy's
        accelerators from other jobs, unless a running job uses them now, until the node
        confirms the stop with an event of the copy or a heartbeat that no longer lists it.
        A task 0 copy stored with its rendezvous port keeps that port reserved until then.
        """
        # NOTE: a node that never reports again never confirms, so its stored copies stay and
        # each new leader fences them again, until an operator marks the node down.
        for orphan in orphans:
            try:
                tid = TaskId.parse(orphan.task_id)
            except ValueError:
                logger.warning("ignoring stored orphan with malformed task id %r", orphan.task_id)
                continue
            self._orphans.setdefault(orphan.node_key, set()).add(orphan.task_id)
            if orphan.rendezvous_port:
                # A task 0 copy of an earlier attempt may still listen on its port.
                self.ports.claim(orphan.node_key, orphan.task_id, orphan.rendezvous_port)
            self.engine.fence(
                orphan.node_key, tid.job_id, orphan.task_id, orphan.accelerators, orphan.millis
            )

    def adopt_ended(self, jobs: list[Job]) -> None:
        """Take back the ended jobs whose tasks wait for a confirmed stop, after a restart.

        Call after :meth:`adopt_orphans`. A job without a ``stopping`` task is left out.
        """
        for job in jobs:
            if job.terminal and any(t.state == STOPPING for t in job.placement):
                self._ended[job.job_id] = job
                task_zero = _task_zero(job)
                if task_zero is not None and task_zero.state == STOPPING:
                    self._claim_port(job)

    def reload_down(self, node_key: str) -> None:
        """Confirm on the next turn that the copies stored on ``node_key`` stopped, because a
        new leader loaded the node as down."""
        self._down_reloaded.append(node_key)

    def nodes_with_new_copies(self) -> set[str]:
        """Return the nodes where task copies began to wait for a confirmed stop since the
        last :meth:`take_orphan_writes`."""
        return {key for (key, _), orphan in self._orphan_writes.items() if orphan is not None}

    def take_orphan_writes(self) -> tuple[list[Orphan], list[tuple[str, str]]]:
        """Return and forget the orphans added and confirmed since the last call."""
        added = [o for o in self._orphan_writes.values() if o is not None]
        confirmed = [key for key, o in self._orphan_writes.items() if o is None]
        self._orphan_writes.clear()
        return added, confirmed

    def settle_reloaded(self, fx: Effects) -> None:
        """Fail jobs the engine rejected, requeue reloaded jobs it could not adopt, and finish
        reloaded stopping jobs that have nothing left to stop.

        A reloaded job that was cancelled while its hold request was in flight gets that
        request again, and ends as cancelled once it returns.
        """
        while self._rejected:
            job_id, message = self._rejected.pop()
            job = self.jobs.get(job_id)
            if job is None:
                continue
            reason = f"the scheduler cannot run it: {message}"
            if job.placement:
                # Tasks of a reloaded job may still run: stop them before it ends.
                self.stop(job_id, "failed", reason, 0, "engine:rejected", fx)
                continue
            self._finish(job, "failed", reason, "engine:rejected", fx)
        while self._requeue_reloaded:
            job_id = self._requeue_reloaded.pop()
            reason = "its placement no longer matches the nodes' inventories"
            self.requeue(job_id, reason, "reload", fx, release=False)
        while self._hold_reloaded:
            job_id = self._hold_reloaded.pop()
            job = self.jobs.get(job_id)
            if job is None:
                continue
            # The same idempotency key returns the hold the first request placed, if any.
            model = self.engine.node_model(job.placement[0].node_key)
            fx.admit.append((job, model))
        while self._down_reloaded:
            self.node_down(self._down_reloaded.pop(), fx)
        while self._settle_reloaded:
            job_id = self._settle_reloaded.pop()
            stopping = self._stopping.pop(job_id, None)
            job = self.jobs.get(job_id)
            if stopping is None or job is None:
                continue
            if stopping.outcome is None:
                self._settle_stopped(job, None, stopping.reason, "reload", fx)
                continue
            self.engine.end(job_id, stopping.outcome, fx.now)
            self._finish(job, stopping.outcome, stopping.reason, "reload", fx)
        self._settle_dependencies(fx)

    def _settle_dependencies(self, fx: Effects) -> None:
        """Record why new jobs wait for others, and apply the ends of the jobs they wait for.

        A job whose last awaited job completed enters the engine. One whose awaited job ended
        otherwise is cancelled, and its own end applies to the jobs that wait for it.
        """
        for job_id in self._dependency_waits:
            job = self.jobs.get(job_id)
            if job is not None and job.pending_reason == "dependency":
                fx.change(job, "dependency")
        self._dependency_waits.clear()
        for job_id, other, state in self._dependency_failures:
            self._cancel_waiting(job_id, other, state, fx)
        self._dependency_failures.clear()
        while (end := self.dependencies.next_end()) is not None:
            other, state, dependents = end
            for job_id in dependents:
                if state != "completed":
                    self.dependencies.forget(job_id)
                    self._cancel_waiting(job_id, other, state, fx)
                    continue
                job = self.jobs.get(job_id)
                if job is None or job.state != "pending":
                    continue
                if not self.dependencies.completed(job_id, other):
                    waiting = evolve(job, reason=self.dependencies.message(job_id))
                    self.jobs[job_id] = waiting
                    fx.change(waiting, "dependency")
                    continue
                released = job.with_state("pending")
                self.jobs[job_id] = released
                fx.change(released, "dependency")
                try:
                    self.engine.add_job(released)
                except InvalidInputError as exc:
                    logger.error("job %s failed: the engine rejected it: %s", job_id, exc)
                    self._rejected.append((job_id, str(exc)))

    def _cancel_waiting(self, job_id: str, other: str, state: str, fx: Effects) -> None:
        """Cancel ``job_id``, which waits outside the engine, because ``other`` ended in
        ``state`` and so it can never start."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "pending":
            return
        ended = "is not found" if state == NOT_FOUND else f"ended {state}"
        reason = f"job {other} that it waits for {ended}, so it can never start"
        self._finish(job, "cancelled", reason, "dependency", fx)

    # Engine passes.

    def apply_pass(self, result: PassResult, fx: Effects) -> None:
        # Requeues come first: the engine may requeue a job and place it again in one pass.
        for job_id, message in result.requeues:
            stopping = self._stopping.get(job_id)
            if stopping is not None and stopping.outcome is not None:
                # The engine queued the job again, but a cancel or a failure was ending it.
                self.engine.remove(job_id)
                self._end_stopping(job_id, stopping.outcome, fx)
                continue
            self.requeue(job_id, message, "engine:requeue", fx, release=False)
        for job_id, message, failure in result.failed_hardware:
            self.fail_hardware(job_id, message, failure, fx)
        for waiting in self._reasons.write(result.waiting, self._waiting_job, fx.now):
            self.jobs[waiting.job_id] = waiting
            fx.change(waiting, "engine:waiting")
        for job_id, tasks in result.places:
            job = self.jobs.get(job_id)
            if job is None or job.state != "pending" or job_id in self._admitting:
                logger.warning("engine placed job %s which is not waiting here", job_id)
                continue
            placed = evolve(job, placement=tasks)
            self.jobs[job_id] = placed
            self._admitting.add(job_id)
            fx.admit.append((placed, result.models.get(job_id, "")))
        for job_id, task, lost_node in result.replacements:
            self.replace_task(job_id, task, lost_node, fx)
        for job_id, grace_s, message, trigger, preemptor_id, deadline in result.preempts:
            reason = f"{PREEMPTED}{message}"
            self.stop(
                job_id,
                None,
                reason,
                grace_s,
                trigger,
                fx,
                preemptor_id=preemptor_id,
                deadline=deadline,
            )
        for job_id, preemptor_id in result.claims:
            self._claim(job_id, preemptor_id, fx)

    def _claim(self, job_id: str, preemptor_id: str, fx: Effects) -> None:
        """Store that ``preemptor_id`` now waits for the stopping job ``job_id``, so that a new
        leader makes it wait for the stop again.

        The job keeps the stop it has, whether a cancel or an earlier preemption began it. The
        turn writes the job's row once with one cause, so a change made earlier in the turn,
        e.g. the cancel, keeps its cause.
        """
        job = self.jobs.get(job_id)
        if job is None or job.state != "stopping" or job.preemptor_id == preemptor_id:
            return
        claimed = evolve(job, preemptor_id=preemptor_id)
        self.jobs[job_id] = claimed
        earlier = fx.changed.get(job_id)
        fx.change(claimed, "engine:claim" if earlier is None else earlier[1])

    def _waiting_job(self, job_id: str) -> Job | None:
        """Return the pending job ``job_id`` if the engine's reason applies to it, else None."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "pending" or job_id in self._admitting:
            return None
        return job

    def replace_task(self, job_id: str, task: TaskPlacement, lost_node: str, fx: Effects) -> None:
        """Start a task lost with ``lost_node`` on the new accelerators the engine gave it.

        The other tasks keep running and the job keeps its state and rendezvous port. The new
        copy's start command carries the current hosts, and each other live task off the lost
        node gets a command that rewrites its hosts file with them. The old copy gets a stop
        command on the lost node, in case the node comes back, and the engine keeps that
        node's accelerators fenced until it confirms the copy stopped. A job that a cancel or
        a failure is stopping ends now as that. Task 0 is never replaced, because its node is
        the rendezvous host, so its job is requeued whole. So is a job that is not running or
        starting here, is being preempted, or whose task is no longer the live one on
        ``lost_node``. The requeue reaches the engine too, and the job's live tasks stay fenced
        until their nodes confirm their stops.
        """
        stopping = self._stopping.get(job_id)
        if stopping is not None and stopping.outcome is not None:
            self.engine.end(job_id, stopping.outcome, fx.now)
            self._end_stopping(job_id, stopping.outcome, fx)
            return
        job = self.jobs.get(job_id)
        message = f"task {task.task_index} lost on {node_name(lost_node)}"
        index = None
        if job is not None:
            index = next(
                (i for i, t in enumerate(job.placement) if t.task_index == task.task_index), None
            )
        if (
            job is None
            or index is None
            or task.task_index == 0
            or job.state not in ("running", "starting")
            or job_id in self._stopping
            or job.placement[index].node_key != lost_node
            or job.placement[index].state not in _LIVE
        ):
            if job is None:
                self.engine.requeue(job_id, fx.now)
                return
            self.requeue(job_id, message, "engine:requeue", fx, release=True)
            return
        old = job.placement[index]
        new = evolve(task, state="assigned", exit_code=0)
        tasks = list(job.placement)
        tasks[index] = new
        replaced = evolve(job, placement=tuple(tasks), replacements=job.replacements + 1)
        self.jobs[job_id] = replaced
        logger.warning(
            "job %s attempt %d: task %d lost on node %s, starting it again on node %s",
            job_id,
            job.attempt,
            task.task_index,
            old.node_key,
            new.node_key,
            extra={"job_id": job_id},
        )
        reason = f"{message}; replaced on {new.node_name}"
        stop_kind = replacement_kind("stop", old.node_key, replaced.replacements)
        fx.commands.append(stop_record(job_id, job.attempt, old, reason, 0, self.epoch, stop_kind))
        self._add_orphan(old, TaskId(job_id, job.attempt, old.task_index))
        start_kind = replacement_kind("start", new.node_key, replaced.replacements)
        rendezvous = rendezvous_fields(replaced, self._endpoint_of)
        fx.commands.append(start_record(replaced, new, self.epoch, start_kind, rendezvous))
        # A task still on the lost node gets its own replacement, or its gang a requeue.
        others = [
            t
            for t in replaced.placement
            if t is not new and t.state in _LIVE and t.node_key != lost_node
        ]
        fx.commands.extend(hosts_records(replaced, others, self.epoch, new.task_index, rendezvous))
        self._replacing_since[(job_id, job.attempt, task.task_index)] = fx.now
        fx.change(replaced, f"node:{lost_node}")

    # Admission.

    def apply_hold(self, job_id: str, attempt: int, outcome: HoldOutcome, fx: Effects) -> None:
        abandoned = self._abandoned.pop((job_id, attempt), None)
        if abandoned is not None:
            self._release_abandoned(abandoned, outcome, fx)
            return
        job = self.jobs.get(job_id)
        cancel = self._cancel_after_hold.pop(job_id, None)
        if cancel is not None and job is not None:
            # The job ends now; a hold placed anyway goes out with its ENDED event.
            held = outcome.hold_id if outcome.status == "held" else ""
            self._finish(evolve(job, placement=(), hold_id=held), "cancelled", *cancel, fx)
            return
        if job is None or job.attempt != attempt or job_id not in self._admitting:
            return
        self._admitting.discard(job_id)
        if outcome.status == "held":
            self._start(job, outcome, fx)
        else:
            self._hold_failed(job, outcome, fx)

    def _start(self, job: Job, outcome: HoldOutcome, fx: Effects) -> None:
        spec = job.spec
        picked = job.grant_picked
        if outcome.grant_id and outcome.grant_id != spec.grant_id:
            # A job that named no grant is paid by the one the ledger chose.
            spec = evolve(spec, grant_id=outcome.grant_id)
            picked = True
        port = 0
        task_zero = _task_zero(job)
        if task_zero is not None:
            port = self.ports.reserve(
                task_zero.node_key,
                str(TaskId(job.job_id, job.attempt, 0)),
                job.job_id,
                job.attempt,
                self._endpoint_of(task_zero.node_key).ports,
            )
        starting = evolve(
            job,
            state="starting",
            pending_reason="",
            reason="start commands sent",
            hold_id=outcome.hold_id,
            hold_amount=outcome.amount,
            spec=spec,
            rendezvous_port=port,
            grant_picked=picked,
        )
        self.jobs[job.job_id] = starting
        self._starting_since[job.job_id] = fx.now
        fx.change(starting, f"hold:{outcome.hold_id}")
        rendezvous = rendezvous_fields(starting, self._endpoint_of)
        fx.commands.extend(
            start_record(starting, t, self.epoch, rendezvous=rendezvous) for t in starting.placement
        )
        fx.events.append(job_event(starting, "admitted", "hold", "budget held"))

    def _hold_failed(self, job: Job, outcome: HoldOutcome, fx: Effects) -> None:
        cleared = evolve(job, placement=())
        if outcome.status == "rejected":
            self.engine.remove(job.job_id)
            self._finish(cleared, "failed", f"hold rejected: {outcome.message}", "hold", fx)
            return
        self.engine.requeue(job.job_id, fx.now, started=False)
        if outcome.status == "no_budget":
            retry_at = fx.now + self.budget_retry_s
            project = job.spec.project_id
            message = self.engine.block_budget(project, job.job_id, outcome.message, retry_at)
        else:
            message = f"grant service unavailable, retrying: {outcome.message}"
        waiting = cleared.with_state("pending", message, "budget")
        self.jobs[job.job_id] = waiting
        fx.change(waiting, "hold")

    # Agent reports.

    def apply_checkpoint(self, task_id: str, reference: str, read_at: float, fx: Effects) -> None:
        """Record the checkpoint a task of the current attempt reported.

        A requeued attempt's start commands carry it. References of older attempts, repeats
        of the stored one and references over :data:`MAX_CHECKPOINT_REF_BYTES` change nothing.
        """
        try:
            tid = TaskId.parse(task_id)
        except ValueError:
            logger.warning("ignoring checkpoint of malformed task id %r", task_id)
            return
        job = self.jobs.get(tid.job_id)
        if job is None or job.attempt != tid.attempt or job.checkpoint_ref == reference:
            return
        if len(reference.encode()) > MAX_CHECKPOINT_REF_BYTES:
            logger.warning(
                "ignoring checkpoint of task %s: the reference is over %d bytes",
                task_id,
                MAX_CHECKPOINT_REF_BYTES,
            )
            return
        logger.debug("job %s checkpointed at %r", job.job_id, reference)
        checkpointed = evolve(job, checkpoint_ref=reference, checkpoint_at=read_at)
        self.jobs[job.job_id] = checkpointed
        fx.change(checkpointed, f"task:{CHECKPOINTED}")

    def apply_task(
        self,
        node_key: str,
        task_id: str,
        state: str,
        exit_code: int,
        message: str,
        fx: Effects,
        *,
        node_busy: bool = False,
    ) -> None:
        """Apply one task event from an agent; events of older attempts confirm stops.

        ``node_busy`` marks a start that the node rejected because it ran as many jobs as it
        can. The job is placed again, elsewhere if it can be, and the rejection does not count
        toward :data:`MAX_START_FAILURES`.
        """
        if state == CHECKPOINTED:
            return  # the task still runs; apply_checkpoint took its reference
        try:
            tid = TaskId.parse(task_id)
        except ValueError:
            logger.warning("ignoring task event with malformed task id %r", task_id)
            return
        if state != "started":
            self._confirm_orphan(node_key, task_id, tid.job_id, fx, state, exit_code)
        job = self.jobs.get(tid.job_id)
        if job is None or job.attempt != tid.attempt:
            if job is None or tid.attempt >= job.attempt:
                return
            if state == "started":
                self._stop_stale(job, tid, node_key, fx)
            elif state == "exited" and exit_code == 0:
                self._complete_requeued(job, tid, fx)
            return
        tasks = list(job.placement)
        index = next((i for i, t in enumerate(tasks) if t.task_index == tid.task_index), None)
        if index is None:
            logger.warning("task %s is not in the placement of job %s", task_id, job.job_id)
            return
        if tasks[index].node_key != node_key:
            # The event comes from the copy on a node the task was replaced from. Any state
            # but started already confirmed that copy above.
            if state == "started":
                self._stop_replaced(job, tid, node_key, fx)
            return
        if tasks[index].state not in _LIVE:
            return  # a redelivered event for a task that already ended
        self._replacing_since.pop((tid.job_id, tid.attempt, tid.task_index), None)
        tasks[index] = evolve(tasks[index], state=state, exit_code=exit_code)
        job = evolve(job, placement=tuple(tasks))
        self.jobs[job.job_id] = job
        if job.job_id in self._stopping:
            self._on_stopping_task(job, tid.task_index, state, node_key, fx)
        elif state == "started":
            self._on_started(job, fx)
        elif state == "exited" and exit_code == 0:
            self._on_task_done(job, node_key, fx)
        elif state in _FAULTS:
            self._release_fences(node_key, job.job_id)
            reason = f"task {tid.task_index} {state.replace('_', ' ')}: {message}"
            avoid: tuple[str, ...] = ()
            if state == "start_failed" and node_busy:
                reason = f"task {tid.task_index} start rejected, node busy: {message}"
                # For a while, so that a node the fleet counts wrong is not offered jobs in a
                # loop, each with a budget hold.
                self.engine.mark_busy(node_key, fx.now)
                avoid = (node_key,)
            elif state == "start_failed":
                if self._count_start_failure(job):
                    reason = f"{reason} ({MAX_START_FAILURES} attempts in a row failed to start)"
                    self.stop(job.job_id, "failed", reason, 0, f"task:{state}", fx)
                    return
                # The next attempt goes elsewhere if it can: the node may reject it again.
                avoid = (node_key,)
            self.requeue(job.job_id, reason, f"task:{state}", fx, release=True, avoid_nodes=avoid)
        else:
            outcome: JobState = "timed_out" if state == "timed_out" else "failed"
            self._release_fences(node_key, job.job_id)
            state_text = state.replace("_", " ")
            reason = f"task {tid.task_index} {state_text} with exit code {exit_code}"
            if message and message.replace("_", " ") != state_text:
                reason = f"{reason}: {message}"
            self.stop(job.job_id, outcome, reason, 0, f"task:{state}", fx)

    def _complete_requeued(self, job: Job, tid: TaskId, fx: Effects) -> None:
        """End a requeued one-task job as completed when its earlier attempt's task succeeded.

        A job is requeued when its node is lost, but the task may still run there to its end,
        and the agent reports its recorded exit status once it is back. Running the job again
        would repeat finished work, so a job whose next attempt has not started ends instead.
        A next attempt with start commands out is stopped first, and the job ends as completed
        once its task confirms the stop.
        """
        # NOTE: a gang still runs again, because the book keeps no task states of earlier
        # attempts. So does a job whose next attempt's task has started, whose work a stop
        # would waste.
        if job.spec.task_count != 1 or job.state not in ("pending", "starting"):
            return
        if job.state == "starting" and any(t.state != "assigned" for t in job.placement):
            return
        reason = f"task {tid.task_index} of attempt {tid.attempt} exited with code 0"
        logger.info(
            "job %s: %s after the job was requeued; ending it as completed",
            job.job_id,
            reason,
            extra={"job_id": job.job_id},
        )
        if job.state == "starting":
            self.stop(job.job_id, "completed", reason, 0, "task:exited", fx)
            return
        self._abandon_admission(job)
        self.engine.end(job.job_id, "completed", fx.now)
        self._finish(evolve(job, placement=()), "completed", reason, "task:exited", fx)

    def apply_node_running(self, node_key: str, running: frozenset[str], fx: Effects) -> None:
        """Confirm stopped tasks of ended attempts that a node no longer lists as running."""
        orphans = self._orphans.get(node_key)
        if not orphans:
            return
        for task_id in list(orphans):
            if task_id not in running:
                self._confirm_orphan(node_key, task_id, task_id.split("/", 1)[0], fx)

    def jobs_by_node(self) -> dict[str, list[str]]:
        """Return node key to the sorted ids of the jobs that may still run a task there.

        A job counts on a node while a task of its current attempt there is live, or while a
        copy of an earlier attempt there waits for its stop to be confirmed.
        """
        by_node: dict[str, set[str]] = {}
        for job in self.jobs.values():
            for task in job.placement:
                if task.state in _LIVE:
                    by_node.setdefault(task.node_key, set()).add(job.job_id)
        for node_key, task_ids in self._orphans.items():
            for task_id in task_ids:
                by_node.setdefault(node_key, set()).add(task_id.split("/", 1)[0])
        return {key: sorted(ids) for key, ids in by_node.items()}

    def node_down(self, node_key: str, fx: Effects) -> None:
        """Confirm that every task copy waiting on ``node_key`` stopped, because an operator
        declared the node down."""
        for task_id in list(self._orphans.get(node_key, ())):
            self._confirm_orphan(node_key, task_id, task_id.split("/", 1)[0], fx)

    def expire_starts(self, timeout_s: float, fx: Effects) -> None:
        """Requeue jobs whose tasks did not all start within ``timeout_s`` of their commands.

        A lost or rejected command leaves no task event, so only a deadline frees the job.
        """
        limit = fx.now - timeout_s
        self._expire_replacements(timeout_s, limit, fx)
        late = [job_id for job_id, since in self._starting_since.items() if since < limit]
        for job_id in late:
            del self._starting_since[job_id]
            job = self.jobs.get(job_id)
            if job is None or job.state != "starting":
                continue
            logger.warning(
                "job %s attempt %d did not start within %.0f s; requeueing",
                job_id,
                job.attempt,
                timeout_s,
            )
            reason = f"tasks did not start within {timeout_s:.0f} s"
            # The nodes that did not start their tasks in time may be slow to start them again.
            silent = tuple(t.node_key for t in job.placement if t.state == "assigned")
            self.requeue(
                job_id, reason, "timer:start-deadline", fx, release=True, avoid_nodes=silent
            )

    def _expire_replacements(self, timeout_s: float, limit: float, fx: Effects) -> None:
        """Requeue whole the running jobs whose replaced task did not start in time."""
        late = [key for key, since in self._replacing_since.items() if since < limit]
        for key in late:
            del self._replacing_since[key]
            job_id, attempt, task_index = key
            job = self.jobs.get(job_id)
            if job is None or job.attempt != attempt or job.state != "running":
                continue
            task = next((t for t in job.placement if t.task_index == task_index), None)
            if task is None or task.state != "assigned" or job_id in self._stopping:
                continue
            logger.warning(
                "job %s attempt %d: replaced task %d did not start on node %s within %.0f s;"
                " requeueing",
                job_id,
                attempt,
                task_index,
                task.node_key,
                timeout_s,
            )
            reason = f"replaced task {task_index} did not start within {timeout_s:.0f} s"
            self.requeue(
                job_id,
                reason,
                "timer:start-deadline",
                fx,
                release=True,
                avoid_nodes=(task.node_key,),
            )

    def fail_unpublishable(self, record: DispatchRecord, reason: str, fx: Effects) -> None:
        """Fail the attempt whose start command ``record`` NATS rejected for good.

        The same command would be rejected again, so the job is not requeued. Its other live
        tasks get stop commands, and once they stop, the job fails and its accelerators and
        hold are released. Rejected stop commands change nothing here.
        """
        job = self.jobs.get(record.job_id)
        if command_action(record.kind) != "start" or job is None:
            return
        if job.attempt != record.attempt:
            return
        tasks = list(job.placement)
        index = next((i for i, t in enumerate(tasks) if t.task_index == record.task_index), None)
        if index is None or tasks[index].state not in _LIVE:
            return
        if tasks[index].node_key != record.node_key:
            return  # the start of a copy that the task has since been replaced from
        tasks[index] = evolve(tasks[index], state="start_failed")
        job = evolve(job, placement=tuple(tasks))
        self.jobs[job.job_id] = job
        logger.error(
            "job %s attempt %d task %d: %s",
            job.job_id,
            job.attempt,
            record.task_index,
            reason,
            extra={"job_id": job.job_id},
        )
        if job.job_id in self._stopping:
            self._on_stopping_task(job, record.task_index, "start_failed", record.node_key, fx)
            return
        self._release_fences(record.node_key, job.job_id)
        message = f"task {record.task_index} start command not published: {reason}"
        self.stop(job.job_id, "failed", message, 0, "publish:rejected", fx)

    # Owner and operator requests.

    def cancel(self, job_id: str, reason: str, cause: str, fx: Effects) -> Job | None:
        """Cancel a job; return its new value, or None if it is not open here."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.state == "pending" and job_id in self._admitting:
            self._admitting.discard(job_id)
            self.engine.remove(job_id)
            self._cancel_after_hold[job_id] = (reason, cause)
            stopping = evolve(
                job, state="stopping", reason=reason, pending_reason="", stop_outcome="cancelled"
            )
            self.jobs[job_id] = stopping
            fx.change(stopping, cause)
        elif job.state == "pending":
            if not self.dependencies.forget(job_id):
                self.engine.remove(job_id)
            self._finish(evolve(job, placement=()), "cancelled", reason, cause, fx)
        elif job_id not in self._stopping:
            self.stop(job_id, "cancelled", reason, job.spec.grace_s, cause, fx)
        elif self._stopping[job_id].outcome is None:
            # A preemption is stopping it: once stopped, it ends instead of waiting again.
            pending = self._stopping[job_id].pending
            self._stopping[job_id] = _Stopping("cancelled", reason, pending, cause)
            cancelled = evolve(job, reason=reason, stop_outcome="cancelled")
            self.jobs[job_id] = cancelled
            fx.change(cancelled, cause)
        return fx.changed[job_id][0] if job_id in fx.changed else self.jobs.get(job_id)

    # Shared transitions.

    def stop(
        self,
        job_id: str,
        outcome: JobState | None,
        reason: str,
        grace_s: int,
        cause: str,
        fx: Effects,
        *,
        preemptor_id: str = "",
        deadline: float | None = None,
    ) -> None:
        """Stop every live task of the current attempt; finish or requeue once all stopped.

        A preemption (``outcome`` None) of a job that a cancel or a failure is stopping
        changes nothing. ``preemptor_id`` names the job of a priority preemption, stored with
        the stop so that a new leader makes it wait for the stop again. ``deadline`` is the
        preemption's, stored so that a new leader's engine knows when the stop frees the room
        at the latest. It defaults to the end of ``grace_s``.
        """
        job = self.jobs.get(job_id)
        if job is None or job.terminal:
            return
        current = self._stopping.get(job_id)
        if outcome is None and current is not None and current.outcome is not None:
            # The job still ends as the cancel or failure that is stopping it intended. The
            # engine does not choose a job marked stopping for preemption, so this only guards
            # against a decision made before the mark.
            return
        live = [t for t in job.placement if t.state in _LIVE]
        if not live:
            self._settle_stopped(job, outcome, reason, cause, fx)
            return
        self._stopping[job_id] = _Stopping(outcome, reason, {t.task_index for t in live}, cause)
        self.engine.mark_stopping(job_id)
        fx.commands.extend(
            stop_record(job_id, job.attempt, t, reason, grace_s, self.epoch) for t in live
        )
        stopping = evolve(
            job.with_state("stopping", reason),
            stop_outcome=outcome or REQUEUE,
            preemptor_id=preemptor_id,
            stop_deadline=fx.now + grace_s if deadline is None else deadline,
        )
        self.jobs[job_id] = stopping
        fx.change(stopping, cause)

    def requeue(
        self,
        job_id: str,
        reason: str,
        cause: str,
        fx: Effects,
        *,
        release: bool,
        avoid_nodes: tuple[str, ...] = (),
    ) -> None:
        """End the current attempt and queue the job again as the next attempt.

        Live tasks of the old attempt get stop commands and become orphans, whose
        accelerators the engine keeps from other jobs until their nodes confirm the stops.
        The job's other accelerators are freed. With ``release``, this informs the engine of the
        requeue. Without it, the engine has requeued the job already and fenced every share
        it had, so the shares on nodes without an orphan of the job are freed here. An
        attempt whose hold was still in flight sent no start command, so its tasks get no stop.
        ``avoid_nodes`` join the job's stored nodes to avoid, and with ``release`` the engine
        learns them too: it places later attempts elsewhere if it can.
        """
        job = self.jobs.get(job_id)
        if job is None or job.terminal:
            return
        admitting = job_id in self._admitting
        self._abandon_admission(job)
        self._stopping.pop(job_id, None)
        self._starting_since.pop(job_id, None)
        live = [] if admitting else [t for t in job.placement if t.state in _LIVE]
        for task in live:
            fx.commands.append(stop_record(job_id, job.attempt, task, reason, 0, self.epoch))
            self._add_orphan(task, TaskId(job_id, job.attempt, task.task_index))
        if job.hold_id:
            fx.events.append(job_event(job, "requeued", cause, reason))
        # The job keeps checkpoint_ref, so the next attempt's start commands carry the last
        # reference a task reported, or the spec's own when none did.
        if release:
            stopping = tuple((t.task_index, t.node_key) for t in live)
            self.engine.requeue(job_id, fx.now, stopping, avoid_nodes)
        spec = job.spec
        if job.grant_picked:
            # The grant that paid this attempt may have ended or run dry, so the grant service
            # picks again for the next one.
            spec = evolve(spec, grant_id="")
        requeued = evolve(
            job,
            spec=spec,
            grant_picked=False,
            state="pending",
            pending_reason="requeued",
            reason=reason,
            attempt=job.attempt + 1,
            placement=(),
            hold_id="",
            hold_amount=None,
            started_at=None,
            stop_outcome="",
            preemptor_id="",
            stop_deadline=None,
            avoid_nodes=tuple(sorted({*job.avoid_nodes, *avoid_nodes})),
            attempt_reason=reason,
            rendezvous_port=0,
        )
        self.jobs[job_id] = requeued
        fx.change(requeued, cause)
        self._release_stopped_nodes(job)
        self._release_port(job)

    def fail_hardware(
        self, job_id: str, message: str, failure: AcceleratorHealth, fx: Effects
    ) -> None:
        """End the attempt of a job whose accelerator failed, then requeue the job whole.

        Its tasks on the failed accelerator are recorded as ``failed_hardware`` in the ended
        attempt, and the attempt's trigger names the health event. Every live task gets a stop
        command, and the agent reports the ones on the failed accelerator as FAILED_HARDWARE.
        The engine has already requeued the job and fenced all its accelerators. Each node's
        share is freed once no copy of the job there awaits a confirmed stop.
        """
        job = self.jobs.get(job_id)
        if job is None or job.terminal:
            return
        reason = f"hardware failure: {message}"
        tasks = list(job.placement)
        for position, task in enumerate(tasks):
            on_failed = (
                task.node_key == failure.node_key and failure.accelerator_id in task.accelerators
            )
            if not on_failed or task.state not in _LIVE:
                continue
            fx.commands.append(stop_record(job_id, job.attempt, task, reason, 0, self.epoch))
            self._add_orphan(task, TaskId(job_id, job.attempt, task.task_index))
            tasks[position] = evolve(task, state="failed_hardware")
        job = evolve(job, placement=tuple(tasks))
        self.jobs[job_id] = job
        logger.warning(
            "job %s attempt %d: %s", job_id, job.attempt, reason, extra={"job_id": job_id}
        )
        stopping = self._stopping.get(job_id)
        if stopping is not None and stopping.outcome is not None:
            # A cancel or failure was already stopping the job: it ends as that, not requeued.
            self.engine.remove(job_id)
            job = self._await_stops(job)
            self._finish(job, stopping.outcome, stopping.reason, stopping.cause, fx)
            self._release_stopped_nodes(job)
            return
        self.requeue(job_id, reason, f"health:{failure.event_id}", fx, release=False)

    def _count_start_failure(self, job: Job) -> bool:
        """Count an attempt of ``job`` that failed to start; return True at the limit.

        A node that rejects every start of a job (an accelerator it found unusable, say)
        would otherwise see the job requeued, placed there again and rejected in a loop, with a
        budget hold placed for each attempt. The count is stored with the job's next change,
        so a new leader continues from it.
        """
        counted = evolve(job, start_failures=job.start_failures + 1)
        self.jobs[job.job_id] = counted
        return counted.start_failures >= MAX_START_FAILURES

    def _on_started(self, job: Job, fx: Effects) -> None:
        fx.change(job, "task:started")
        # A short task may exit before the last task of its gang starts: it started too.
        if job.state == "starting" and all(t.state in _RAN for t in job.placement):
            self._starting_since.pop(job.job_id, None)
            running = evolve(job, state="running", reason="", started_at=fx.now, start_failures=0)
            self.jobs[job.job_id] = running
            fx.change(running, "task:started")
            fx.events.append(job_event(running, "started", "task:started", "every task started"))

    def _on_task_done(self, job: Job, node_key: str, fx: Effects) -> None:
        fx.change(job, "task:exited")
        if job.state == "starting":
            # A task ended without a start event for the job before it, so the job starts now.
            self._on_started(job, fx)
            job = self.jobs[job.job_id]
        if all(t.state == "exited" and t.exit_code == 0 for t in job.placement):
            self.engine.end(job.job_id, "completed", fx.now)
            self._finish(job, "completed", "every task exited with code 0", "task:exited", fx)

    def _on_stopping_task(
        self, job: Job, task_index: int, state: str, node_key: str, fx: Effects
    ) -> None:
        fx.change(job, f"task:{state}")
        if state == "started":
            return
        self._release_fences(node_key, job.job_id)
        stopping = self._stopping[job.job_id]
        stopping.pending.discard(task_index)
        if not stopping.pending:
            del self._stopping[job.job_id]
            self._settle_stopped(job, stopping.outcome, stopping.reason, stopping.cause, fx)

    def _settle_stopped(
        self, job: Job, outcome: JobState | None, reason: str, cause: str, fx: Effects
    ) -> None:
        if outcome is None and all(t.state == "exited" and t.exit_code == 0 for t in job.placement):
            # Every task finished before the preemption's stop reached it, so a requeue would
            # run the finished job again.
            outcome, reason = "completed", "every task exited with code 0"
        if outcome is None:
            fx.events.append(job_event(job, "preempted", cause, reason))
            self.requeue(job.job_id, reason, cause, fx, release=True)
            return
        self.engine.end(job.job_id, outcome, fx.now)
        self._finish(job, outcome, reason, cause, fx)

    def _end_stopping(self, job_id: str, outcome: JobState, fx: Effects) -> None:
        """End a job whose stop lost a node, as the outcome its stop was heading for.

        The caller has already released the job in the engine, which keeps its accelerators
        fenced on every node where it ran. Its live tasks got their stop commands when the stop
        began, and they become orphans until their nodes confirm.
        """
        job = self.jobs.get(job_id)
        stopping = self._stopping.pop(job_id, None)
        if job is None or stopping is None:
            return
        reason = f"{stopping.reason}; a node was lost while it stopped"
        job = self._await_stops(job)
        self._finish(job, outcome, reason, stopping.cause, fx)
        self._release_stopped_nodes(job)

    def _release_stopped_nodes(self, job: Job) -> None:
        """Free the fences of a job that the engine requeued or ended, on each node of its
        placement where none of its copies awaits a confirmed stop.

        The engine fences every share of a gang requeued after a lost node or a failed
        accelerator, and of a stopping job that loses a node, also those of tasks that had
        already ended.
        """
        for node_key in sorted({t.node_key for t in job.placement}):
            self._release_fences(node_key, job.job_id)

    def _await_stops(self, job: Job) -> Job:
        """Return ``job`` with its live tasks, whose stop commands are out, as ``stopping``.

        Each becomes an orphan until its node confirms the stop, and the ended job then records
        the state the node confirmed.
        """
        tasks = list(job.placement)
        for position, task in enumerate(tasks):
            if task.state in _LIVE:
                self._add_orphan(task, TaskId(job.job_id, job.attempt, task.task_index))
                tasks[position] = evolve(task, state=STOPPING)
        return evolve(job, placement=tuple(tasks))

    def _finish(self, job: Job, state: JobState, reason: str, cause: str, fx: Effects) -> None:
        """Make ``job`` terminal; the caller has already reported the end to the engine."""
        ended = evolve(
            job,
            state=state,
            reason=reason,
            pending_reason="",
            ended_at=fx.now,
            stop_outcome="",
            preemptor_id="",
            stop_deadline=None,
        )
        codes = [t.exit_code for t in job.placement if t.exit_code]
        if state == "completed":
            # A requeued job completes by an earlier attempt's exit, whatever the code of the
            # attempt that was stopped for it.
            ended = evolve(ended, exit_code=0)
        elif codes:
            ended = evolve(ended, exit_code=codes[0])
        self.jobs.pop(job.job_id, None)
        self.dependencies.ended(job.job_id, state)
        self._stopping.pop(job.job_id, None)
        self._admitting.discard(job.job_id)
        self._starting_since.pop(job.job_id, None)
        if any(t.state == STOPPING for t in ended.placement):
            self._ended[job.job_id] = ended
        self._release_port(job)
        fx.change(ended, cause)
        fx.events.append(job_event(ended, "ended", cause, reason))

    def _abandon_admission(self, job: Job) -> None:
        if job.job_id in self._admitting:
            self._admitting.discard(job.job_id)
            self._abandoned[(job.job_id, job.attempt)] = job

    def _release_abandoned(self, job: Job, outcome: HoldOutcome, fx: Effects) -> None:
        """Have metering settle a hold placed for an attempt that was requeued meanwhile."""
        if outcome.status != "held":
            return
        logger.info(
            "releasing hold %s of abandoned attempt %d of job %s",
            outcome.hold_id,
            job.attempt,
            job.job_id,
        )
        fx.events.append(
            job_event(
                job,
                "requeued",
                "hold",
                "attempt ended before it started",
                placement=(),
                hold_id=outcome.hold_id,
            )
        )

    def _stop_stale(self, job: Job, tid: TaskId, node_key: str, fx: Effects) -> None:
        provider, region, node = node_key.split(".", 2)
        task = TaskPlacement(tid.task_index, provider, region, node, ())
        fx.commands.append(
            stop_record(job.job_id, tid.attempt, task, "attempt superseded", 0, self.epoch)
        )
        self._add_orphan(task, tid)

    def _stop_replaced(self, job: Job, tid: TaskId, node_key: str, fx: Effects) -> None:
        """Stop again a copy that reports started on a node its task was replaced from.

        The command has the key of the latest replacement's stop when that replacement left
        ``node_key``, so a redelivered report adds no command.
        """
        logger.warning(
            "task %s reported started on node %s, which it was replaced from; stopping it",
            tid,
            node_key,
            extra={"job_id": job.job_id},
        )
        provider, region, node = node_key.split(".", 2)
        task = TaskPlacement(tid.task_index, provider, region, node, ())
        kind = replacement_kind("stop", node_key, job.replacements)
        fx.commands.append(
            stop_record(job.job_id, tid.attempt, task, "task replaced", 0, self.epoch, kind)
        )
        self._add_orphan(task, tid)

    def _add_orphan(self, task: TaskPlacement, tid: TaskId) -> None:
        """Wait for ``task``'s node to confirm that the copy ``tid`` stopped."""
        task_id = str(tid)
        waiting = self._orphans.setdefault(task.node_key, set())
        if task_id in waiting:
            return
        waiting.add(task_id)
        port = self.ports.port_of(task.node_key, task_id)
        orphan = Orphan(task.node_key, task_id, task.accelerators, task.millis, port)
        self._orphan_writes[(task.node_key, task_id)] = orphan

    def _confirm_orphan(
        self,
        node_key: str,
        task_id: str,
        job_id: str,
        fx: Effects,
        state: str = "stopped",
        exit_code: int | None = None,
    ) -> None:
        """Confirm that the copy ``task_id`` on ``node_key`` ended in ``state``."""
        orphans = self._orphans.get(node_key)
        if not orphans or task_id not in orphans:
            return
        orphans.discard(task_id)
        if not orphans:
            del self._orphans[node_key]
        self._orphan_writes[(node_key, task_id)] = None
        self.ports.release(node_key, task_id)
        self._release_fences(node_key, job_id)
        if job_id in self._ended:
            self._record_stop(node_key, TaskId.parse(task_id), state, exit_code, fx)

    def _record_stop(
        self, node_key: str, tid: TaskId, state: str, exit_code: int | None, fx: Effects
    ) -> None:
        """Replace the ``stopping`` state of a task of an ended job with the one confirmed."""
        job = self._ended[tid.job_id]
        if job.attempt != tid.attempt:
            return
        tasks = list(job.placement)
        index = next((i for i, t in enumerate(tasks) if t.task_index == tid.task_index), None)
        if index is None:
            return
        task = tasks[index]
        if task.node_key != node_key or task.state != STOPPING:
            return  # a copy on a node the task was replaced from, or a stop already confirmed
        code = task.exit_code if exit_code is None else exit_code
        tasks[index] = evolve(task, state=state, exit_code=code)
        job = evolve(job, placement=tuple(tasks))
        if any(t.state == STOPPING for t in tasks):
            self._ended[job.job_id] = job
        else:
            del self._ended[job.job_id]
        fx.change(job, f"task:{state}")

    def _claim_port(self, job: Job) -> None:
        """Reserve again the rendezvous port of a reloaded job's attempt on its task 0's node."""
        task_zero = _task_zero(job)
        if task_zero is None:
            return
        port = job.rendezvous_port
        if not port:
            # Started before the port was stored: it got the hashed port of its node's range.
            ports = self._endpoint_of(task_zero.node_key).ports
            port = rendezvous_port(job.job_id, job.attempt, *ports)
        task_id = str(TaskId(job.job_id, job.attempt, 0))
        self.ports.claim(task_zero.node_key, task_id, port)

    def _release_port(self, job: Job) -> None:
        """Free the rendezvous port of ``job``'s attempt, unless its task 0 copy awaits a
        confirmed stop, which frees the port once it comes."""
        task_zero = _task_zero(job)
        if task_zero is None:
            return
        task_id = str(TaskId(job.job_id, job.attempt, 0))
        if task_id not in self._orphans.get(task_zero.node_key, ()):
            self.ports.release(task_zero.node_key, task_id)

    def _release_fences(self, node_key: str, job_id: str) -> None:
        """Free what the engine keeps fenced for ``job_id`` on ``node_key`` once no copy of the
        job there awaits a confirmed stop.

        The engine frees the job's fenced shares on the node together, so it waits for every
        copy there. While a task of the current attempt there is live, that attempt's share
        stays fenced and only older shares are freed.
        """
        prefix = f"{job_id}/"
        if any(task_id.startswith(prefix) for task_id in self._orphans.get(node_key, ())):
            return
        job = self.jobs.get(job_id)
        running = job is not None and any(
            t.node_key == node_key and t.state in _LIVE for t in job.placement
        )
        self.engine.tasks_stopped(node_key, job_id, keep_running=running)


def _task_zero(job: Job) -> TaskPlacement | None:
    """Return task 0 of ``job``'s placement, whose node hosts the rendezvous, or None."""
    return next((task for task in job.placement if task.task_index == 0), None)


def _reloaded_outcome(stored: str) -> JobState | None:
    """Return what a reloaded stopping job becomes: None to requeue it.

    Rows stored before the outcome was kept have none, and end as cancelled as they did.
    """
    if stored == REQUEUE:
        return None
    return _STOP_OUTCOMES.get(stored, "cancelled")
