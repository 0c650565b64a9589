"""Values the node agent passes between its backends, health rules, runner and reporter.

Protobuf messages never reach this module: ``agents.wire`` converts these dataclasses at the
NATS boundary. A field that a backend cannot read on an accelerator is ``None`` and its name is
listed in ``unsupported``. The rest of that reading is still valid.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

WHOLE_MILLI = 1000
"""Share of a whole accelerator in thousandths; a MIG instance has less."""


@dataclass(frozen=True, slots=True)
class AcceleratorInfo:
    """One accelerator as discovered: fixed facts that go into the node's inventory."""

    uuid: str
    """Vendor UUID, e.g. ``GPU-…`` or ``MIG-…``; the key of everything the agent reports."""
    pci_bus_id: str
    """PCI bus id such as ``00000000:17:00.0``; a MIG instance carries its parent's."""
    index: int
    """Vendor index at discovery time; informational only, since it changes across resets."""
    vendor: str
    """Lower-case vendor name: ``nvidia``, ``simulated`` or another backend's."""
    model: str
    """Model name as the vendor library reports it, e.g. ``NVIDIA H100 80GB HBM3``."""
    memory_bytes: int
    driver_version: str
    software_version: str
    """Version of the compute stack the driver supports, e.g. CUDA ``12.4``."""
    share_milli: int = WHOLE_MILLI
    """Thousandths of the parent accelerator this one represents (MIG instances < 1000)."""
    parent_uuid: str | None = None
    """UUID of the physical accelerator for a MIG instance, else ``None``."""
    profile: str | None = None
    """Partition profile of a fractional accelerator, e.g. ``1g.10gb``."""


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """The accelerators and driver versions of a node, sent on every connect."""

    accelerators: tuple[AcceleratorInfo, ...]
    driver_version: str
    software_version: str
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class EccCounts:
    """ECC error counts; ``None`` where the accelerator does not report them."""

    volatile_single: int | None = None
    """Corrected errors since the last driver load or reset."""
    volatile_double: int | None = None
    """Uncorrected errors since the last driver load or reset."""
    aggregate_single: int | None = None
    """Corrected errors over the accelerator's lifetime."""
    aggregate_double: int | None = None
    """Uncorrected errors over the accelerator's lifetime."""


@dataclass(frozen=True, slots=True)
class AcceleratorReading:
    """One reading of one accelerator's counters and gauges."""

    uuid: str
    lost: bool = False
    """The vendor library reports the device gone (NVML ``GPU_IS_LOST``: fallen off the bus)."""
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    temperature_c: int | None = None
    slowdown_temperature_c: int | None = None
    power_mw: int | None = None
    throttle_reasons: int | None = None
    """Bit mask of clock throttle reasons in NVML's encoding (``nvmlClocksEventReason*``)."""
    ecc: EccCounts = field(default_factory=EccCounts)
    retired_pages: int | None = None
    """Pages retired for single- and double-bit errors together (pre-Ampere GPUs)."""
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    nvlink_errors: int | None = None
    """Sum over links of replay, recovery and CRC error counters."""
    unsupported: frozenset[str] = frozenset()
    """Fields the device does not support (NVML ``NOT_SUPPORTED``)."""


class DeviceEventKind(enum.StrEnum):
    XID = "xid"
    """A driver XID error; ``code`` is the XID number."""
    FAULT_START = "fault_start"
    """A named fault began (``detail``), on an accelerator or, with an empty UUID, the node."""
    FAULT_END = "fault_end"
    """The named fault in ``detail`` ended (repaired or recovered)."""


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something the backend saw happen, as opposed to a level it reads."""

    kind: DeviceEventKind
    uuid: str
    """Accelerator UUID; empty for an event of the whole node."""
    time: float
    """Unix seconds (virtual seconds for the simulated backend)."""
    code: int = 0
    detail: str = ""


class HealthState(enum.IntEnum):
    """Health of one accelerator; ordered so that ``max`` gives the worst."""

    OK = 0
    DEGRADED = 1
    FAILED = 2


class HealthAction(enum.IntEnum):
    """Action a health condition requests from the scheduler, ordered by strength."""

    REPORT = 0
    """Record the event; keep scheduling on the accelerator."""
    DRAIN_NODE = 1
    """Stop placing new work on the node and let running work finish."""
    MARK_UNUSABLE = 2
    """Stop using this accelerator until an operator clears it."""


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """One occurrence of a health condition, or its clearing."""

    uuid: str
    """UUID of the accelerator, or empty for a condition of the whole node."""
    cause: str
    """Stable key of the condition, e.g. ``xid:79``, ``ecc_dbe``, ``thermal``."""
    state: HealthState
    action: HealthAction
    message: str
    time: float
    cleared: bool = False
    """True when this event reports that the condition has cleared."""
    persistent: bool = False
    """True for conditions that survive agent restarts until an operator clears them."""
    code: int = 0


@dataclass(frozen=True, slots=True)
class AcceleratorHealth:
    uuid: str
    state: HealthState
    reasons: tuple[str, ...]


class TaskState(enum.StrEnum):
    RUNNING = "running"
    START_FAILED = "start_failed"
    """The task was rejected, or the node could not start its process."""
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """The process exited on its own with a non-zero status or a signal, or the command names
    no executable program (exit code 127 or 126, as from a shell)."""
    STOPPED = "stopped"
    """Stopped on request (cancel or preemption)."""
    TIMED_OUT = "timed_out"
    """Stopped because it passed its wall time."""
    LOST = "lost"
    """The agent cannot account for the task (e.g. it vanished while the agent was down), or
    stopped it because the agent itself was shutting down."""
    FAILED_HARDWARE = "failed_hardware"
    """Ended without success (stopped or on its own) while one of its accelerators was failed."""
    CHECKPOINTED = "checkpointed"
    """Still running, and wrote a new checkpoint reference."""

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        TaskState.START_FAILED,
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.STOPPED,
        TaskState.TIMED_OUT,
        TaskState.LOST,
        TaskState.FAILED_HARDWARE,
    }
)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A start command's task, converted from the wire."""

    job_id: str
    task_id: str
    accelerators: tuple[str, ...]
    """UUIDs of the accelerators the task may see."""
    command: tuple[str, ...]
    """argv; empty means "play" the run time without a process (simulated backend only)."""
    env: tuple[tuple[str, str], ...] = ()
    wall_time_s: float = 0.0
    """Maximum run time in seconds; 0 means no limit."""
    grace_period_s: float = 30.0
    """Seconds between SIGTERM and SIGKILL when stopping."""
    simulated_run_time_s: float = 0.0
    """Run time to play when ``command`` is empty."""
    accelerator_millis: tuple[int, ...] = ()
    """Milli-shares of each of ``accelerators``, in the same order; empty means whole ones."""
    checkpoint_reference: str = ""
    """Checkpoint the task resumes from; empty for a fresh start."""
    node_hosts: tuple[str, ...] = ()
    """Hosts of the job's nodes, each once; empty for a one-task job."""
    task_node_indexes: tuple[int, ...] = ()
    """Index in ``node_hosts`` of each task's node, in task order; empty for a one-task job."""
    rendezvous_port: int = 0
    """Port for task 0 to listen on for the job's rendezvous; 0 when the scheduler sent none."""


TASK_INDEX_ENV = "ACSP_TASK_INDEX"
"""Environment variable with the task's index in its job, from 0."""


def task_index_of(task_id: str) -> str | None:
    """Return the ``<task_index>`` of a ``<job_id>/<attempt>/<task_index>`` task id.

    The result is None when ``task_id`` does not have that form.
    """
    parts = task_id.rsplit("/", 2)
    if len(parts) != 3 or not parts[2].isascii() or not parts[2].isdigit():
        return None
    return str(int(parts[2]))


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """A state change of a task, sent on the node's task subject."""

    job_id: str
    task_id: str
    state: TaskState
    time: float
    reason: str = ""
    exit_code: int | None = None
    """Exit status, or ``-signal`` when killed by a signal; ``None`` when unknown."""
    output_tail: str = ""
    accelerators: tuple[str, ...] = ()
    health_event_id: str = ""
    """The health event that failed an accelerator of a ``FAILED_HARDWARE`` task."""
    checkpoint_reference: str = ""
    """The task's latest checkpoint reference, set when it was not reported before."""
    checkpoint_time: float | None = None
    """When the agent read ``checkpoint_reference``."""
    node_busy: bool = False
    """Whether a ``START_FAILED`` task was rejected because the node runs as many jobs as it
    can (its pool of task users is in use), which the scheduler does not count as a failure."""


@dataclass(frozen=True, slots=True)
class UsageSample:
    """Use of one accelerator by one task over one interval."""

    sample_id: str
    """``<provider>.<region>.<node>:<sequence>``; the sequence survives agent restarts."""
    sequence: int
    job_id: str
    task_id: str
    accelerator_uuid: str
    start_time: float
    end_time: float
    share_milli: int
    """Thousandths of the accelerator the task held: its share of a shared device."""
    accelerator_seconds_us: int
    """Accelerator-microseconds: interval microseconds times ``share_milli`` / 1000."""
    utilization_percent: float | None
    memory_used_bytes: int | None
