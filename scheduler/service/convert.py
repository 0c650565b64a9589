"""Conversions between ``acsp.v1`` scheduler messages and the service's dataclasses.

Only this module and the gRPC and NATS shells touch protobuf types; the rest of the service
works on :mod:`scheduler.service.model`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from acsp.v1 import common_pb2, scheduler_pb2

from .model import JOB_STATES, Job, JobSpec, TaskPlacement
from .validation import FieldViolation

_PRIORITY_FROM_PROTO = {
    common_pb2.PRIORITY_CLASS_UNSPECIFIED: "standard",
    common_pb2.PRIORITY_CLASS_INTERACTIVE: "interactive",
    common_pb2.PRIORITY_CLASS_STANDARD: "standard",
    common_pb2.PRIORITY_CLASS_PREEMPTIBLE: "preemptible",
}
_PRIORITY_TO_PROTO = {
    "interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE,
    "standard": common_pb2.PRIORITY_CLASS_STANDARD,
    "preemptible": common_pb2.PRIORITY_CLASS_PREEMPTIBLE,
}


def _enum_suffix(enum_name: str, prefix: str) -> str:
    """Return ``"same_node"`` for ``"TOPOLOGY_SAME_NODE"`` with prefix ``"TOPOLOGY_"``."""
    suffix = enum_name.removeprefix(prefix).lower()
    return "" if suffix == "unspecified" else suffix


def spec_from_proto(msg: scheduler_pb2.JobSpec) -> tuple[JobSpec, list[FieldViolation]]:
    """Convert a requested spec; unknown enum numbers come back as violations."""
    violations: list[FieldViolation] = []
    priority = _PRIORITY_FROM_PROTO.get(msg.priority_class)
    if priority is None:
        violations.append(
            FieldViolation("spec.priority_class", f"{msg.priority_class} is not a known class")
        )
        priority = "standard"
    topology = _enum_name(scheduler_pb2.Topology, msg.topology, "TOPOLOGY_")
    if topology is None:
        violations.append(FieldViolation("spec.topology", f"{msg.topology} is not known"))
        topology = ""
    vendor = _enum_name(common_pb2.Vendor, msg.accelerators.vendor, "VENDOR_")
    if vendor is None:
        violations.append(
            FieldViolation("spec.accelerators.vendor", f"{msg.accelerators.vendor} is not known")
        )
        vendor = ""
    spec = JobSpec(
        name=msg.name,
        project_id=msg.project_id,
        command=tuple(msg.command),
        grant_id=msg.grant_id,
        sub_allocation_id=msg.sub_allocation_id,
        task_count=msg.task_count,
        accelerator_millis_per_task=msg.accelerator_millis_per_task,
        gang=msg.gang,
        topology=topology,
        allow_cross_provider=msg.allow_cross_provider,
        models=tuple(msg.accelerators.models),
        vendor=vendor,
        min_memory_gib=msg.accelerators.min_memory_gib,
        software_stack=msg.accelerators.software_stack,
        allowed_regions=tuple(msg.allowed_regions),
        priority=priority,
        wall_time_s=msg.wall_time_seconds,
        checkpointable=msg.checkpointable,
        grace_s=msg.grace_seconds,
        env=tuple(sorted(msg.environment.items())),
        checkpoint_ref=msg.checkpoint_reference,
        simulated_run_s=msg.simulated_run_seconds,
        after_job_ids=tuple(msg.after_job_ids),
    )
    return spec, violations


def spec_to_proto(spec: JobSpec, array_size: int = 0) -> scheduler_pb2.JobSpec:
    msg = scheduler_pb2.JobSpec(
        name=spec.name,
        project_id=spec.project_id,
        grant_id=spec.grant_id,
        sub_allocation_id=spec.sub_allocation_id,
        task_count=spec.task_count,
        accelerator_millis_per_task=spec.accelerator_millis_per_task,
        gang=spec.gang,
        topology=_enum_value(scheduler_pb2.Topology, "TOPOLOGY_", spec.topology),
        allow_cross_provider=spec.allow_cross_provider,
        accelerators=scheduler_pb2.AcceleratorConstraint(
            models=spec.models,
            vendor=_enum_value(common_pb2.Vendor, "VENDOR_", spec.vendor),
            min_memory_gib=spec.min_memory_gib,
            software_stack=spec.software_stack,
        ),
        allowed_regions=spec.allowed_regions,
        priority_class=_PRIORITY_TO_PROTO[spec.priority],
        wall_time_seconds=spec.wall_time_s,
        checkpointable=spec.checkpointable,
        grace_seconds=spec.grace_s,
        command=spec.command,
        environment=dict(spec.env),
        checkpoint_reference=spec.checkpoint_ref,
        array_size=array_size,
        simulated_run_seconds=spec.simulated_run_s,
        after_job_ids=spec.after_job_ids,
    )
    return msg


def job_to_proto(job: Job) -> scheduler_pb2.Job:
    msg = scheduler_pb2.Job(
        job_id=job.job_id,
        spec=spec_to_proto(job.spec),
        state=job_state_to_proto(job.state),
        pending_reason=pending_reason_to_proto(job.pending_reason),
        state_message=job.reason,
        placements=[placement_to_proto(task) for task in job.placement],
        attempt=job.attempt,
        hold_id=job.hold_id,
        grant_id=job.spec.grant_id,
        owner_subject=job.owner,
        institution_id=job.institution,
        array_job_id=job.array_id,
        array_index=job.array_index,
        submit_time=timestamp(job.submitted_at),
        checkpoint_reference=job.checkpoint_ref,
        attempt_reason=job.attempt_reason,
        rendezvous_port=job.rendezvous_port,
    )
    if job.checkpoint_at is not None:
        msg.checkpoint_time.CopyFrom(timestamp(job.checkpoint_at))
    if job.started_at is not None:
        msg.start_time.CopyFrom(timestamp(job.started_at))
    if job.ended_at is not None:
        msg.end_time.CopyFrom(timestamp(job.ended_at))
    if job.updated_at is not None:
        msg.update_time.CopyFrom(timestamp(job.updated_at))
    return msg


def placement_to_proto(task: TaskPlacement) -> scheduler_pb2.TaskPlacement:
    return scheduler_pb2.TaskPlacement(
        task_index=task.task_index,
        provider_id=task.provider,
        region_id=task.region,
        node_id=task.node,
        accelerators=[
            scheduler_pb2.AcceleratorShare(accelerator_id=acc, millis=min(task.millis, 1000))
            for acc in task.accelerators
        ],
        state=task.state,
        exit_code=task.exit_code or 0,
    )


def job_state_to_proto(state: str) -> Any:
    return scheduler_pb2.JobState.Value(f"JOB_STATE_{state.upper()}")


def job_state_from_proto(value: int) -> str | None:
    """Return the state name, or None for an unknown or unset number."""
    name = _enum_name(scheduler_pb2.JobState, value, "JOB_STATE_")
    return name if name in JOB_STATES else None


def pending_reason_to_proto(reason: str) -> Any:
    if not reason:
        return scheduler_pb2.PENDING_REASON_UNSPECIFIED
    return scheduler_pb2.PendingReason.Value(f"PENDING_REASON_{reason.upper()}")


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _enum_name(enum: Any, value: int, prefix: str) -> str | None:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return None
    return _enum_suffix(name, prefix)


def _enum_value(enum: Any, prefix: str, name: str) -> Any:
    if not name:
        return 0
    return enum.Value(prefix + name.upper())
