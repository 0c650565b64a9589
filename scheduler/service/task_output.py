"""The lookup of a task's node, and the request that fetches its output from the node's agent.

A task's output lives only in its log on the node that ran it. The scheduler finds that node
(the placement of the job's current attempt, else the latest start command recorded for the
task). It then requests the log's end from the node's agent over core NATS, with a reply
subject of its own per request (:func:`acsp.subjects.output_reply_subject`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Final

import asyncpg
import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from services.runtime.context import remaining_s
from services.runtime.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
)
from services.runtime.telemetry import inject_headers

from .commands import TaskId
from .model import Job

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_BYTES: Final = 64 << 10
"""Bytes of output returned when a request leaves max_bytes at 0."""
MAX_OUTPUT_BYTES: Final = 1 << 20
"""Maximum bytes of output one request may return; NATS's default max_payload is the same."""
LOOKUP_TIMEOUT_S: Final = 10.0
"""Bound of the database lookup of a task's node, unless the call's deadline is sooner."""
LATEST_START: Final = """
SELECT attempt, node_key FROM scheduler.dispatches
WHERE job_id = $1 AND task_index = $2 AND (kind = 'start' OR kind LIKE 'start:%')
ORDER BY attempt DESC, created_at DESC
LIMIT 1
"""
"""The node of a task's latest start command; a replacement's start (``start:<node key>``)
is newer than the first start of its attempt."""


@dataclass(frozen=True, slots=True)
class TaskLocation:
    """The node that runs or ran one attempt of a task."""

    job_id: str
    task_index: int
    attempt: int
    provider: str
    region: str
    node: str

    @property
    def task_id(self) -> str:
        """The id agents know the task by."""
        return str(TaskId(self.job_id, self.attempt, self.task_index))

    @property
    def node_name(self) -> str:
        return f"{self.provider}/{self.region}/{self.node}"


class NoReplyError(Exception):
    """The node's agent did not reply; the message gives the reason."""


async def locate_task(
    pool: asyncpg.Pool, job: Job, task_index: int, timeout_s: float
) -> TaskLocation | None:
    """Return the node of the latest attempt of ``job``'s task ``task_index``, or None.

    The current attempt's placement comes with the job, and a job that ended or waits to run
    again has none, so its node comes from the recorded start commands. Those of an ended
    job are deleted after ``ACSP_SCHEDULER_OUTBOX_RETENTION_S``, after which this returns None.
    """
    for task in job.placement:
        if task.task_index == task_index:
            return TaskLocation(
                job.job_id, task_index, job.attempt, task.provider, task.region, task.node
            )
    async with pool.acquire(timeout=timeout_s) as conn:
        row = await conn.fetchrow(LATEST_START, job.job_id, task_index, timeout=timeout_s)
    if row is None:
        return None
    provider, region, node = row["node_key"].split(".")
    return TaskLocation(job.job_id, task_index, row["attempt"], provider, region, node)


async def request_output(
    client: Client, location: TaskLocation, max_bytes: int, timeout_s: float
) -> agent_pb2.TaskOutputReply:
    """Ask the agent of ``location``'s node for the last ``max_bytes`` of the task's log.

    Raises :class:`NoReplyError` when no agent listens on the node's subject, or none replies
    within ``timeout_s``.
    """
    node = (location.provider, location.region, location.node)
    reply_subject = subjects.output_reply_subject(*node, uuid.uuid4().hex)
    request = agent_pb2.TaskOutputRequest(task_id=location.task_id, max_bytes=max_bytes)
    subscription = await client.subscribe(reply_subject, max_msgs=1)
    try:
        await client.publish(
            subjects.output_subject(*node),
            request.SerializeToString(),
            reply=reply_subject,
            headers=inject_headers(),
        )
        try:
            message = await subscription.next_msg(timeout=timeout_s)
        except nats.errors.TimeoutError:
            raise NoReplyError(
                f"the agent of node {location.node_name} did not reply within {timeout_s:g} s"
            ) from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
    if not message.data and (message.headers or {}).get("Status") == "503":
        raise NoReplyError(f"no agent of node {location.node_name} is connected to NATS")
    try:
        return agent_pb2.TaskOutputReply.FromString(message.data)
    except DecodeError:
        raise NoReplyError(
            f"the agent of node {location.node_name} replied with a message that is not a "
            "TaskOutputReply"
        ) from None


def output_limit(max_bytes: int) -> int:
    """Return the bytes of output that ``max_bytes`` requests, 0 meaning the default.

    Raises InvalidArgument above :data:`MAX_OUTPUT_BYTES`.
    """
    if max_bytes > MAX_OUTPUT_BYTES:
        raise InvalidArgument(
            "max_bytes",
            f"{max_bytes} is above the maximum of {MAX_OUTPUT_BYTES} (1 MiB)",
            f"ask for at most {MAX_OUTPUT_BYTES} bytes, or 0 for the last {DEFAULT_OUTPUT_BYTES}",
        )
    return max_bytes or DEFAULT_OUTPUT_BYTES


class TaskOutputReader:
    """Reads the end of a task's output from the agent of the node that ran it."""

    def __init__(self, pool: asyncpg.Pool, client: Client, reply_timeout_s: float) -> None:
        """``reply_timeout_s`` bounds the wait for the agent, unless the call's deadline is
        sooner."""
        self._pool = pool
        self._client = client
        self._reply_timeout_s = reply_timeout_s

    async def read(
        self, job: Job, task_index: int, max_bytes: int
    ) -> scheduler_pb2.ReadTaskOutputResponse:
        """Return the last ``max_bytes`` of the output of ``job``'s task ``task_index``.

        Raises InvalidArgument for a task index the job does not have, FailedPrecondition when
        the task has no log to read, Unavailable when the node's agent does not reply, and
        Internal when the agent could not read the log.
        """
        count = job.spec.task_count
        if task_index >= count:
            if count == 1:
                tasks, fix = "task 0", "pass task_index 0"
            else:
                tasks, fix = f"tasks 0 to {count - 1}", f"pass a task_index from 0 to {count - 1}"
            raise InvalidArgument(
                "task_index", f"is {task_index}, but job {job.job_id} has only {tasks}", fix
            )
        lookup_s = remaining_s(LOOKUP_TIMEOUT_S) or 0.0
        location = await locate_task(self._pool, job, task_index, min(lookup_s, LOOKUP_TIMEOUT_S))
        if location is None:
            raise FailedPrecondition(_never_started(job, task_index), field="task_index")
        wait_s = min(self._reply_timeout_s, remaining_s(self._reply_timeout_s) or 0.0)
        try:
            reply = await request_output(self._client, location, max_bytes, wait_s)
        except NoReplyError as error:
            raise Unavailable(
                f"cannot read the output of task {location.task_id}: {error}. The node may be "
                "offline or its agent stopped; try again once the node is up"
            ) from None
        if reply.status == agent_pb2.TASK_OUTPUT_STATUS_OK:
            return scheduler_pb2.ReadTaskOutputResponse(
                output=reply.output,
                truncated=reply.truncated,
                provider_id=location.provider,
                region_id=location.region,
                node_id=location.node,
                attempt=location.attempt,
            )
        if reply.status == agent_pb2.TASK_OUTPUT_STATUS_NOT_FOUND:
            raise FailedPrecondition(_no_log(job, location, reply.message), field="task_index")
        logger.warning(
            "agent of node %s failed to return the log of task %s: %s",
            location.node_name,
            location.task_id,
            reply.message,
            extra={"job_id": job.job_id, "node": location.node_name},
        )
        raise Internal(
            f"the agent of node {location.node_name} failed to return the output of task "
            f"{location.task_id}: {reply.message or 'no reason given'}"
        )


def _never_started(job: Job, task_index: int) -> str:
    """Return why task ``task_index`` of ``job``, which has no recorded start, has no node."""
    task = f"task {task_index} of job {job.job_id}"
    if not job.terminal:
        return (
            f"{task} has not started on any node (the job is {job.state}); read its output "
            "once the job runs"
        )
    # A requeue clears started_at, but an attempt after the first means an earlier one was
    # placed and sent start commands.
    if job.started_at is None and job.attempt == 1:
        return f"{task} never started, so it has no output (the job is {job.state})"
    return (
        f"{task} has no recorded start: the job ended (it is {job.state}) long enough ago that "
        "the scheduler deleted the record of its start commands (after "
        "ACSP_SCHEDULER_OUTBOX_RETENTION_S)"
    )


def _no_log(job: Job, location: TaskLocation, agent_message: str) -> str:
    """Return why the agent of ``location``'s node found no log of the task."""
    task = f"task {location.task_index} of job {job.job_id}"
    where = f"attempt {location.attempt}, job {job.state}"
    if job.spec.simulated_run_s > 0:
        return (
            f"{task} has no output: the job sets simulated_run_seconds, so a simulated agent "
            f"played it without a process ({agent_message}; {where})"
        )
    if not job.spec.command:
        return f"{task} has no output: the job has no command ({where})"
    # The agent's message names the node.
    reason = f"{task} has no output: {agent_message} ({where})"
    if job.reason:
        reason = f"{reason}. The job's reason: {job.reason}"
    if not job.terminal:
        reason = f"{reason}. A task whose process has not started yet has output once it runs"
    return reason
