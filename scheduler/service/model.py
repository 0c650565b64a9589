"""Frozen dataclasses for jobs, tasks and dispatches, free of protobuf and I/O.

The gRPC layer converts requests into these types before any logic runs, and the store
persists them. Amounts are :class:`~decimal.Decimal` PF-days, durations are seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal

from services.runtime.evolve import evolve

JobState = Literal[
    "pending", "starting", "running", "stopping", "completed", "failed", "cancelled", "timed_out"
]
"""Lifecycle of a job, as ``acsp.v1.JobState`` names it in lower case.

``pending`` waits for placement or admission, and ``Job.pending_reason`` gives the reason.
``starting`` has a placement and a hold and its start commands are out. ``running`` has every
task started. ``stopping`` waits for its tasks to exit after a cancel, a preemption or the
wall-time limit.
The last four are terminal.
"""

JOB_STATES: Final[tuple[str, ...]] = (
    "pending",
    "starting",
    "running",
    "stopping",
    "completed",
    "failed",
    "cancelled",
    "timed_out",
)
TERMINAL_STATES: Final[frozenset[str]] = frozenset(
    {"completed", "failed", "cancelled", "timed_out"}
)
OPEN_STATES: Final[frozenset[str]] = frozenset({"pending", "starting", "running", "stopping"})

PENDING_REASONS: Final[tuple[str, ...]] = (
    "",
    "no_capacity",
    "no_matching_model",
    "budget",
    "fair_share",
    "reservation",
    "provider_recall",
    "limit",
    "topology",
    "requeued",
    "priority",
    "dependency",
    "task_too_large",
)
"""Reason a pending job waits, named as ``acsp.v1.PendingReason`` in lower case."""

PRIORITY_CLASSES: Final[tuple[str, ...]] = ("interactive", "standard", "preemptible")
"""Priority classes, highest first, as ``acsp.v1.PriorityClass`` names them."""

TOPOLOGIES: Final[tuple[str, ...]] = (
    "",
    "same_node",
    "same_interconnect_domain",
    "same_region",
    "same_provider",
)
"""Topology rules of a multi-task job; empty applies the default rule (same provider)."""

MILLIS_PER_ACCELERATOR: Final = 1000


_last_id_micros = 0


def new_job_id() -> str:
    """Return a job id that sorts by creation time: ``j``, 14 hex digits of microseconds, and
    6 random hex digits. Ids made by one process strictly increase."""
    global _last_id_micros
    micros = max(time.time_ns() // 1000, _last_id_micros + 1)
    _last_id_micros = micros
    return f"j{micros:014x}{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Job request from a researcher, validated and independent of the wire format."""

    name: str
    """Free-form label shown in listings."""
    project_id: str
    """Project the job runs for."""
    command: tuple[str, ...]
    """Program and arguments each task runs (argv, no shell)."""
    grant_id: str = ""
    """Grant that pays; empty lets the grant service pick the project's grant expiring first,
    unless the scheduler picks a sub-allocation (see ``sub_allocation_picked``)."""
    sub_allocation_id: str = ""
    task_count: int = 1
    accelerator_millis_per_task: int = MILLIS_PER_ACCELERATOR
    """Accelerators per task in thousandths: 250 is a quarter of one, 8000 is eight."""
    gang: bool = True
    """The request's gang flag, stored as sent. The engine ignores it and starts all tasks of
    every job together or none of them."""
    topology: str = ""
    """One of :data:`TOPOLOGIES`."""
    allow_cross_provider: bool = False
    models: tuple[str, ...] = ()
    """Accepted catalog models; empty accepts any."""
    vendor: str = ""
    """Required vendor (``nvidia``, ``amd``, ...); empty accepts any."""
    min_memory_gib: int = 0
    software_stack: str = ""
    """Required software stack prefix, e.g. ``cuda-12``; empty accepts any."""
    allowed_regions: tuple[str, ...] = ()
    """``<provider>/<region>`` or ``jurisdiction:<code>`` entries; empty allows any."""
    priority: str = "standard"
    """One of :data:`PRIORITY_CLASSES`."""
    wall_time_s: int = 3600
    """Wall-time limit in seconds; the hold covers accelerators times this."""
    checkpointable: bool = False
    grace_s: int = 30
    """Seconds between SIGTERM and SIGKILL when the job is stopped."""
    env: tuple[tuple[str, str], ...] = ()
    checkpoint_ref: str = ""
    """Checkpoint the job starts from; a requeue passes the latest one back."""
    simulated_run_s: float = 0.0
    """Run time a simulated agent plays instead of running the command; 0 runs it."""
    grant_providers: tuple[str, ...] = ()
    """Providers the paying grant allows, copied from its constraints at submit; empty allows
    any. Placement is narrowed to them, and to ``grant_regions`` and ``grant_models``."""
    grant_regions: tuple[str, ...] = ()
    """``<provider>/<region>`` keys the paying grant allows; empty allows any."""
    grant_models: tuple[str, ...] = ()
    """Catalog models the paying grant allows; empty allows any."""
    after_job_ids: tuple[str, ...] = ()
    """Jobs or job arrays that must complete before this one starts, as submitted."""
    awaited_job_ids: tuple[str, ...] = ()
    """The jobs of ``after_job_ids`` with each array replaced by its elements, set at
    submission: the jobs the scheduler waits for."""
    sub_allocation_picked: bool = False
    """Whether the scheduler set ``grant_id`` and ``sub_allocation_id`` at submission, because
    the job named neither and its project, a sub-project, holds that one sub-allocation."""

    @property
    def total_millis(self) -> int:
        return self.task_count * self.accelerator_millis_per_task


@dataclass(frozen=True, slots=True)
class TaskPlacement:
    """One task of a job assigned to accelerators of one node."""

    task_index: int
    provider: str
    region: str
    node: str
    accelerators: tuple[str, ...]
    """Accelerator UUIDs or PCI bus ids on that node."""
    millis: int = MILLIS_PER_ACCELERATOR
    """Thousandths of each accelerator the task gets (1000 for exclusive use)."""
    state: str = "assigned"
    """Task state reported by the agent: ``assigned``, ``started``, ``exited``, ``lost``."""
    exit_code: int | None = None

    @property
    def node_key(self) -> str:
        """``provider.region.node``, the key agents use in subjects and the heartbeat bucket."""
        return f"{self.provider}.{self.region}.{self.node}"

    @property
    def node_name(self) -> str:
        """``provider/region/node``, the node as the CLI and job messages show it."""
        return f"{self.provider}/{self.region}/{self.node}"


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the store and the API see it."""

    job_id: str
    spec: JobSpec
    owner: str
    """Identity that submitted the job (from the caller's token)."""
    institution: str = ""
    """Institution of the job's project, which fair share and usage reports count against."""
    state: JobState = "pending"
    pending_reason: str = ""
    """One of :data:`PENDING_REASONS` while pending."""
    reason: str = ""
    """Readable detail of the wait or the end (the state message)."""
    attempt: int = 1
    """Incremented on every requeue; tasks, holds and dispatches are keyed by it."""
    array_id: str = ""
    """Id shared by the jobs of one array submission; empty for a single job."""
    array_index: int = 0
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    hold_id: str = ""
    """The grant service's hold for the current attempt; empty until admitted."""
    hold_amount: Decimal | None = None
    """PF-days held on the grant for the current attempt."""
    checkpoint_ref: str = ""
    """Latest checkpoint reference a task reported; a requeued attempt starts from it."""
    checkpoint_at: float | None = None
    """When the agent read ``checkpoint_ref``, in Unix seconds; None until one is reported."""
    exit_code: int | None = None
    placement: tuple[TaskPlacement, ...] = ()
    stop_outcome: str = ""
    """While stopping, the state the job ends in once its tasks stopped, or ``requeue``. Empty
    in every other state."""
    start_failures: int = 0
    """Attempts in a row that a node rejected at start, reset to 0 once every task of an
    attempt starts."""
    avoid_nodes: tuple[str, ...] = ()
    """Keys of the nodes that rejected a start of the job, sorted. Its later attempts go there
    only if no other node has room."""
    attempt_reason: str = ""
    """Why the current attempt began: the reason the previous one ended. Empty on the first."""
    rendezvous_port: int = 0
    """Rendezvous port of the current attempt on task 0's node, chosen when its start commands
    go out. 0 before then, and for attempts started before the port was stored."""
    preemptor_id: str | None = ""
    """While stopping, the job whose priority preemption stops the current attempt, or the job
    that claimed the stop after that one left the queue. Empty when none does, or when a
    leader of a version that did not store it made the stop. None for jobs loaded from rows
    stored before the id was kept. In both cases without an id, a stop reason of the
    preemption names that job instead."""
    stop_deadline: float | None = None
    """While stopping, when the stop commands of the current attempt require its tasks to have
    stopped, in Unix seconds: a preemption's deadline, or the end of the grace the commands
    give. None in every other state, and for rows stored before the deadline was kept."""
    grant_picked: bool = False
    """Whether the grant service picked ``spec.grant_id`` for the current attempt's hold,
    because the job named no grant. The job's next attempt names none again."""
    replacements: int = 0
    """Tasks replaced in place since the job was submitted, over all attempts. Each
    replacement's commands carry the new count, which orders a task's hosts files."""
    updated_at: float | None = None
    """When the scheduler recorded the job's latest change, in Unix seconds: the submission
    time, then the clock of each loop turn that changes the job."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def with_state(self, state: JobState, reason: str = "", pending_reason: str = "") -> Job:
        return evolve(self, state=state, reason=reason, pending_reason=pending_reason)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Filters of a job listing; empty fields match everything."""

    states: tuple[str, ...] = ()
    project_id: str = ""
    array_id: str = ""
    owner: str = ""


def node_name(node_key: str) -> str:
    """Return node key ``provider.region.node`` as ``provider/region/node``.

    A node joins the fleet only with ids that are subject tokens, which contain no dot
    (``acsp.subjects.TOKEN_PATTERN``), so each dot of a key separates two of its parts.
    """
    return node_key.replace(".", "/")


def idempotency_key(job_id: str, attempt: int) -> str:
    """Key of the hold for one attempt of a job."""
    return f"{job_id}/{attempt}"


def dispatch_msg_id(job_id: str, attempt: int, task_index: int, kind: str = "start") -> str:
    """``Nats-Msg-Id`` of a command, so JetStream drops a republished duplicate."""
    return f"{job_id}/{attempt}/{task_index}/{kind}"


def utc_text(seconds: float) -> str:
    """Return Unix time ``seconds`` as a UTC date and time for a message."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
