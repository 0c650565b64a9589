"""``acsp jobs logs``: print the end of a task's output as the task wrote it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from acsp.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    STATUS_DETAILS_KEY,
    CommandError,
    client_from_args,
    describe_rpc_error,
    exit_code_for_rpc_error,
    naming_options,
    rejected_fields,
    whole_number,
)
from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.service.task_output import DEFAULT_OUTPUT_BYTES, MAX_OUTPUT_BYTES
from scheduler.service.validation import MAX_TASKS

DEFAULT_BYTES: Final = DEFAULT_OUTPUT_BYTES
"""The scheduler's default of ``ReadTaskOutputRequest.max_bytes``."""
MAX_BYTES: Final = MAX_OUTPUT_BYTES
"""Maximum bytes that ``ReadTaskOutput`` returns in one call; the scheduler rejects more."""
LAST_TASK_INDEX: Final = MAX_TASKS - 1
"""The largest task index a job can have: tasks are numbered from 0 and the scheduler accepts
at most ``MAX_TASKS`` of them."""
LOGS_OPTIONS: Final = {"task_index": "--task", "max_bytes": "--bytes"}
"""The option behind each ``ReadTaskOutputRequest`` field, for error messages."""
ENDED_STATES: Final = frozenset(
    {
        scheduler_pb2.JOB_STATE_COMPLETED,
        scheduler_pb2.JOB_STATE_FAILED,
        scheduler_pb2.JOB_STATE_CANCELLED,
        scheduler_pb2.JOB_STATE_TIMED_OUT,
    }
)
"""Job states after which a task writes no more output."""


def register(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Add ``logs`` to the ``acsp jobs`` commands."""
    logs = commands.add_parser(
        "logs",
        parents=[connection],
        help="print the end of a task's output (standard output and error)",
        description=(
            "Print the last bytes that a task of the job wrote to standard output and standard "
            "error, as written, from the node that ran the task's latest attempt. When that is "
            "not all that the task wrote, a note on stderr reports the output as cut. A task with "
            "no output prints nothing on stdout and a note on stderr."
        ),
    )
    logs.add_argument("job_id", help="the job whose task's output to print")
    logs.add_argument(
        "--task",
        type=task_index,
        default=0,
        metavar="N",
        help=f"the task's index within the job, from 0 to the job's task count minus 1, "
        f"at most {LAST_TASK_INDEX} (default: 0)",
    )
    logs.add_argument(
        "--bytes",
        type=byte_count,
        default=DEFAULT_BYTES,
        metavar="N",
        help=f"bytes from the end of the output to print, from 1 to the scheduler's maximum "
        f"of {MAX_BYTES} (default: {DEFAULT_BYTES})",
    )
    logs.set_defaults(func=print_task_output)


def task_index(text: str) -> int:
    """Parse ``--task`` for argparse: a whole number from 0 to :data:`LAST_TASK_INDEX`."""
    return _bounded(
        text,
        0,
        LAST_TASK_INDEX,
        f"A job has at most {MAX_TASKS} tasks, numbered from 0, and `acsp jobs show JOB_ID` "
        "shows its task count",
    )


def byte_count(text: str) -> int:
    """Parse ``--bytes`` for argparse: a whole number from 1 to :data:`MAX_BYTES`."""
    return _bounded(
        text,
        1,
        MAX_BYTES,
        f"The scheduler returns at most {MAX_BYTES} bytes of a task's output in one call",
    )


def _bounded(text: str, minimum: int, maximum: int, reason: str) -> int:
    """Parse a whole number from ``minimum`` to ``maximum``, and add ``reason`` to an error
    about a number above ``maximum``."""
    try:
        return whole_number(minimum, maximum)(text)
    except argparse.ArgumentTypeError as error:
        if text.strip().lstrip("+").isdigit() and int(text) > maximum:
            raise argparse.ArgumentTypeError(f"{error}. {reason}") from None
        raise


def print_task_output(args: argparse.Namespace) -> int:
    """Write the end of the task's output to stdout unchanged, and notes to stderr."""
    request = scheduler_pb2.ReadTaskOutputRequest(
        job_id=args.job_id, task_index=args.task, max_bytes=args.bytes
    )
    with client_from_args(args) as client:
        with (
            naming_options(LOGS_OPTIONS),
            naming_task_option(),
            explaining_unreadable_job(client.scheduler, args.job_id),
        ):
            response = client.scheduler.ReadTaskOutput(request)
        ended = False
        if not response.output:
            job = client.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=args.job_id))
            ended = job.state in ENDED_STATES
    task = f"task {args.task} of job {args.job_id}"
    if not response.output:
        written = "wrote no output" if ended else "has written no output yet"
        sys.stderr.write(f"note: {task} {written}\n")
        return EXIT_OK
    # Text already written to sys.stdout goes out before the raw bytes.
    sys.stdout.flush()
    sys.stdout.buffer.write(response.output)
    sys.stdout.buffer.flush()
    if response.truncated:
        node = f"{response.provider_id}/{response.region_id}/{response.node_id}"
        returned = len(response.output)
        note = (
            f"note: output cut: the {returned} bytes above are the end of what {task} wrote "
            f"(attempt {response.attempt}, node {node})"
        )
        if returned < args.bytes:
            # The agent cuts its reply to fit one NATS message, or kept only the start and
            # the end of a log over its size limit, so a larger --bytes returns no more.
            note += (
                f"; the node returned fewer than the {args.bytes} bytes requested because its "
                "reply must fit the NATS max payload or it kept only part of a long log"
            )
        elif args.bytes < MAX_BYTES:
            note += f"; pass --bytes N, up to {MAX_BYTES}, for more"
        sys.stderr.write(note + "\n")
    return EXIT_OK


@contextmanager
def explaining_unreadable_job(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub, job_id: str
) -> Iterator[None]:
    """Give the command to run next when a job has no task output to read.

    A task without output (not started, or no log on its node) fails with
    FAILED_PRECONDITION, which names ``task_index`` although another --task is seldom the
    fix. So the error is raised here without that hint, and with the command that follows a
    job that has not ended. A job array fails with INVALID_ARGUMENT on ``job_id``, and the
    error then names the command that lists the array's elements. Each case costs one more
    GetJob call, on the error path only.
    """
    try:
        yield
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            message = describe_rpc_error(error)
            job = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
            if job.state not in ENDED_STATES:
                message += f"\nhint: acsp jobs watch {job_id} follows the job until it ends"
            raise CommandError(message, exit_code_for_rpc_error(error)) from None
        if code != grpc.StatusCode.INVALID_ARGUMENT or "job_id" not in rejected_fields(error):
            raise
        job = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        if job.array_job_id != job.job_id:
            raise
        message = (
            f"{describe_rpc_error(error)}\n"
            f"hint: acsp jobs list --array {job_id} lists the ids of its elements"
        )
        raise CommandError(message, exit_code_for_rpc_error(error)) from None


@contextmanager
def naming_task_option() -> Iterator[None]:
    """Add ``--task`` to a NOT_FOUND error about a task index the job does not have, and exit
    with the status of invalid input.

    Older schedulers return NOT_FOUND for such an index, with the request field
    ``task_index`` in the message and the task in a ``ResourceInfo`` detail. Current ones
    return INVALID_ARGUMENT, which :func:`naming_options` handles.
    """
    try:
        yield
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND or not _names_task(error):
            raise
        message = f"{describe_rpc_error(error)} (task_index is set by --task)"
        raise CommandError(message, EXIT_USAGE) from None


def _names_task(error: grpc.RpcError) -> bool:
    """Return whether a failed call's status details name a task as the missing resource."""
    trailers = dict(error.trailing_metadata() or ())
    packed = trailers.get(STATUS_DETAILS_KEY)
    if not isinstance(packed, bytes):
        return False
    for detail in status_pb2.Status.FromString(packed).details:
        resource = error_details_pb2.ResourceInfo()
        if detail.Unpack(resource) and resource.resource_type == "task":
            return True
    return False
