"""Frozen inputs of the engine: nodes, pledges, jobs, limits and their validation.

Accelerator shares are integer thousandths ("millis"): 250 is a quarter of one accelerator,
8000 is eight whole ones. A task requests either a fraction of one accelerator (1..999) or a
multiple of 1000, so every sum the engine makes is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

MILLIS_PER_ACCELERATOR: Final = 1000
MAX_TASKS: Final = 4096
"""Task count limit of one job. The scheduler service rejects a larger job at submission, and
the simulator skips such a trace row."""


class InvalidInputError(ValueError):
    """An input that the engine rejects; the message names the field and the reason."""


class PriorityClass(IntEnum):
    """Priority classes; a larger value is served first and may preempt ``PREEMPTIBLE``."""

    PREEMPTIBLE = 0
    STANDARD = 1
    INTERACTIVE = 2


class Topology(StrEnum):
    """Where the tasks of one job must sit relative to each other."""

    SAME_NODE = "same_node"
    SAME_INTERCONNECT_DOMAIN = "same_interconnect_domain"
    """One NVLink (or other scale-up interconnect) domain."""
    SAME_REGION = "same_region"
    SAME_PROVIDER = "same_provider"


class NodeState(StrEnum):
    """Health of a node in the engine's view."""

    UP = "up"
    DRAINING = "draining"
    """Running tasks go on; nothing new starts."""
    UNKNOWN = "unknown"
    """Missed heartbeats: its accelerators stay allocated until its tasks are confirmed stopped."""
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One machine with accelerators of a single model."""

    node_id: str
    provider: str
    region: str
    model: str
    accelerator_ids: tuple[str, ...]
    """UUIDs or PCI bus ids, in the node's device order."""
    interconnect_domain: str = ""
    """NVLink domain id; empty means the node is a domain of its own."""
    display_name: str = ""
    """The node as job messages name it, e.g. ``provider/region/node``; empty uses
    ``node_id``."""
    max_jobs: int = 0
    """Jobs the node runs at once at most (its agent's pool of task users); 0 is no limit."""

    @property
    def region_key(self) -> str:
        """``provider/region``, the form allowed-region lists use."""
        return f"{self.provider}/{self.region}"

    @property
    def name(self) -> str:
        """``display_name``, or ``node_id`` when that is empty."""
        return self.display_name or self.node_id


@dataclass(frozen=True, slots=True)
class Pledge:
    """A provider's promise of accelerators of one model in one region over ``[start, end)``."""

    pledge_id: str
    provider: str
    region: str
    model: str
    protected: int
    """Accelerators the provider never recalls inside the window."""
    recallable: int
    """Accelerators the provider may take back with notice."""
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class ModelConstraint:
    """Properties an accelerator model must have; empty fields match any model."""

    vendor: str = ""
    min_memory_gib: int = 0
    software_stack: str = ""
    """Prefix of the model's stack, e.g. ``cuda-12``."""


NO_CONSTRAINT: Final = ModelConstraint()
"""The default constraint, shared by every job that sets none."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job in the form the engine schedules."""

    job_id: str
    project: str
    institution: str
    submit_time: float
    program: str = "default"
    priority: PriorityClass = PriorityClass.STANDARD
    task_count: int = 1
    millis_per_task: int = MILLIS_PER_ACCELERATOR
    """1..999 for a share of one accelerator, else a multiple of 1000 (whole, exclusive)."""
    topology: Topology = Topology.SAME_PROVIDER
    allow_cross_provider: bool = False
    cross_provider_denied_by: frozenset[str] = frozenset()
    """Providers that do not allow cross-provider gangs, which keep the tasks within one
    provider although the job asked to span providers. Empty unless the caller cleared
    ``allow_cross_provider`` for that reason. Pending reasons name these providers."""
    models: frozenset[str] = frozenset()
    """Accepted catalog models; empty accepts any model that meets ``constraint``."""
    constraint: ModelConstraint = NO_CONSTRAINT
    regions: frozenset[str] = frozenset()
    """Allowed ``provider/region`` keys (data residency); empty allows any."""
    wall_time_s: float | None = None
    """Wall-time limit; backfill and reservations need it, ``None`` means unbounded."""
    checkpointable: bool = False
    start_at: float | None = None
    """Start time of an advance reservation; ``None`` starts as soon as possible."""
    avoid_nodes: frozenset[str] = frozenset()
    """Node ids that rejected the start of an earlier attempt. The job is placed there only if
    no other node has room."""
    payer: str = ""
    """The grant or sub-allocation that pays the job's hold, as budget blocks key it (see
    :class:`~scheduler.engine.events.BudgetChanged`). Empty for a job that names no grant,
    which the grant service charges to a grant of the project that it picks per hold."""

    @property
    def fractional(self) -> bool:
        return self.millis_per_task < MILLIS_PER_ACCELERATOR

    @property
    def accelerators_per_task(self) -> int:
        """Whole accelerators each task uses (1 for a fractional task)."""
        return max(1, self.millis_per_task // MILLIS_PER_ACCELERATOR)

    @property
    def total_millis(self) -> int:
        return self.task_count * self.millis_per_task

    @property
    def budget_size(self) -> float:
        """Milli-accelerator-seconds the job may use, which its hold pays for; inf if unbounded."""
        if self.wall_time_s is None:
            return math.inf
        return self.total_millis * self.wall_time_s

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` naming the first invalid field."""
        if not self.job_id:
            raise InvalidInputError("job_id: must not be empty")
        if not self.project or not self.institution or not self.program:
            raise InvalidInputError(
                f"job {self.job_id}: project, institution and program must not be empty"
            )
        if self.task_count < 1:
            raise InvalidInputError(f"job {self.job_id}: task_count must be >= 1")
        millis = self.millis_per_task
        if millis < 1 or (millis > MILLIS_PER_ACCELERATOR and millis % MILLIS_PER_ACCELERATOR):
            raise InvalidInputError(
                f"job {self.job_id}: millis_per_task={millis} must be 1..999 or a multiple of 1000"
            )
        if not math.isfinite(self.submit_time):
            raise InvalidInputError(
                f"job {self.job_id}: submit_time is {self.submit_time}, not a finite number of "
                "seconds. Set it to the time the job was submitted."
            )
        wall_time = self.wall_time_s
        if wall_time is not None and not math.isfinite(wall_time):
            raise InvalidInputError(
                f"job {self.job_id}: wall_time_s is {wall_time}, not a finite number of seconds. "
                "Set it to a limit > 0, or to None for a job without a limit."
            )
        if wall_time is not None and wall_time <= 0:
            raise InvalidInputError(f"job {self.job_id}: wall_time_s must be > 0 when set")
        if self.start_at is not None and not math.isfinite(self.start_at):
            raise InvalidInputError(
                f"job {self.job_id}: start_at is {self.start_at}, not a finite number of "
                "seconds. Set it to the start of the advance reservation, or to None."
            )
        if self.allow_cross_provider and self.cross_provider_denied_by:
            raise InvalidInputError(
                f"job {self.job_id}: cross_provider_denied_by must be empty when "
                "allow_cross_provider is true; clear one of them"
            )
        if self.fractional and self.task_count > 1 and self.topology in _SINGLE_DOMAIN:
            raise InvalidInputError(
                f"job {self.job_id}: a fractional multi-task job needs topology same_region or "
                "same_provider"
            )


_SINGLE_DOMAIN: Final = frozenset({Topology.SAME_NODE, Topology.SAME_INTERCONNECT_DOMAIN})


class LimitScope(StrEnum):
    """What a limit caps."""

    PROJECT = "project"
    INSTITUTION = "institution"
    POOL = "pool"
    """Accelerators of one ``provider/region/model`` pool used by the plan at once."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A cap on accelerators in use, in millis."""

    scope: LimitScope
    key: str
    """Project id, institution id, or ``provider/region/model``."""
    max_millis: int


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Policy settings of the engine."""

    half_life_s: float | None
    """Half-life of decayed fair-share usage; required, there is no implicit default."""
    preemption_grace_s: float = 300.0
    """Time a checkpointable job gets to checkpoint before it is stopped."""
    reservation_depth: int = 1
    """Pending jobs per pass that get a backfill reservation."""
    default_weight: float = 1.0
    """Fair-share weight of an account without an explicit weight."""
    preemptions_per_pass: int = 32
    """Pending jobs per pass that may preempt others, so one pass stays bounded."""

    def validate(self) -> None:
        if self.half_life_s is None:
            raise InvalidInputError("half_life_s: must be set (seconds of fair-share decay)")
        if not math.isfinite(self.half_life_s) or self.half_life_s <= 0:
            raise InvalidInputError(
                f"half_life_s: {self.half_life_s} must be a finite number of seconds > 0"
            )
        if not math.isfinite(self.preemption_grace_s) or self.preemption_grace_s < 0:
            raise InvalidInputError(
                f"preemption_grace_s: {self.preemption_grace_s} must be a finite number of "
                "seconds >= 0"
            )
        if self.reservation_depth < 0:
            raise InvalidInputError("reservation_depth: must be >= 0")
        if self.preemptions_per_pass < 0:
            raise InvalidInputError("preemptions_per_pass: must be >= 0")
        if not math.isfinite(self.default_weight) or self.default_weight < 0:
            raise InvalidInputError(
                f"default_weight: {self.default_weight} must be a finite number >= 0"
            )
