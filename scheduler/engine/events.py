"""Facts the engine applies between scheduling passes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from scheduler.engine.spec import NodeSpec, Pledge


@dataclass(frozen=True, slots=True)
class NodeAdded:
    node: NodeSpec


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """A heartbeat from a node's agent: an unknown or down node is up again, or draining
    when a :class:`NodeDrain` without a later :class:`NodeUndrain` applies to it.

    It frees nothing: accelerators of lost tasks on an unknown node stay allocated until
    :class:`TasksStopped` confirms those tasks are gone.
    """

    node_id: str


@dataclass(frozen=True, slots=True)
class NodeMissedHeartbeats:
    """The node's heartbeats stopped: it becomes unknown and its jobs lose their tasks there."""

    node_id: str


@dataclass(frozen=True, slots=True)
class NodeDown:
    """The node is off (operator or provider says so): nothing runs on it any more."""

    node_id: str


@dataclass(frozen=True, slots=True)
class NodeDrain:
    """No new tasks start on the node, until :class:`NodeUndrain`. The drain stays while the
    node is unknown or down.

    With ``evict`` the operator has stopped its tasks as well; their jobs are repaired or
    requeued in the next pass. Without it running tasks go on until they end.
    """

    node_id: str
    evict: bool = False


@dataclass(frozen=True, slots=True)
class NodeUndrain:
    """A draining node takes new tasks again. An unknown or down node returns up, not draining."""

    node_id: str


@dataclass(frozen=True, slots=True)
class TasksStopped:
    """The agent confirms a job's tasks on the node have stopped, which frees what they held."""

    node_id: str
    job_id: str


@dataclass(frozen=True, slots=True)
class AcceleratorFailed:
    """One accelerator of a node failed (a fatal health event): nothing new is placed on it.

    Every running job with a share of it is requeued whole in the next pass. Its tasks may
    run until their agents confirm the stops, so each of its shares stays allocated until
    :class:`TasksStopped` for the job on that node. A repeat for an accelerator already
    failed changes nothing.
    """

    node_id: str
    accelerator_id: str
    event_id: str
    """The health event, named in the requeue of each job it stops."""
    reason: str = ""
    """Description of the failure, e.g. ``XID 79: GPU has fallen off the bus``."""


@dataclass(frozen=True, slots=True)
class AcceleratorRecovered:
    """A failed accelerator is healthy again (its condition cleared) and can be placed."""

    node_id: str
    accelerator_id: str


class JobOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    """Stopped by a preemption decision: the job goes back to the queue."""


@dataclass(frozen=True, slots=True)
class JobEnded:
    """Every task of a running job has stopped."""

    job_id: str
    outcome: JobOutcome


@dataclass(frozen=True, slots=True)
class JobRequeued:
    """The caller ended a running job's attempt before its tasks stopped, and the job goes
    back to the queue whole (a task failed to start, or the tasks did not start in time).

    The share of each task in ``stopping`` stays fenced until :class:`TasksStopped` for the
    job on its node, because the task may still run there. The job's other shares are freed.
    """

    job_id: str
    stopping: tuple[tuple[int, str], ...] = ()
    """``(task index, node id)`` of each task that got a stop command its node has not
    confirmed. A task whose allocation is on another node (it was replaced from this one)
    fences nothing."""
    avoid_nodes: tuple[str, ...] = ()
    """Node ids that rejected a task's start: the job's later attempts go there only if no
    other node has room."""
    started: bool = True
    """Whether start commands went out for the attempt. An attempt that ends before that, such
    as one whose budget hold failed, leaves no "requeued" note in the job's later reasons."""


@dataclass(frozen=True, slots=True)
class PledgeAdded:
    pledge: Pledge


@dataclass(frozen=True, slots=True)
class PledgeRemoved:
    pledge_id: str


@dataclass(frozen=True, slots=True)
class RecallAnnounced:
    """A provider takes ``count`` recallable accelerators of a pool back at ``effective_at``.

    New work stops using them at once; running jobs over the reduced capacity are preempted
    with the notice period as their grace.
    """

    recall_id: str
    provider: str
    region: str
    model: str
    count: int
    effective_at: float
    until: float | None = None
    """End of the recall; ``None`` lasts until :class:`RecallEnded`."""
    pledge_id: str = ""
    """Pledge the recall takes from. The recall stops counting when that pledge's window ends
    or the pledge is removed. Empty counts it against the pool until ``until``."""


@dataclass(frozen=True, slots=True)
class RecallEnded:
    recall_id: str


@dataclass(frozen=True, slots=True)
class BudgetChanged:
    """Whether a grant or sub-allocation can hold budget for another job (from the grant service).

    ``available=False`` with a ``size`` blocks the project's jobs with the same
    :attr:`JobSpec.payer` whose :attr:`JobSpec.budget_size` is at least ``size``; 0.0 blocks all
    of them. Jobs paid by another grant or sub-allocation are not blocked. Of several blocks on
    one payer, the smallest size applies, and ``available=True`` lifts them.
    """

    project: str
    available: bool
    size: float = 0.0
    job_id: str = ""
    """The job whose hold the grant service rejected, or empty."""
    message: str = ""
    """The reason for rejecting that hold, with the hold and the grant's available budget."""
    retry_at: float | None = None
    """When the scheduler asks for the payer's holds again, or None when unknown."""
    payer: str = ""
    """The :attr:`JobSpec.payer` whose jobs the block holds back. Empty blocks the project's
    jobs that name no grant."""


Event = (
    NodeAdded
    | NodeHeartbeat
    | NodeMissedHeartbeats
    | NodeDown
    | NodeDrain
    | NodeUndrain
    | TasksStopped
    | AcceleratorFailed
    | AcceleratorRecovered
    | JobEnded
    | JobRequeued
    | PledgeAdded
    | PledgeRemoved
    | RecallAnnounced
    | RecallEnded
    | BudgetChanged
)
