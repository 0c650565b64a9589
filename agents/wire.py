"""Conversion between the agent's dataclasses and the ``acsp.v1`` protobuf messages.

Protobuf stops here: :func:`parse_command` turns an ``AgentCommand`` into a :class:`Command`
and rejects what the runner could not act on, and the ``*_message`` functions build the
payloads the agent publishes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.v1 import agent_pb2, common_pb2, scheduler_pb2
from agents.model import (
    WHOLE_MILLI,
    AcceleratorHealth,
    AcceleratorInfo,
    HealthAction,
    HealthEvent,
    HealthState,
    NodeInventory,
    TaskEvent,
    TaskSpec,
    TaskState,
    UsageSample,
    task_index_of,
)
from agents.rendezvous import Placement

_MICRO = Decimal("0.000001")
USAGE_REPORT_MAX_BYTES: Final = 64 << 10
"""Largest encoded usage report, above which :func:`usage_report_messages` splits a report. A
report grows with the node's tasks and the time since the last report (one sample per task,
accelerator and hour). This bound keeps it far below NATS's default max_payload of 1 MiB, over
which a message is rejected for good."""
_HEALTH = {
    HealthState.OK: scheduler_pb2.HEALTH_STATE_OK,
    HealthState.DEGRADED: scheduler_pb2.HEALTH_STATE_DEGRADED,
    HealthState.FAILED: scheduler_pb2.HEALTH_STATE_FAILED,
}
_SEVERITY = {
    HealthState.OK: agent_pb2.HEALTH_SEVERITY_INFO,
    HealthState.DEGRADED: agent_pb2.HEALTH_SEVERITY_WARNING,
    HealthState.FAILED: agent_pb2.HEALTH_SEVERITY_FATAL,
}
_ACTION = {
    HealthAction.REPORT: agent_pb2.HEALTH_ACTION_REPORT,
    HealthAction.DRAIN_NODE: agent_pb2.HEALTH_ACTION_DRAIN_NODE,
    HealthAction.MARK_UNUSABLE: agent_pb2.HEALTH_ACTION_MARK_UNUSABLE,
}
_TASK_STATE = {
    TaskState.RUNNING: agent_pb2.TASK_STATE_STARTED,
    TaskState.START_FAILED: agent_pb2.TASK_STATE_START_FAILED,
    TaskState.SUCCEEDED: agent_pb2.TASK_STATE_EXITED,
    TaskState.FAILED: agent_pb2.TASK_STATE_EXITED,
    TaskState.STOPPED: agent_pb2.TASK_STATE_STOPPED,
    TaskState.TIMED_OUT: agent_pb2.TASK_STATE_TIMED_OUT,
    TaskState.LOST: agent_pb2.TASK_STATE_LOST,
    TaskState.FAILED_HARDWARE: agent_pb2.TASK_STATE_FAILED_HARDWARE,
    TaskState.CHECKPOINTED: agent_pb2.TASK_STATE_CHECKPOINTED,
}


@dataclass(frozen=True, slots=True)
class NodeRef:
    provider: str
    region: str
    node: str

    @property
    def key(self) -> str:
        return f"{self.provider}.{self.region}.{self.node}"

    def message(self) -> agent_pb2.NodeRef:
        return agent_pb2.NodeRef(
            provider_id=self.provider, region_id=self.region, node_id=self.node
        )


class InvalidCommand(ValueError):
    """An ``AgentCommand`` the agent cannot act on; the message names the field."""


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    kind: str
    """``start``, ``stop``, ``reconcile`` or ``hosts``."""
    node: NodeRef
    task_id: str = ""
    reason: str = ""
    fencing_token: int = 0
    spec: TaskSpec | None = None
    placement: Placement | None = None
    """The gang's current hosts, for ``hosts`` commands."""
    issued_at_ns: int = 0
    """The command's ``time`` in Unix nanoseconds; 0 when the scheduler sent none."""
    placement_version: int = 0
    """Version of the hosts that a ``start`` or ``hosts`` command carries, which orders them
    before ``issued_at_ns`` does; 0 from schedulers that send none."""


def timestamp(seconds: float) -> Timestamp:
    micros = round(seconds * 1_000_000)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def parse_command(data: bytes) -> Command:
    """Decode and validate an ``AgentCommand``; raise :class:`InvalidCommand` otherwise."""
    message = agent_pb2.AgentCommand()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidCommand(f"payload is not an AgentCommand: {error}") from error

    node = NodeRef(message.node.provider_id, message.node.region_id, message.node.node_id)
    common = {
        "command_id": message.command_id,
        "node": node,
        "task_id": message.task_id,
        "reason": message.reason,
        "fencing_token": message.fencing_token,
        "issued_at_ns": message.time.ToNanoseconds(),
        "placement_version": message.placement_version,
    }

    if message.kind == agent_pb2.COMMAND_KIND_RECONCILE:
        return Command(kind="reconcile", **common)  # type: ignore[arg-type]
    if not message.task_id:
        raise InvalidCommand("task_id is required for START_TASK, STOP_TASK and UPDATE_HOSTS")
    if message.kind == agent_pb2.COMMAND_KIND_STOP_TASK:
        return Command(kind="stop", **common)  # type: ignore[arg-type]
    if message.kind == agent_pb2.COMMAND_KIND_UPDATE_HOSTS:
        return _hosts_command(message, common)
    if message.kind != agent_pb2.COMMAND_KIND_START_TASK:
        raise InvalidCommand(
            f"kind {message.kind} is not START_TASK, STOP_TASK, RECONCILE or UPDATE_HOSTS"
        )

    if not message.job_id:
        raise InvalidCommand("job_id is required for START_TASK")
    if not message.accelerators:
        raise InvalidCommand("accelerators must name at least one accelerator")
    if not math.isfinite(message.simulated_run_seconds) or message.simulated_run_seconds < 0:
        raise InvalidCommand(
            f"simulated_run_seconds {message.simulated_run_seconds} is not a finite number of "
            "seconds at or above 0"
        )
    if any(a.millis > WHOLE_MILLI for a in message.accelerators):
        raise InvalidCommand(f"an accelerator share is above {WHOLE_MILLI} milli-shares")
    ids = [a.accelerator_id for a in message.accelerators]
    if "" in ids:
        raise InvalidCommand("accelerators has an entry without accelerator_id")
    # Each share of a repeated accelerator would pass the node's capacity check on its own,
    # and its usage would be reported twice. One entry carries the task's whole share.
    repeated = sorted({uuid for uuid in ids if ids.count(uuid) > 1})
    if repeated:
        raise InvalidCommand(f"accelerators lists {', '.join(repeated)} more than once")

    _check_rendezvous(message)
    spec = TaskSpec(
        job_id=message.job_id,
        task_id=message.task_id,
        accelerators=tuple(a.accelerator_id for a in message.accelerators),
        # 0 is how proto3 sends an unset share: the whole accelerator.
        accelerator_millis=tuple(a.millis or WHOLE_MILLI for a in message.accelerators),
        command=tuple(message.command),
        env=tuple(sorted(message.environment.items())),
        wall_time_s=float(message.wall_time_seconds),
        grace_period_s=float(message.grace_seconds) if message.grace_seconds else 30.0,
        simulated_run_time_s=message.simulated_run_seconds,
        checkpoint_reference=message.checkpoint_reference,
        node_hosts=tuple(message.node_hosts),
        task_node_indexes=tuple(message.task_node_indexes),
        rendezvous_port=message.rendezvous_port,
    )
    return Command(kind="start", spec=spec, **common)  # type: ignore[arg-type]


def _hosts_command(message: agent_pb2.AgentCommand, common: dict[str, Any]) -> Command:
    """Convert an UPDATE_HOSTS command; raise :class:`InvalidCommand` if it lists no hosts."""
    if not message.node_hosts or not message.task_node_indexes:
        raise InvalidCommand(
            "node_hosts and task_node_indexes are required for UPDATE_HOSTS, because only a "
            "task of a job of two or more tasks has hosts to update"
        )
    _check_rendezvous(message)
    placement = Placement(message.node_hosts, message.task_node_indexes)
    return Command(kind="hosts", placement=placement, **common)


def _check_rendezvous(message: agent_pb2.AgentCommand) -> None:
    """Raise :class:`InvalidCommand` if the rendezvous fields do not fit the task."""
    if message.rendezvous_port > 65535:
        raise InvalidCommand(f"rendezvous_port {message.rendezvous_port} is above 65535")
    if not message.task_node_indexes and not message.node_hosts:
        return
    index = task_index_of(message.task_id)
    if index is None:
        raise InvalidCommand(
            f"task_id {message.task_id!r} is not <job_id>/<attempt>/<task_index>, which "
            "task_node_indexes needs"
        )
    problem = Placement(message.node_hosts, message.task_node_indexes).check(int(index))
    if problem is not None:
        raise InvalidCommand(problem)


def accelerator_message(
    info: AcceleratorInfo, health: HealthState, used_milli: int, domain: str
) -> scheduler_pb2.Accelerator:
    return scheduler_pb2.Accelerator(
        accelerator_id=info.uuid,
        pci_bus_id=info.pci_bus_id,
        model=info.model,
        interconnect_domain=domain,
        health=_HEALTH[health],
        used_millis=used_milli,
        parent_accelerator_id=info.parent_uuid or "",
        partition_millis=info.share_milli if info.parent_uuid else 0,
    )


def inventory_message(
    node: NodeRef,
    backend: str,
    agent_version: str,
    boot_id: str,
    inventory: NodeInventory,
    health: Sequence[AcceleratorHealth],
    used_milli: Mapping[str, int],
    running_task_ids: Iterable[str],
    now: float,
    max_jobs: int = 0,
    host: str = "",
    rendezvous_ports: tuple[int, int] = (0, 0),
) -> agent_pb2.Inventory:
    """Build the inventory message.

    ``max_jobs`` is the size of the task user pool, 0 without one. ``host`` and
    ``rendezvous_ports`` tell other nodes' tasks how to reach this node's tasks.
    """
    states = {h.uuid: h.state for h in health}
    major = inventory.software_version.split(".", 1)[0]
    stacks = [f"cuda-{major}", f"cuda-{inventory.software_version}"] if major else []
    # Accelerators of one node are taken to share one interconnect domain.
    domain = node.key
    return agent_pb2.Inventory(
        node=node.message(),
        backend=backend,
        agent_version=agent_version,
        driver_version=inventory.driver_version,
        runtime_version=inventory.software_version,
        software_stacks=stacks,
        accelerators=[
            accelerator_message(
                info, states.get(info.uuid, HealthState.OK), used_milli.get(info.uuid, 0), domain
            )
            for info in inventory.accelerators
        ],
        memory_total_mib={info.uuid: info.memory_bytes >> 20 for info in inventory.accelerators},
        time=timestamp(now),
        running_task_ids=sorted(running_task_ids),
        boot_id=boot_id,
        max_jobs=max_jobs,
        host=host,
        rendezvous_port_min=rendezvous_ports[0],
        rendezvous_port_max=rendezvous_ports[1],
    )


def heartbeat_message(
    node: NodeRef,
    boot_id: str,
    sequence: int,
    drain_requested: bool,
    stopping: bool,
    health: Sequence[AcceleratorHealth],
    running_task_ids: Iterable[str],
    spooled: int,
    now: float,
) -> agent_pb2.Heartbeat:
    if stopping:
        state = agent_pb2.AGENT_NODE_STATE_STOPPING
    elif drain_requested:
        state = agent_pb2.AGENT_NODE_STATE_DRAIN_REQUESTED
    else:
        state = agent_pb2.AGENT_NODE_STATE_READY
    return agent_pb2.Heartbeat(
        node=node.message(),
        boot_id=boot_id,
        sequence=sequence,
        state=state,
        accelerator_health={h.uuid: _HEALTH[h.state] for h in health},
        running_task_ids=sorted(running_task_ids),
        time=timestamp(now),
        spooled_messages=spooled,
    )


def health_event_message(
    event_id: str,
    node: NodeRef,
    event: HealthEvent,
    health_after: HealthState,
    task_ids: Sequence[str],
) -> agent_pb2.HealthEvent:
    is_xid = event.cause.startswith("xid:")
    return agent_pb2.HealthEvent(
        event_id=event_id,
        node=node.message(),
        accelerator_id=event.uuid,
        condition="xid" if is_xid else event.cause,
        xid=event.code if is_xid else 0,
        severity=_SEVERITY[event.state],
        action=_ACTION[event.action],
        health=_HEALTH[health_after],
        message=event.message,
        cleared=event.cleared,
        time=timestamp(event.time),
        task_ids=list(task_ids),
    )


def task_event_message(event_id: str, node: NodeRef, event: TaskEvent) -> agent_pb2.TaskEvent:
    exit_code = event.exit_code
    signal_number = 0
    if exit_code is not None and exit_code < 0:
        # asyncio reports death by signal N as -N; shells report it as 128 + N.
        signal_number = -exit_code
        exit_code = 128 + signal_number
    message = agent_pb2.TaskEvent(
        event_id=event_id,
        node=node.message(),
        task_id=event.task_id,
        job_id=event.job_id,
        state=_TASK_STATE[event.state],
        exit_code=exit_code or 0,
        signal=signal_number,
        output_tail=event.output_tail,
        message=event.reason,
        time=timestamp(event.time),
        health_event_id=event.health_event_id,
        checkpoint_reference=event.checkpoint_reference,
    )
    if event.node_busy:
        message.start_rejection = agent_pb2.START_REJECTION_NODE_BUSY
    if event.checkpoint_time is not None:
        message.checkpoint_time.CopyFrom(timestamp(event.checkpoint_time))
    return message


def accelerator_seconds(sample: UsageSample) -> Decimal:
    """Return the sample's accelerator-seconds with at most 6 decimal places."""
    return (Decimal(sample.accelerator_seconds_us) / 1_000_000).quantize(
        _MICRO, rounding=ROUND_HALF_EVEN
    )


def usage_report_message(
    node: NodeRef,
    boot_id: str,
    samples: Sequence[UsageSample],
    models: Mapping[str, str],
) -> agent_pb2.UsageReport:
    report = agent_pb2.UsageReport(node=node.message(), boot_id=boot_id)
    for sample in samples:
        item = report.samples.add(
            sample_id=sample.sample_id,
            task_id=sample.task_id,
            job_id=sample.job_id,
            accelerator_id=sample.accelerator_uuid,
            model=models.get(sample.accelerator_uuid, ""),
            share_millis=sample.share_milli,
            start_time=timestamp(sample.start_time),
            end_time=timestamp(sample.end_time),
            accelerator_seconds=common_pb2.Decimal(value=str(accelerator_seconds(sample))),
            sequence=sample.sequence,
        )
        if sample.utilization_percent is None:
            item.utilization.unsupported = True
        else:
            item.utilization.value = sample.utilization_percent / 100.0
        if sample.memory_used_bytes is None:
            item.memory_used_mib.unsupported = True
        else:
            item.memory_used_mib.value = sample.memory_used_bytes / (1 << 20)
    return report


def usage_report_messages(
    node: NodeRef,
    boot_id: str,
    samples: Sequence[UsageSample],
    models: Mapping[str, str],
    max_bytes: int = USAGE_REPORT_MAX_BYTES,
) -> list[agent_pb2.UsageReport]:
    """Build the usage reports of ``samples``, in order, each encoded in at most ``max_bytes``.

    A sample that alone encodes over ``max_bytes`` still gets a report of its own.
    """
    whole = usage_report_message(node, boot_id, samples, models)
    empty = agent_pb2.UsageReport(node=whole.node, boot_id=boot_id)
    reports: list[agent_pb2.UsageReport] = []
    size = 0
    for item in whole.samples:
        item_size = _field_size(item.ByteSize())
        if not reports or (size + item_size > max_bytes and reports[-1].samples):
            reports.append(agent_pb2.UsageReport())
            reports[-1].CopyFrom(empty)
            size = empty.ByteSize()
        reports[-1].samples.append(item)
        size += item_size
    return reports


def _field_size(message_size: int) -> int:
    """Return the encoded size of an embedded message field of ``message_size`` bytes."""
    # One byte of tag (field numbers up to 15), then the length as a varint of 7 bits a byte.
    return 1 + max(1, (message_size.bit_length() + 6) // 7) + message_size
