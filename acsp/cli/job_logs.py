"""``acsp jobs logs``: print the end of a task's output as the task wrote it."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

from acsp.cli._common import EXIT_OK, client_from_args, whole_number
from acsp.v1 import scheduler_pb2

DEFAULT_BYTES: Final = 64 << 10
"""The scheduler's default of ``ReadTaskOutputRequest.max_bytes``."""
MAX_BYTES: Final = 1 << 20
"""Maximum bytes that ``ReadTaskOutput`` returns in one call."""


def register(commands: Any, connection: argparse.ArgumentParser) -> None:
    """Add ``logs`` to the ``acsp jobs`` commands."""
    logs = commands.add_parser(
        "logs",
        parents=[connection],
        help="print the end of a task's output (standard output and error)",
        description=(
            "Print the last bytes that a task of the job wrote to standard output and standard "
            "error, as written, from the node that ran the task's latest attempt. When that is "
            "not all that the task wrote, a note on stderr reports the output as cut."
        ),
    )
    logs.add_argument("job_id")
    logs.add_argument(
        "--task",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="the task's index within the job, from 0 (default: 0)",
    )
    logs.add_argument(
        "--bytes",
        type=whole_number(1, MAX_BYTES),
        default=DEFAULT_BYTES,
        metavar="N",
        help=f"bytes from the end of the output to print, at most {MAX_BYTES} "
        f"(default: {DEFAULT_BYTES})",
    )
    logs.set_defaults(func=print_task_output)


def print_task_output(args: argparse.Namespace) -> int:
    """Write the end of the task's output to stdout unchanged, and a note to stderr if cut."""
    request = scheduler_pb2.ReadTaskOutputRequest(
        job_id=args.job_id, task_index=args.task, max_bytes=args.bytes
    )
    with client_from_args(args) as client:
        response = client.scheduler.ReadTaskOutput(request)
    # Text already written to sys.stdout goes out before the raw bytes.
    sys.stdout.flush()
    sys.stdout.buffer.write(response.output)
    sys.stdout.buffer.flush()
    if response.truncated:
        node = f"{response.provider_id}/{response.region_id}/{response.node_id}"
        sys.stderr.write(
            f"note: output cut: the {len(response.output)} bytes above are the end of what "
            f"task {args.task} of job {args.job_id} wrote (attempt {response.attempt}, node "
            f"{node}); pass --bytes N, up to {MAX_BYTES}, for more\n"
        )
    return EXIT_OK
