"""Agent commands and job events as protobuf payloads, keyed for de-duplication."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from acsp import subjects
from acsp.v1 import agent_pb2, common_pb2, events_pb2

from .convert import job_state_to_proto, placement_to_proto, timestamp
from .model import Job, TaskPlacement, dispatch_msg_id
from .store import DispatchRecord, OutboxEvent

JobEventOut = OutboxEvent


@dataclass(frozen=True, slots=True)
class TaskId:
    """``<job_id>/<attempt>/<task_index>``, the id agents use for a task."""

    job_id: str
    attempt: int
    task_index: int

    def __str__(self) -> str:
        return f"{self.job_id}/{self.attempt}/{self.task_index}"

    @classmethod
    def parse(cls, text: str) -> TaskId:
        """Parse a task id; raise ``ValueError`` naming the malformed id."""
        job_id, sep1, rest = text.partition("/")
        attempt, sep2, index = rest.partition("/")
        numbers = attempt.isdigit() and index.isdigit() and (attempt + index).isascii()
        if not (sep1 and sep2 and job_id and numbers):
            raise ValueError(f"task id {text!r} is not <job_id>/<attempt>/<task_index>")
        return cls(job_id, int(attempt), int(index))


def replacement_kind(action: str, node_key: str, replacement: int) -> str:
    """Return the dispatch kind of a ``start`` or ``stop`` sent when a task is replaced.

    The first start and the last stop of a task use the bare action. A replacement adds the
    node it addresses and ``replacement``, the job's count of replacements with this one
    (:attr:`Job.replacements`). So its commands keep their own dedupe key and
    ``Nats-Msg-Id``, also when a task returns to a node it was replaced from, and a command
    recorded again after a restart keeps its key.
    """
    return f"{action}:{node_key}:{replacement}"


def command_action(kind: str) -> str:
    """Return ``start``, ``stop`` or ``hosts`` for a dispatch kind."""
    return kind.partition(":")[0]


def start_record(
    job: Job, task: TaskPlacement, epoch: int, kind: str = "start", rendezvous: bytes = b""
) -> DispatchRecord:
    """Build the start command of one task of ``job``'s current attempt.

    ``rendezvous`` is the job's serialized rendezvous fields
    (:func:`scheduler.service.rendezvous.rendezvous_fields`), appended as they are, and
    ``job.replacements`` is the version of those hosts.
    """
    spec = job.spec
    checkpoint = job.checkpoint_ref or spec.checkpoint_ref
    command = agent_pb2.AgentCommand(
        command_id=dispatch_msg_id(job.job_id, job.attempt, task.task_index, kind),
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=agent_pb2.NodeRef(provider_id=task.provider, region_id=task.region, node_id=task.node),
        task_id=str(TaskId(job.job_id, job.attempt, task.task_index)),
        job_id=job.job_id,
        accelerators=placement_to_proto(task).accelerators,
        command=spec.command,
        environment=dict(spec.env),
        wall_time_seconds=spec.wall_time_s,
        grace_seconds=spec.grace_s,
        simulated_run_seconds=spec.simulated_run_s,
        checkpoint_reference=checkpoint,
        fencing_token=epoch,
        time=timestamp(time.time()),
        placement_version=job.replacements,
    )
    return DispatchRecord(
        job.job_id,
        job.attempt,
        task.task_index,
        kind,
        task.node_key,
        command.SerializeToString(deterministic=True) + rendezvous,
    )


def stop_record(
    job_id: str,
    attempt: int,
    task: TaskPlacement,
    reason: str,
    grace_s: int,
    epoch: int,
    kind: str = "stop",
) -> DispatchRecord:
    """Build the stop command of one task of attempt ``attempt``."""
    command = agent_pb2.AgentCommand(
        command_id=dispatch_msg_id(job_id, attempt, task.task_index, kind),
        kind=agent_pb2.COMMAND_KIND_STOP_TASK,
        node=agent_pb2.NodeRef(provider_id=task.provider, region_id=task.region, node_id=task.node),
        task_id=str(TaskId(job_id, attempt, task.task_index)),
        job_id=job_id,
        grace_seconds=grace_s,
        reason=reason,
        fencing_token=epoch,
        time=timestamp(time.time()),
    )
    return DispatchRecord(
        job_id,
        attempt,
        task.task_index,
        kind,
        task.node_key,
        command.SerializeToString(deterministic=True),
    )


def hosts_records(
    job: Job,
    tasks: Iterable[TaskPlacement],
    epoch: int,
    replaced_index: int,
    rendezvous: bytes,
) -> list[DispatchRecord]:
    """Build the commands that rewrite the hosts files of live ``tasks`` of ``job``.

    They are sent after task ``replaced_index`` moved to another node, and ``rendezvous`` is
    the job's serialized rendezvous fields after that move. ``job.replacements`` counts that
    move, so it orders each task's hosts files on its node, and the kind
    ``hosts:<replaced_index>:<job.replacements>`` gives each replacement its own dedupe key
    and ``Nats-Msg-Id``, also when two tasks of one job move in one turn.
    """
    issued_at = timestamp(time.time())
    kind = f"hosts:{replaced_index}:{job.replacements}"
    records = []
    for task in tasks:
        command = agent_pb2.AgentCommand(
            command_id=dispatch_msg_id(job.job_id, job.attempt, task.task_index, kind),
            kind=agent_pb2.COMMAND_KIND_UPDATE_HOSTS,
            node=agent_pb2.NodeRef(
                provider_id=task.provider, region_id=task.region, node_id=task.node
            ),
            task_id=str(TaskId(job.job_id, job.attempt, task.task_index)),
            job_id=job.job_id,
            fencing_token=epoch,
            time=issued_at,
            placement_version=job.replacements,
        )
        payload = command.SerializeToString(deterministic=True) + rendezvous
        records.append(
            DispatchRecord(job.job_id, job.attempt, task.task_index, kind, task.node_key, payload)
        )
    return records


def command_subject(record: DispatchRecord) -> str:
    provider, region, node = record.node_key.split(".", 2)
    return subjects.command_subject(provider, region, node)


def job_event(
    job: Job,
    kind: str,
    trigger: str,
    reason: str,
    attempt: int | None = None,
    placement: tuple[TaskPlacement, ...] | None = None,
    hold_id: str | None = None,
) -> JobEventOut:
    """Build the event of ``kind`` (``submitted``, ``admitted``, ``started``, ``requeued``,
    ``ended``, ``preempted``) for ``job``; the overrides describe an attempt that ended."""
    attempt = job.attempt if attempt is None else attempt
    event_id = f"{job.job_id}/{attempt}/{kind}"
    now = time.time()
    msg = events_pb2.JobEvent(
        event_id=event_id,
        kind=events_pb2.JobEventKind.Value(f"JOB_EVENT_KIND_{kind.upper()}"),  # type: ignore[arg-type]
        job_id=job.job_id,
        attempt=attempt,
        state=job_state_to_proto(job.state),
        hold_id=job.hold_id if hold_id is None else hold_id,
        grant_id=job.spec.grant_id,
        project_id=job.spec.project_id,
        institution_id=job.institution,
        placements=[
            placement_to_proto(t) for t in (job.placement if placement is None else placement)
        ],
        cause=common_pb2.Cause(trigger=trigger, reason=reason, time=timestamp(now)),
        time=timestamp(now),
        priority_class=_PRIORITY[job.spec.priority],
    )
    if job.started_at is not None:
        msg.start_time.CopyFrom(timestamp(job.started_at))
    if job.checkpoint_at is not None:
        msg.last_checkpoint_time.CopyFrom(timestamp(job.checkpoint_at))
    return JobEventOut(subjects.job_event_subject(kind), event_id, msg.SerializeToString())


_PRIORITY = {
    "interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE,
    "standard": common_pb2.PRIORITY_CLASS_STANDARD,
    "preemptible": common_pb2.PRIORITY_CLASS_PREEMPTIBLE,
}
