"""``acsp jobs``: submit, list, show, cancel and watch jobs and read their tasks' output."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import grpc

from acsp.cli import job_logs
from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    async_client_from_args,
    connection_options,
    format_time,
    naming_options,
    note_more_rows,
    output_options,
    print_records,
    rows_of,
    whole_number,
)
from acsp.client import AsyncClient
from acsp.decimals import format_decimal
from acsp.mesh.endpoints import MeshNotFoundError
from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.service.validation import (
    MAX_ARRAY_SIZE,
    MAX_MILLIS_PER_TASK,
    MAX_TASKS,
    MAX_WALL_TIME_S,
)

PRIORITIES = {
    "interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE,
    "standard": common_pb2.PRIORITY_CLASS_STANDARD,
    "preemptible": common_pb2.PRIORITY_CLASS_PREEMPTIBLE,
}
TOPOLOGIES = {
    name.removeprefix("TOPOLOGY_").lower().replace("_", "-"): number
    for name, number in scheduler_pb2.Topology.items()
    if number
}
STATES = {
    name.removeprefix("JOB_STATE_").lower(): number
    for name, number in scheduler_pb2.JobState.items()
    if number
}
"""Job states by the name that the output prints, e.g. ``timed_out``."""
WATCH_DEADLINE_S = 7 * 86_400.0
WATCH_RESUMES: Final = 5
"""Times in a row that ``jobs watch`` opens a stream again after UNAVAILABLE."""
WATCH_RESUME_MAX_DELAY_S: Final = 10.0
"""A watch runs until Ctrl-C; the SDK would otherwise apply its short default deadline."""
ENDED_STATES: Final = frozenset(
    {
        scheduler_pb2.JOB_STATE_COMPLETED,
        scheduler_pb2.JOB_STATE_FAILED,
        scheduler_pb2.JOB_STATE_CANCELLED,
        scheduler_pb2.JOB_STATE_TIMED_OUT,
    }
)
"""Terminal job states: a job in one of them changes no more."""
STARTED_TASK_STATES: Final = frozenset({"started", "exited", "stopped", "timed_out", "lost"})
"""Task states that only a task that started can reach. ``failed_hardware`` is left out
because the scheduler also gives it to tasks that never started."""
SUBMIT_OPTIONS: Final = {
    "request_id": "--request-id",
    "spec.project_id": "--project",
    "spec.grant_id": "--grant",
    "spec.sub_allocation_id": "--sub-allocation",
    "spec.name": "--name",
    "spec.task_count": "--tasks",
    "spec.accelerator_millis_per_task": "--accelerators, in thousandths of an accelerator",
    "spec.accelerators.models": "--model",
    "spec.allowed_regions": "--region",
    "spec.priority_class": "--priority",
    "spec.topology": "--topology",
    "spec.allow_cross_provider": "--allow-cross-provider",
    "spec.wall_time_seconds": "--wall-time",
    "spec.command": "the command after --",
    "spec.environment": "--env",
    "spec.array_size": "--array",
    "spec.after_job_ids": "--after",
}
"""The option of ``acsp jobs submit`` that sets each field SubmitJob may reject."""
AFTER_IDS_SHOWN: Final = 5
"""Jobs that ``acsp jobs show`` names in its ``after`` row before it counts the others."""
ELEMENT_PAGE_SIZE: Final = 1000
"""Jobs per ListJobs page when ``acsp jobs watch`` lists an ended array's elements."""
MAX_SHOWN_DIGITS: Final = 12
"""Length up to which an error writes an --accelerators value in plain digits."""
LIST_COLUMNS = ("job", "name", "state", "reason", "tasks", "accelerators", "attempt", "submitted")


@contextmanager
def open_scheduler(args: argparse.Namespace) -> Iterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    """Yield the scheduler stub of the running mesh."""
    from acsp.client import Client

    with Client.from_mesh(
        args.data_dir, token=args.token, timeout_s=args.timeout, wait_for_ready=False
    ) as client:
        yield client.scheduler


def register(subparsers: Any) -> None:
    jobs = subparsers.add_parser(
        "jobs", help="submit, list, show, cancel and watch jobs, and read their output"
    )
    commands = jobs.add_subparsers(title="jobs commands", metavar="COMMAND", required=True)
    connection = connection_options()
    output = output_options(amounts=False)

    submit = commands.add_parser(
        "submit",
        parents=[connection, output],
        help="submit a job or a job array",
        description=(
            "Submit a job. All tasks of a job start together or none of them do. Submit "
            "tasks that can start independently as a job array, with --array N."
        ),
    )
    submit.add_argument("--project", required=True, help="project the job runs for")
    submit.add_argument(
        "--grant",
        default="",
        help="grant that pays; required with --sub-allocation (default: the project's)",
    )
    submit.add_argument(
        "--sub-allocation",
        default="",
        help="sub-allocation of --grant that pays, which needs --grant (default: the grant itself)",
    )
    submit.add_argument("--name", default="", help="display name")
    submit.add_argument(
        "--tasks",
        type=whole_number(1, MAX_TASKS),
        default=1,
        help=f"number of tasks, at most {MAX_TASKS}, which all start together (default: 1)",
    )
    submit.add_argument(
        "--accelerators",
        default="1",
        metavar="N",
        help="accelerators per task: a whole number, or a share of one such as 0.25 (default: 1)",
    )
    submit.add_argument("--model", action="append", default=[], help="accepted model; repeat")
    submit.add_argument(
        "--region", action="append", default=[], help="allowed <provider>/<region>; repeat"
    )
    submit.add_argument(
        "--priority",
        choices=sorted(PRIORITIES),
        default="standard",
        help="interactive must start within seconds; preemptible may be stopped for higher "
        "classes and provider recalls (default: standard)",
    )
    submit.add_argument(
        "--topology",
        choices=sorted(TOPOLOGIES),
        default=None,
        help="where the tasks must run relative to each other (default: same-provider, "
        "so all tasks run on one provider unless --allow-cross-provider is given)",
    )
    submit.add_argument(
        "--allow-cross-provider",
        action="store_true",
        help="let the tasks of one job span providers if every provider involved allows "
        "cross-provider gangs",
    )
    # Kept only to reject it with a message that names the job array, the way to start
    # tasks independently, because the scheduler always starts a job's tasks together.
    submit.add_argument("--no-gang", action="store_true", help=argparse.SUPPRESS)
    submit.add_argument(
        "--wall-time",
        type=whole_number(1, MAX_WALL_TIME_S),
        default=3600,
        metavar="SECONDS",
        help=f"wall-time limit in seconds, at most {MAX_WALL_TIME_S} (default: 3600)",
    )
    submit.add_argument(
        "--checkpointable",
        action="store_true",
        help="the job can checkpoint, so a preemption gives it a grace period first",
    )
    submit.add_argument(
        "--array",
        type=array_size,
        default=None,
        metavar="N",
        help=f"submit a job array of N jobs, from 1 to {MAX_ARRAY_SIZE}, which start "
        "independently of each other; each job gets its index, from 0, in $ACSP_ARRAY_INDEX",
    )
    submit.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="JOB_ID",
        help="start only once this job, or every job of this array, has completed; if one of "
        "them fails or is cancelled, this job is cancelled too; repeat --after or separate ids "
        "with commas",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable of every task; repeat",
    )
    submit.add_argument("--request-id", default="", help="idempotency key (default: random)")
    submit.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the job id (an array's id), for JOB_ID=$(acsp jobs submit -q ...)",
    )
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- program and arguments")
    submit.set_defaults(func=submit_job)

    listing = commands.add_parser(
        "list",
        parents=[connection, output],
        help="list jobs",
        description="List the jobs you submitted, or a project's with --project, newest "
        "first, with each job's state and the reason for it.",
    )
    listing.add_argument(
        "--project",
        default="",
        help="this project's jobs, by every member (default: the jobs you submitted)",
    )
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=state_name,
        choices=sorted(STATES),
        help="only jobs in this state, as the state column prints it; repeat for several "
        "(default: every state)",
    )
    listing.add_argument("--array", default="", help="only the jobs of this array")
    listing.add_argument(
        "--limit", type=whole_number(1), default=50, help="jobs to show (default: 50)"
    )
    listing.set_defaults(func=list_jobs)

    show = commands.add_parser(
        "show",
        parents=[connection, output],
        help="show one job",
        description="Show one job: its spec, state, attempt, grant and hold, and where each "
        "task of its current attempt runs.",
    )
    show.add_argument("job_id", help="the job to show, as acsp jobs submit or list print it")
    show.set_defaults(func=show_job)

    cancel = commands.add_parser(
        "cancel",
        parents=[connection, output],
        help="cancel a job",
        description="Cancel a job, or every element of a job array that has not ended, and "
        "print the job. The scheduler stops the job's running tasks. A job that already ended "
        "is printed unchanged, with a note on stderr.",
    )
    cancel.add_argument(
        "job_id", help="the job to cancel, or a job array's id to cancel all its elements"
    )
    cancel.add_argument("--reason", default="", help="why, recorded with the job")
    cancel.set_defaults(func=cancel_job)

    watch = commands.add_parser(
        "watch",
        parents=[connection],
        help="print job changes as they happen, until the one job watched ends (Ctrl-C stops)",
        description=(
            "Print one line per job change, starting with the UTC time the scheduler recorded "
            "it. Given JOB_ID, stop when that job ends and exit 0 only if it completed. Exit 1 "
            "if it failed, was cancelled or timed out, or if the stream closed before the job "
            "ended. Without JOB_ID, watch until Ctrl-C."
        ),
    )
    watch.add_argument("job_id", nargs="?", default="", help="one job (default: all yours)")
    watch.add_argument(
        "--project", default="", help="this project's jobs, by every member (default: yours)"
    )
    watch.set_defaults(func=watch_jobs)

    job_logs.register(commands, connection)


def state_name(text: str) -> str:
    """Parse ``--state`` for argparse: the state as the output prints it, e.g. ``timed_out``.

    Earlier versions took ``timed-out``, with a hyphen, so a hyphen is read as an underscore.
    """
    return text.replace("-", "_")


def array_size(text: str) -> int:
    """Parse ``--array`` for argparse: a whole number from 1 to the scheduler's maximum.

    The scheduler reads an ``array_size`` of 0 as "no array", because a proto3 ``uint32`` has
    no presence, so an explicit 0 would submit a single job without ``$ACSP_ARRAY_INDEX``.
    """
    try:
        is_zero = int(text) == 0
    except ValueError:
        is_zero = False
    if is_zero:
        raise argparse.ArgumentTypeError(
            "0 is not a valid array size: an array has at least 1 job. Give --array N with "
            f"N from 1 to {MAX_ARRAY_SIZE}, or leave out --array to submit a single job"
        )
    return whole_number(1, MAX_ARRAY_SIZE)(text)


def parse_after(items: list[str]) -> list[str]:
    """Split the ``--after`` values at commas into job ids, without spaces around each.

    An empty id is rejected, because it usually comes from an empty shell variable, e.g.
    ``--after "$J"`` after a failed ``J=$(acsp jobs submit -q ...)``, and dropping it would
    start the job at once, without the dependency the user meant.
    """
    job_ids: list[str] = []
    for item in items:
        for job_id in item.split(","):
            job_id = job_id.strip()
            if not job_id:
                raise CommandError(
                    f"--after {item!r} contains an empty job id, perhaps from an empty shell "
                    "variable. Give one or more job ids, e.g. --after JOB_ID or --after "
                    "JOB_ID,JOB_ID, or leave out --after to start the job without waiting",
                    EXIT_USAGE,
                )
            job_ids.append(job_id)
    return job_ids


def parse_millis(text: str) -> int:
    """Convert ``--accelerators`` (``2`` or ``0.25``) to milli-accelerators."""
    try:
        # Decimal() reads '0_5' as 5 and non-ASCII digits too, so a mistyped share would
        # become whole accelerators.
        if not text.isascii() or "_" in text:
            raise InvalidOperation
        value = Decimal(text)
    except InvalidOperation:
        raise CommandError(
            f"--accelerators {text!r} is not a number; give e.g. 2 or 0.25", EXIT_USAGE
        ) from None
    # Before the multiplication by 1000, which raises decimal.Overflow from 1e999997 up.
    if value.is_finite() and value > Decimal(MAX_MILLIS_PER_TASK) / 1000:
        # In plain digits, so that 1e3 reads as 1000, unless that is longer than what was typed.
        # The digits of a huge exponent are never written out: 1e99999999 would take 100 MB.
        shown = text
        if value.adjusted() < max(len(text), MAX_SHOWN_DIGITS):
            shown = format_decimal(value)
        if len(shown) > max(len(text), MAX_SHOWN_DIGITS):
            shown = text
        raise CommandError(
            f"--accelerators {shown} is more than the maximum of "
            f"{MAX_MILLIS_PER_TASK // 1000} per task; ask for at most "
            f"{MAX_MILLIS_PER_TASK // 1000}, and spread larger work over more tasks with --tasks",
            EXIT_USAGE,
        )
    millis = value * 1000 if value.is_finite() else Decimal(0)
    if millis <= 0 or millis != millis.to_integral_value():
        raise CommandError(
            f"--accelerators {text!r}: use a positive whole number or thousandths of one",
            EXIT_USAGE,
        )
    if millis > 1000 and millis % 1000:
        raise CommandError(
            f"--accelerators {text!r}: a share is only possible below one accelerator; "
            "use a whole number above 1",
            EXIT_USAGE,
        )
    return int(millis)


def spec_from_args(args: argparse.Namespace) -> scheduler_pb2.JobSpec:
    if args.no_gang:
        raise CommandError(
            "--no-gang is not supported: all tasks of a job start together or none of them "
            "do. Submit tasks that can start independently as a job array instead, e.g. "
            "--array 4 --tasks 1 for 4 one-task jobs",
            EXIT_USAGE,
        )
    if args.sub_allocation and not args.grant:
        # The grant service finds a sub-allocation only within its grant, so the CLI cannot
        # fill --grant in from the sub-allocation id.
        raise CommandError(
            f"--sub-allocation {args.sub_allocation} needs --grant: a sub-allocation is part "
            "of one grant, so pass --grant with the id of that grant (acsp grants "
            "suballocations GRANT_ID lists a grant's sub-allocations)",
            EXIT_USAGE,
        )
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CommandError(
            "give the command after --, e.g. acsp jobs submit ... -- python train.py", EXIT_USAGE
        )
    environment: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(
                f"--env {item!r} is not KEY=VALUE; give --env KEY=VALUE, e.g. "
                "--env OMP_NUM_THREADS=8",
                EXIT_USAGE,
            )
        if not key.strip():
            raise CommandError(
                f"--env {item!r} has no variable name before =; give --env KEY=VALUE, e.g. "
                "--env OMP_NUM_THREADS=8",
                EXIT_USAGE,
            )
        environment[key] = value
    return scheduler_pb2.JobSpec(
        name=args.name or command[0],
        project_id=args.project,
        grant_id=args.grant,
        sub_allocation_id=args.sub_allocation,
        task_count=args.tasks,
        accelerator_millis_per_task=parse_millis(args.accelerators),
        gang=True,
        topology=TOPOLOGIES[args.topology] if args.topology else 0,  # type: ignore[arg-type]
        allow_cross_provider=args.allow_cross_provider,
        accelerators=scheduler_pb2.AcceleratorConstraint(models=args.model),
        allowed_regions=args.region,
        priority_class=PRIORITIES[args.priority],  # type: ignore[arg-type]
        wall_time_seconds=args.wall_time,
        checkpointable=args.checkpointable,
        command=command,
        environment=environment,
        array_size=args.array or 0,
        after_job_ids=parse_after(args.after),
    )


def submit_job(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    request = scheduler_pb2.SubmitJobRequest(
        request_id=args.request_id or uuid.uuid4().hex, spec=spec
    )
    with open_scheduler(args) as scheduler, naming_options(SUBMIT_OPTIONS):
        response = scheduler.SubmitJob(request)
    if args.quiet:
        print(response.job.job_id)
        return EXIT_OK
    if response.array_job_ids:
        rows = [job_row_of(response.job)] + [
            {"job": job_id, "name": spec.name, "state": "pending"}
            for job_id in response.array_job_ids
        ]
        print_records(rows, LIST_COLUMNS, output_format=args.format, title="submitted array")
    else:
        print_records([job_row_of(response.job)], LIST_COLUMNS, output_format=args.format)
    return EXIT_OK


def list_jobs(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    token = ""
    with open_scheduler(args) as scheduler:
        while len(rows) < args.limit:
            response = scheduler.ListJobs(
                scheduler_pb2.ListJobsRequest(
                    project_id=args.project,
                    states=[STATES[s] for s in args.state],  # type: ignore[misc]
                    array_job_id=args.array,
                    page=common_pb2.PageRequest(
                        page_size=min(1000, args.limit - len(rows)), page_token=token
                    ),
                )
            )
            rows.extend(job_row_of(job) for job in response.jobs)
            token = response.page.next_page_token
            if not token:
                break
    print_records(rows, LIST_COLUMNS, output_format=args.format, title="jobs, newest first")
    if token:
        note_more_rows(len(rows), f"pass a --limit above {args.limit} to list more")
    return EXIT_OK


def show_job(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        job = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=args.job_id))
    print_records(
        rows_of(job_details(job)),
        ("field", "value"),
        output_format=args.format,
        title=f"job {job.job_id}",
    )
    if job.placements:
        print_records(
            [placement_row(p) for p in job.placements],
            ("task", "node", "accelerators", "state", "exit"),
            output_format=args.format,
            title="placement",
        )
    return EXIT_OK


def cancel_job(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        # An array's parent ends once all its elements have, whether they were cancelled just
        # now or ended before, so only its state before the call tells whether any was open.
        before = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=args.job_id))
        job = scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(
                request_id=uuid.uuid4().hex, job_id=args.job_id, reason=args.reason
            )
        )
    print_records([job_row_of(job)], LIST_COLUMNS, output_format=args.format)
    # The scheduler returns a job that ended before the call unchanged and without an error.
    is_array_parent = job.array_job_id == job.job_id
    if is_array_parent:
        if before.state in ENDED_STATES:
            state = _name(scheduler_pb2.JobState, before.state, "JOB_STATE_")
            sys.stderr.write(
                f"note: every element of job array {job.job_id} had already ended (array "
                f"state {state}), so nothing was cancelled\n"
            )
        return EXIT_OK
    ended = job.state in ENDED_STATES and job.state != scheduler_pb2.JOB_STATE_CANCELLED
    if ended:
        state = _name(scheduler_pb2.JobState, job.state, "JOB_STATE_")
        sys.stderr.write(
            f"note: job {job.job_id} had already ended ({state}), so nothing was cancelled\n"
        )
    return EXIT_OK


@dataclass(slots=True)
class _WatchProgress:
    """The state a watch carries from one stream to the next when it resumes."""

    last_lines: dict[str, str] = field(default_factory=dict)
    """The last line printed for each job that has not ended, by job id."""
    resumes: int = 0
    """Streams opened again in a row; a received change resets it to 0."""
    ended_elements: set[str] = field(default_factory=set)
    """The elements of the array watched whose end was printed, by job id."""


async def watch_jobs(args: argparse.Namespace) -> int:
    """Print one line per job change until interrupted, the stream ends, or the one job
    watched has ended.

    A stream that ends with UNAVAILABLE (the scheduler lost its leadership, the watch fell
    behind, or the mesh restarted) is opened again with the initial state, up to
    :data:`WATCH_RESUMES` times in a row. Each resume reads the mesh file again, so that it
    reaches a mesh that ``acsp up`` started anew on other ports.

    Returns EXIT_OK for a watch of all jobs. For one job it returns EXIT_OK only when that job
    completed, so that a script can test the outcome by the exit status. A job array's id
    watches its elements until the last one ends, and the outcome is the array's.
    """
    request = scheduler_pb2.WatchJobsRequest(
        job_id=args.job_id, project_id=args.project, send_initial=True
    )
    # The service sends the whole job on every committed change, also of fields that the line
    # leaves out (the hold, a checkpoint), and a change made while the watch starts comes
    # again after the initial state. So a line is printed only when it differs from the last.
    progress = _WatchProgress()
    while True:
        try:
            final_state = await _watch_once(args, request, progress)
            break
        except (grpc.aio.AioRpcError, MeshNotFoundError) as error:
            if isinstance(error, grpc.aio.AioRpcError):
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                detail = error.details()
            else:
                # The first open reports a missing mesh file at once. A resume waits for the
                # mesh to come back, as it waits for an unreachable scheduler.
                if not progress.resumes:
                    raise
                detail = str(error)
            if progress.resumes >= WATCH_RESUMES:
                raise
            progress.resumes += 1
            delay_s = min(WATCH_RESUME_MAX_DELAY_S, 0.5 * 2**progress.resumes)
            sys.stderr.write(f"watch interrupted: {detail}; watching again in {delay_s:.0f} s\n")
            await asyncio.sleep(delay_s)
    if not args.job_id or final_state == scheduler_pb2.JOB_STATE_COMPLETED:
        return EXIT_OK
    if final_state == scheduler_pb2.JOB_STATE_UNSPECIFIED:
        raise CommandError(
            f"the watch stream closed before job {args.job_id} ended, so its outcome is "
            f"unknown. Run acsp jobs watch {args.job_id} again"
        )
    return EXIT_FAILURE


async def _watch_once(
    args: argparse.Namespace, request: scheduler_pb2.WatchJobsRequest, progress: _WatchProgress
) -> int:
    """Open a client from the mesh file and follow one WatchJobs stream until it ends.

    Returns the end state of the one job watched, or JOB_STATE_UNSPECIFIED if the stream
    closed first or the watch is of all jobs.
    """
    async with async_client_from_args(args) as client:
        stream = client.scheduler.WatchJobs(request, timeout=WATCH_DEADLINE_S)
        async for job in stream:
            progress.resumes = 0
            if args.job_id and job.job_id != args.job_id:
                # An element of the array watched: the array ends with its last one.
                if not _print_change(job, progress.last_lines):
                    continue
                progress.ended_elements.add(job.job_id)
                job = await client.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=args.job_id))
                if job.state not in ENDED_STATES:
                    continue
            if args.job_id and job.array_job_id == job.job_id and job.state in ENDED_STATES:
                # For an array that ended before the watch, the first element or the parent
                # ends the watch before the stream sends the other elements, so their final
                # states are listed here, once each.
                await _print_ended_elements(client, job.job_id, progress)
            # The array's line counts its elements by outcome.
            if not (_print_change(job, progress.last_lines) and args.job_id):
                continue
            stream.cancel()
            return int(job.state)
    return scheduler_pb2.JOB_STATE_UNSPECIFIED


async def _print_ended_elements(
    client: AsyncClient, array_job_id: str, progress: _WatchProgress
) -> None:
    """Print the final state of each element of an ended array not printed yet, by index."""
    elements: list[scheduler_pb2.Job] = []
    token = ""
    # Bounded, so that a server that keeps returning a page token cannot loop forever.
    for _ in range(MAX_ARRAY_SIZE // ELEMENT_PAGE_SIZE + 2):
        response = await client.scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(
                array_job_id=array_job_id,
                page=common_pb2.PageRequest(page_size=ELEMENT_PAGE_SIZE, page_token=token),
            )
        )
        elements += [job for job in response.jobs if job.job_id != array_job_id]
        token = response.page.next_page_token
        if not token:
            break
    for job in sorted(elements, key=lambda element: element.array_index):
        if job.job_id not in progress.ended_elements:
            _print_change(job, progress.last_lines)
            progress.ended_elements.add(job.job_id)


def _print_change(job: scheduler_pb2.Job, last_lines: dict[str, str]) -> bool:
    """Print the change of ``job`` if its line differs from the last; return True if it ended."""
    line = watch_line(job)
    if last_lines.get(job.job_id) != line:
        sys.stdout.write(f"{change_time(job)}  {line}\n")
        sys.stdout.flush()
    if job.state not in ENDED_STATES:
        last_lines[job.job_id] = line
        return False
    # An ended job changes no more, and a watch of all jobs may run for weeks.
    last_lines.pop(job.job_id, None)
    return True


def change_time(job: scheduler_pb2.Job) -> str:
    """Return when the scheduler recorded the job's latest change, in ISO 8601 UTC to the second.

    Schedulers that predate ``Job.update_time`` leave it unset. For their changes the time this
    client received the change is used instead, which is later by the stream's delay.
    """
    if job.HasField("update_time"):
        return format_time(job.update_time)
    return datetime.now(UTC).isoformat(timespec="seconds")


def watch_line(job: scheduler_pb2.Job) -> str:
    row = job_row_of(job)
    tasks = job.placements
    if job.HasField("start_time"):
        # Every task of this attempt started, whatever each one's state is now.
        started = len(tasks)
    else:
        started = sum(1 for t in tasks if t.state in STARTED_TASK_STATES)
    progress = f"{started}/{len(tasks)} tasks started" if tasks else ""
    parts = [row["job"], row["state"], progress, row["reason"]]
    return "  ".join(part for part in parts if part)


def job_row_of(job: scheduler_pb2.Job) -> dict[str, Any]:
    state = _name(scheduler_pb2.JobState, job.state, "JOB_STATE_")
    reason = job.state_message
    if job.state == scheduler_pb2.JOB_STATE_PENDING and job.pending_reason:
        code = _name(scheduler_pb2.PendingReason, job.pending_reason, "PENDING_REASON_")
        reason = f"{code}: {reason}" if reason else code
    return {
        "job": job.job_id,
        "name": job.spec.name,
        "state": state,
        "reason": reason,
        "tasks": job.spec.task_count,
        "accelerators": _accelerators(job.spec.accelerator_millis_per_task),
        "attempt": job.attempt,
        "submitted": format_time(job.submit_time),
    }


def job_details(job: scheduler_pb2.Job) -> list[tuple[str, Any]]:
    row = job_row_of(job)
    return [
        ("job", job.job_id),
        ("name", job.spec.name),
        ("owner", job.owner_subject),
        ("project", job.spec.project_id),
        ("grant", job.grant_id),
        ("sub-allocation", job.spec.sub_allocation_id),
        ("state", row["state"]),
        ("reason", row["reason"]),
        ("attempt", job.attempt),
        ("attempt reason", job.attempt_reason),
        ("rendezvous", _rendezvous_text(job)),
        ("tasks", job.spec.task_count),
        ("accelerators per task", row["accelerators"]),
        ("wall time (s)", job.spec.wall_time_seconds),
        ("command", shlex.join(job.spec.command)),
        ("hold", job.hold_id),
        ("submitted", format_time(job.submit_time)),
        ("started", format_time(job.start_time)),
        ("ended", format_time(job.end_time)),
        ("array", _array_text(job)),
        ("after", _after_text(job)),
        ("checkpointable", job.spec.checkpointable),
        ("first checkpoint", job.spec.checkpoint_reference),
        ("last checkpoint", job.checkpoint_reference),
        ("last checkpoint at", format_time(job.checkpoint_time)),
    ]


def _rendezvous_text(job: scheduler_pb2.Job) -> str:
    """Return the rendezvous port and task 0's node, or nothing before the attempt starts."""
    task_zero = next((task for task in job.placements if task.task_index == 0), None)
    if not job.rendezvous_port or task_zero is None:
        return ""
    node = f"{task_zero.provider_id}/{task_zero.region_id}/{task_zero.node_id}"
    return f"port {job.rendezvous_port} on {node}, the node of task 0"


def _after_text(job: scheduler_pb2.Job) -> str:
    """Return the jobs that ``job`` waits for, the first few by id and the others counted."""
    ids = list(job.spec.after_job_ids)
    if len(ids) <= AFTER_IDS_SHOWN:
        return " ".join(ids)
    return " ".join(ids[:AFTER_IDS_SHOWN]) + f" and {len(ids) - AFTER_IDS_SHOWN} more"


def _array_text(job: scheduler_pb2.Job) -> str:
    """Return ``<array>[<index>]`` for an element of a job array, or how to list a parent's."""
    if not job.array_job_id:
        return ""
    # The scheduler sends a parent with its own id as the array id and index 0, which would
    # read as the array's first element.
    if job.array_job_id == job.job_id:
        return f"the whole array; list its jobs with acsp jobs list --array {job.job_id}"
    return f"{job.array_job_id}[{job.array_index}]"


def placement_row(task: scheduler_pb2.TaskPlacement) -> dict[str, Any]:
    return {
        "task": task.task_index,
        "node": f"{task.provider_id}/{task.region_id}/{task.node_id}",
        "accelerators": ", ".join(a.accelerator_id for a in task.accelerators),
        "state": task.state,
        "exit": task.exit_code if task.state == "exited" else "",
    }


def _accelerators(millis: int) -> str:
    if millis % 1000 == 0:
        return str(millis // 1000)
    return f"{millis / 1000:g}"


def _name(enum: Any, number: int, prefix: str) -> str:
    return str(enum.Name(number)).removeprefix(prefix).lower()
