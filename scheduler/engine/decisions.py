"""Frozen outputs of a scheduling pass: decisions and the reason every pending job waits."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReasonCode(StrEnum):
    """Reason a job is pending. The names match ``acsp.v1.PendingReason`` in lower case."""

    NO_CAPACITY = "no_capacity"
    NO_MATCHING_MODEL = "no_matching_model"
    BUDGET = "budget"
    FAIR_SHARE = "fair_share"
    RESERVATION = "reservation"
    PROVIDER_RECALL = "provider_recall"
    LIMIT = "limit"
    TOPOLOGY = "topology"
    REQUEUED = "requeued"
    PRIORITY = "priority"
    TASK_TOO_LARGE = "task_too_large"


class Cause(StrEnum):
    """Trigger of a preemption or a requeue."""

    PRIORITY = "priority"
    PROVIDER_RECALL = "provider_recall"
    PLEDGE_ENDED = "pledge_ended"
    NODE_FAILURE = "node_failure"
    ACCELERATOR_FAILURE = "accelerator_failure"


@dataclass(frozen=True, slots=True)
class TaskPlacement:
    """One task on accelerators of one node."""

    task_index: int
    node_id: str
    accelerator_ids: tuple[str, ...]
    millis: int
    """Thousandths of each listed accelerator the task gets (1000 for exclusive use)."""


@dataclass(frozen=True, slots=True)
class Place:
    job_id: str
    tasks: tuple[TaskPlacement, ...]


@dataclass(frozen=True, slots=True)
class ReplaceTask:
    """Start a gang's lost task on new accelerators; the other tasks keep running."""

    job_id: str
    task: TaskPlacement
    lost_node_id: str


@dataclass(frozen=True, slots=True)
class Preempt:
    """Stop a running job by ``deadline``; it returns to the queue once stopped."""

    job_id: str
    cause: Cause
    cause_id: str
    """The preempting job id, or the recall or pledge id."""
    deadline: float
    """Time by which the job must have stopped; ``deadline - now`` is its grace."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A pending job now waits for a running job that an earlier decision is stopping, instead
    of preempting others, because that stop frees room it fits on.

    The caller records ``preemptor_id`` with the stopping job, so that after a restart it can
    pass it to :meth:`~scheduler.engine.engine.Engine.mark_preempted` instead of the job the
    stop was decided for.
    """

    job_id: str
    """The stopping job."""
    preemptor_id: str
    """The pending job that waits for it."""


@dataclass(frozen=True, slots=True)
class Requeue:
    """A running job lost tasks, or an accelerator under it failed, and goes back to the queue
    whole.

    Its tasks on the nodes still up must be stopped, and they may run until their nodes
    confirm. So every task's accelerators stay allocated until
    :class:`~scheduler.engine.events.TasksStopped` for the job on its node, also after a
    failed accelerator. The caller sends TasksStopped for each node once no task of the job
    runs there. A stopping job (preempted, or marked by the caller) is never repaired in
    place.
    """

    job_id: str
    cause: Cause
    message: str
    cause_id: str = ""
    """The health event that failed an accelerator (``ACCELERATOR_FAILURE``), else empty."""


@dataclass(frozen=True, slots=True)
class Reserve:
    """Accelerators kept for a pending job from ``start_time`` on; backfill may not delay it."""

    job_id: str
    start_time: float
    node_ids: tuple[str, ...]


Decision = Place | ReplaceTask | Preempt | Claim | Requeue | Reserve


@dataclass(frozen=True, slots=True)
class Waiting:
    """Reason one pending job did not start in this pass."""

    job_id: str
    reason: ReasonCode
    message: str


_new_object = object.__new__
_set_job_id = Waiting.__dict__["job_id"].__set__
_set_reason = Waiting.__dict__["reason"].__set__
_set_message = Waiting.__dict__["message"].__set__


def new_waiting(job_id: str, reason: ReasonCode, message: str) -> Waiting:
    """Return ``Waiting(job_id, reason, message)``, built about twice as fast.

    A pass builds one per pending job. The frozen dataclass ``__init__`` sets each slot through
    ``object.__setattr__``; this sets the same slots through their descriptors directly.
    """
    waiting = _new_object(Waiting)
    _set_job_id(waiting, job_id)
    _set_reason(waiting, reason)
    _set_message(waiting, message)
    return waiting


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    now: float
    decisions: tuple[Decision, ...]
    waiting: tuple[Waiting, ...]
