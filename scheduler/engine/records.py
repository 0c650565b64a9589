"""Mutable per-job state kept by the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler.engine.decisions import Cause
from scheduler.engine.fleet import NodeRecord
from scheduler.engine.spec import JobSpec

if TYPE_CHECKING:
    from scheduler.engine.shapes import JobShape


@dataclass(slots=True)
class TaskAllocation:
    """Accelerators allocated to one running task."""

    node: NodeRecord
    indices: tuple[int, ...]
    millis: int


@dataclass(slots=True)
class JobRecord:
    spec: JobSpec
    sequence: int
    """Submission order; breaks ties so the engine is deterministic."""
    attempt: int = 0
    tasks: dict[int, TaskAllocation] | None = None
    """Task index -> allocation while the job runs; ``None`` while pending."""
    start: float | None = None
    lost: set[int] = field(default_factory=set)
    """Tasks lost to a failed, unknown or evicted node, awaiting repair."""
    lost_nodes: dict[int, str] = field(default_factory=dict)
    hardware_fault: tuple[str, str] | None = None
    """``(health event id, message)`` of a failed accelerator under the job: the next pass
    requeues it whole instead of repairing it."""
    stopping: bool = False
    """A preemption decision is out, or the caller marked a stop of its own, and the job has
    not stopped yet."""
    preempted_by: set[tuple[Cause, str]] = field(default_factory=set)
    stop_deadline: float | None = None
    """Deadline by which a preemption decision requires the running job to have stopped. None
    while no decision stops it, or when an earlier engine made the decision and its caller
    did not restore the deadline."""
    awaiting_victims: frozenset[str] = frozenset()
    """Preempted jobs this job waits for; replaced, never changed in place."""
    requeue_message: str = ""
    protected: bool = False
    """Placed through an advance reservation on protected capacity."""
    shape: JobShape | None = None
    """The shape shared with jobs of the same candidate pools and demand; set on submit."""

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def owner(self) -> str:
        """Owner id of the current attempt on accelerators: ``job_id#attempt``."""
        return f"{self.spec.job_id}#{self.attempt}"

    @property
    def running(self) -> bool:
        return self.tasks is not None

    @property
    def end_estimate(self) -> float | None:
        if self.start is None or self.spec.wall_time_s is None:
            return None
        return self.start + self.spec.wall_time_s


def job_of(owner: str) -> str:
    """Return the job id of a owner id."""
    return owner.rsplit("#", 1)[0]
