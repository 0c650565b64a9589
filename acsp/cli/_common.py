"""Helpers every ``acsp`` command shares: connection options, output, errors, exit codes."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as datetime_time
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any, Final, TextIO

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from rich.console import Console
from rich.table import Table
from rich.text import Text

from acsp._channel import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from acsp.client import AsyncClient, Client
from acsp.decimals import format_decimal, from_proto
from acsp.mesh.endpoints import default_data_dir
from acsp.v1 import common_pb2

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
"""A call failed, a service is not serving, or a child of the mesh died."""
EXIT_USAGE: Final = 2
"""Bad command line or bad input (argparse also exits 2)."""
EXIT_NO_MESH: Final = 3
"""No running mesh was found (no mesh file) or its services could not be reached."""
EXIT_INTERRUPTED: Final = 130
"""Stopped by Ctrl-C, as shells report SIGINT."""

OUTPUT_FORMATS: Final = ("table", "csv", "json")
TABLE_DECIMAL_PLACES: Final = 6
"""Decimal places of the amounts (Decimal values) that a table shows; CSV and JSON keep all."""
TOKEN_HINT: Final = (
    "hint: export ACSP_TOKEN=$(acsp token --role ROLE --subject USER) or pass --token"
)
UNREACHABLE_HINT: Final = (
    "hint: run acsp status to see which service is not serving, then read that service's log "
    "in the logs folder of the mesh's data dir, e.g. ~/.acsp/logs/scheduler.log"
)
"""Next steps for a service of the mesh that cannot be reached or does not reply in time.

:func:`unreachable_hint` writes them for the data directory in use."""
PIPE_WIDTH: Final = 1_000
"""Table width in characters when stdout is a pipe or a file."""
UINT32_MAX: Final = 2**32 - 1
"""The largest count a protobuf ``uint32`` field (task count, page size) can carry."""
CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0 and C1 control characters, which a terminal interprets instead of displaying."""
TIME_EXAMPLE: Final = "e.g. 2026-01-31 or 2026-01-31T12:00Z"
END_OF_DAY: Final = " (end of day UTC)"
"""The suffix that a table adds to the last day included by a window that ends at midnight."""
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
"""Trailing metadata key of the ``google.rpc.Status`` that a failed call's details travel in."""
JSON_KEY_WORD: Final = re.compile(r"[a-z0-9]+")
"""A run of the characters that a key of ``--format json`` keeps from a column label."""
FIELD_INDEX: Final = re.compile(r"\[[^\]]*\]")
"""A list index or map key in a field path, e.g. ``[0]`` in ``spec.accelerators.models[0]``."""


class CommandError(Exception):
    """An error to print as one line, without a traceback, and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def whole_number(minimum: int, maximum: int = UINT32_MAX) -> Callable[[str], int]:
    """Return an argparse type that accepts whole numbers from ``minimum`` to ``maximum``.

    argparse prints the option name before the message and exits with status 2.
    """

    # The wire limit of a uint32 is no limit a user needs to read about unless they pass it.
    if maximum < UINT32_MAX:
        expected = f"a whole number from {minimum} to {maximum}"
    else:
        expected = f"a whole number of {minimum} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number; give {expected}"
            ) from None
        if value > maximum:
            raise argparse.ArgumentTypeError(
                f"{value} is out of range; give a whole number from {minimum} to {maximum}"
            )
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {expected}")
        return value

    return parse


def positive_number(noun: str) -> Callable[[str], float]:
    """Return an argparse type that accepts finite numbers above zero.

    ``noun`` names the value in errors, e.g. ``number of seconds``.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text} is not a finite positive {noun}")
        return value

    return parse


positive_seconds: Final = positive_number("number of seconds")
"""Parse a duration in seconds for argparse: a finite number above zero."""


def call_timeout(text: str) -> float:
    """Parse ``--timeout`` for argparse: seconds above zero and at most :data:`MAX_TIMEOUT_S`."""
    seconds = positive_seconds(text)
    if seconds > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text} s is above the maximum of {MAX_TIMEOUT_S:.0f} s (about 31 years); "
            "give a shorter deadline"
        )
    return seconds


def parse_time(text: str, option: str) -> timestamp_pb2.Timestamp:
    """Parse an ISO 8601 time for ``option``; a time without an offset is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"{option} {text!r} is not an ISO 8601 time, {TIME_EXAMPLE}", EXIT_USAGE
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def parse_end_time(text: str, option: str) -> timestamp_pb2.Timestamp:
    """Parse the end of a window for ``option``, as :func:`parse_time` does.

    A date alone (``2027-12-31``) ends the window when that day ends, at the next midnight
    UTC, so that the window includes the whole day it names.
    """
    stamp = parse_time(text, option)
    if is_date_alone(text):
        try:
            stamp.FromDatetime(stamp.ToDatetime(tzinfo=UTC) + timedelta(days=1))
        except OverflowError:
            raise CommandError(
                f"{option} {text!r} would end the window after 9999-12-31, the last day a "
                f"time can name; give a time on that day instead, e.g. {text}T23:59:59Z",
                EXIT_USAGE,
            ) from None
    return stamp


def parse_window(
    start_text: str, end_text: str
) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
    """Parse ``--start`` and ``--end`` of a window; raise a usage error unless end is later."""
    start = parse_time(start_text, "--start")
    end = parse_end_time(end_text, "--end")
    if end.ToNanoseconds() <= start.ToNanoseconds():
        raise CommandError(
            f"--end {end_text} is not after --start {start_text}; end the window later",
            EXIT_USAGE,
        )
    return start, end


def is_date_alone(text: str) -> bool:
    """Return whether ``text``, a valid ISO 8601 time, is a date without a time of day.

    Any form of a date that :func:`datetime.fromisoformat` accepts counts, such as
    ``2027-03-31``, ``20270331`` or the week date ``2027-W13-3``.
    """
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def format_time(stamp: timestamp_pb2.Timestamp) -> str:
    """Write a timestamp as ISO 8601 UTC to the second, or ``""`` when it is unset (zero)."""
    if not stamp.seconds:
        return ""
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class ReadableCell:
    """A value of :func:`print_records` that a table shows differently from CSV and JSON."""

    exact: str
    """The text that CSV and JSON write, exact and unambiguous, for scripts."""
    readable: str
    """The text that a table shows, for people."""

    def __str__(self) -> str:
        return self.exact


def format_end_time(stamp: timestamp_pb2.Timestamp) -> str:
    """Write the exclusive end of a window for a person, e.g. ``2027-03-31 (end of day UTC)``.

    An end at midnight UTC is written as the last day that the window includes, the date that
    ``--end`` took (see :func:`parse_end_time`), instead of as the next day at 00:00. Other
    ends are written as :func:`format_time` writes them.
    """
    if not stamp.seconds:
        return ""
    end = stamp.ToDatetime(tzinfo=UTC)
    # The first day a Timestamp can carry has no day before it.
    if end.time() != datetime_time(0) or end.date() == date.min:
        return format_time(stamp)
    return f"{(end - timedelta(days=1)).date().isoformat()}{END_OF_DAY}"


def end_time_cell(stamp: timestamp_pb2.Timestamp) -> ReadableCell:
    """Return the exclusive end of a window as :func:`format_time` writes it for CSV and
    JSON, and as :func:`format_end_time` writes it for a table."""
    return ReadableCell(format_time(stamp), format_end_time(stamp))


def connection_options() -> argparse.ArgumentParser:
    """Return a parent parser with --data-dir, --token and --timeout for commands that connect."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory of the running mesh (default: $ACSP_DATA_DIR or ~/.acsp)",
    )
    group.add_argument(
        "--token",
        default=None,
        help="bearer token to send (default: $ACSP_TOKEN); get one with `acsp token`",
    )
    group.add_argument(
        "--timeout",
        type=call_timeout,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=(
            f"deadline of each call in seconds, at most {MAX_TIMEOUT_S:.0f} "
            f"(default: {DEFAULT_TIMEOUT_S:g})"
        ),
    )
    return parser


def client_from_args(args: argparse.Namespace) -> Client:
    """Open a blocking client to the mesh named by ``connection_options()`` arguments."""
    # A person at a terminal is better served by an error at once than by a wait, up to the
    # deadline, for a mesh that is not running.
    return Client.from_mesh(
        args.data_dir, token=args.token, timeout_s=args.timeout, wait_for_ready=False
    )


def async_client_from_args(args: argparse.Namespace) -> AsyncClient:
    """Open an asyncio client to the mesh named by ``connection_options()`` arguments."""
    return AsyncClient.from_mesh(
        args.data_dir, token=args.token, timeout_s=args.timeout, wait_for_ready=False
    )


def output_options(amounts: bool = True) -> argparse.ArgumentParser:
    """Return a parent parser with --format for commands that print records.

    With ``amounts`` the help also explains how each format writes amounts and windows. Pass
    False for commands that print neither.
    """
    parser = argparse.ArgumentParser(add_help=False)
    help_text = (
        "output format: a table for people, csv or json (JSON lines, one object per line) "
        "for scripts (default: table)"
    )
    if amounts:
        help_text += (
            f". A table rounds amounts to {TABLE_DECIMAL_PLACES} decimal places, and shows an "
            "amount too small for that as <0.000001. CSV and JSON keep every digit. JSON writes "
            "exact decimal amounts as strings, and counts and flags as numbers and booleans. "
            "Times are UTC. A window's end is exclusive: CSV and JSON write it exactly, e.g. "
            "2027-04-01T00:00:00+00:00, and a table shows an end at midnight as the last day "
            f"included, 2027-03-31{END_OF_DAY}"
        )
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help=help_text)
    return parser


def print_records(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    output_format: str = "table",
    title: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Print ``records`` (one mapping per row) as a rich table, CSV or JSON lines.

    Decimal values are exact amounts: CSV and JSON write every digit (JSON as a string, since a
    JSON number may be read as a float), and a table rounds them with :func:`table_amount`.
    JSON writes ints, floats and bools as JSON numbers and booleans, and None as null. A table
    shows a bool as yes or no, and CSV as true or false. A :class:`ReadableCell` is shown as
    its ``readable`` text in a table and written as its ``exact`` text in CSV and JSON. Other
    values are printed with
    ``str()``. A table prints them as plain text with control
    characters escaped, so a name that a user chose cannot act as rich markup or as a terminal
    escape sequence.
    """
    out = stream if stream is not None else sys.stdout
    if output_format == "csv":
        # Unix line ends, so `cut` and `read` in a shell see no trailing carriage return.
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record.get(column)) for column in columns])
        return
    if output_format == "json":
        for record in records:
            out.write(json.dumps(json_record(record, columns)) + "\n")
        return
    table = Table(
        title=None if title is None else _plain_text(title), show_edge=False, header_style="bold"
    )
    for column in columns:
        # Fold long values instead of cutting them with an ellipsis: ids must stay whole.
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(*(_plain_text(_table_cell(record.get(column))) for column in columns))
    # Rich assumes 80 columns when the output is not a terminal; a pipe or file gets every
    # row on one line instead.
    width = None if out.isatty() else PIPE_WIDTH
    Console(file=out, soft_wrap=True, width=width).print(table)


def note_more_rows(shown: int, fix: str, stream: TextIO | None = None) -> None:
    """Write to stderr that a listing stopped at ``shown`` rows while more may exist.

    The note goes to stderr, so CSV and JSON on stdout stay whole for scripts.
    """
    out = stream if stream is not None else sys.stderr
    out.write(f"note: more rows may exist than the {shown} shown; {fix}\n")


def _plain_text(value: str) -> Text:
    """Wrap ``value`` for rich without markup, with control characters escaped as ``\\x1b``."""
    return Text(CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], value))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        # As JSON writes them, instead of Python's True and False.
        return "true" if value else "false"
    if isinstance(value, Decimal) and value.is_finite():
        return format_decimal(value)
    return str(value)


def _table_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal) and value.is_finite():
        return table_amount(value)
    if isinstance(value, ReadableCell):
        return value.readable
    return _cell(value)


def json_record(record: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """Convert one record of :func:`print_records` to the object ``--format json`` writes.

    Each column becomes the key that :func:`json_key` makes of it.
    """
    return {json_key(column): _json_value(record.get(column)) for column in columns}


def json_key(column: str) -> str:
    """Return the snake_case key of a column in ``--format json``, e.g. ``pf_days`` for
    ``PF-days`` and ``lost_s`` for ``lost (s)``.

    Letters are lowercased, and each run of characters other than ASCII letters and digits
    becomes one underscore, with none at either end.
    """
    return "_".join(JSON_KEY_WORD.findall(column.lower()))


def _json_value(value: Any) -> Any:
    """Return ``value`` as :func:`json.dumps` should write it in ``--format json``."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return _cell(value)


def table_amount(value: Decimal, places: int = TABLE_DECIMAL_PLACES) -> str:
    """Round an exact amount to ``places`` decimal places for a table, e.g. ``0.000123``.

    Rounds half to even. A nonzero amount that would round to 0 is shown as ``<0.000001``
    (``>-0.000001`` below zero), so that a table never shows a charge as nothing.
    """
    step = Decimal(1).scaleb(-places)
    # Wide enough for every digit left of the point, so that quantize never raises.
    context = Context(prec=max(value.adjusted(), 0) + places + 2)
    rounded = value.quantize(step, rounding=ROUND_HALF_EVEN, context=context)
    if rounded.is_zero() and not value.is_zero():
        smallest = format_decimal(step)
        return f"<{smallest}" if value > 0 else f">-{smallest}"
    return format_decimal(rounded)


def decimal_text(message: common_pb2.Decimal) -> str:
    """Format a protobuf Decimal as :func:`acsp.decimals.format_decimal` does, e.g. 1E-8.

    A service of an older release may send ``str(Decimal)``, which writes small amounts and
    zeros such as 0E-12 with an exponent. Only the notation changes, never the value. Text
    that is not a finite decimal is returned as it came.
    """
    try:
        return format_decimal(from_proto(message))
    except ValueError:
        return message.value


def decimal_value(message: common_pb2.Decimal) -> Decimal | str:
    """Parse a protobuf Decimal for :func:`print_records`, which rounds it only in tables.

    Text that is not a finite decimal is returned as it came.
    """
    try:
        return from_proto(message)
    except ValueError:
        return message.value


def table_text(message: common_pb2.Decimal) -> str:
    """Format a protobuf Decimal for a table's title, rounded as :func:`table_amount` does."""
    value = decimal_value(message)
    return table_amount(value) if isinstance(value, Decimal) else value


def unreachable_hint(data_dir: Path | None) -> str:
    """Return :data:`UNREACHABLE_HINT` with the commands and log folder of ``data_dir``.

    ``None`` means the default data directory, ``$ACSP_DATA_DIR`` or ``~/.acsp``.
    """
    logs = (data_dir.expanduser() if data_dir is not None else default_data_dir()) / "logs"
    status = "acsp status" if data_dir is None else f"acsp status --data-dir {data_dir}"
    return (
        f"hint: run {status} to see which service is not serving, then read that service's "
        f"log in {logs}, e.g. {logs / 'scheduler.log'}"
    )


def print_error(message: str, stream: TextIO | None = None) -> None:
    (stream if stream is not None else sys.stderr).write(f"error: {message}\n")


def describe_rpc_error(error: grpc.RpcError) -> str:
    """Return ``CODE: message`` for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    for rpc_phrase, cli_phrase in CLI_PHRASES.items():
        details = details.replace(rpc_phrase, cli_phrase) if details else details
    message = f"{name}: {details or 'no details'}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # The service's message speaks of gRPC metadata; a CLI user sets a variable instead.
        message += f"\n{TOKEN_HINT}"
    if code == grpc.StatusCode.NOT_FOUND:
        hint = next((NOT_FOUND_HINTS[k] for k in missing_kinds(error) if k in NOT_FOUND_HINTS), "")
        if hint and hint not in message:
            message += f"; {hint}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        message += f"\n{UNREACHABLE_HINT}"
    return message


CLI_PHRASES: Final = {
    "that ListPledges returns": "that acsp fleet pledge list prints",
    "the id that SubmitJob returned for the array": "the array id that acsp jobs submit "
    "printed, or one that acsp jobs list shows",
    "(array_job_ids of SubmitJob)": "(acsp jobs list --array ARRAY_ID lists them)",
    "the outcome award_less": "--outcome award-less",
    "that award_less grants": "that --outcome award-less grants",
}
"""Phrases of service messages that name RPCs or protobuf values, and the command-line words
that replace them. The services keep their wording for gRPC clients."""

NOT_FOUND_HINTS: Final = {
    # No command lists projects, so the hint names the one that creates them.
    "project": "check the project id (ids are case-sensitive) and ask its PI to add you, "
    "because a project you are not a member of is not found either, or create the project "
    "with acsp grants project",
    "grant": "list the grants you may see with acsp grants list",
    "sub-allocation": "list a grant's sub-allocations with acsp grants suballocations GRANT_ID",
    "application": "list applications with acsp grants applications",
    "job": "list jobs with acsp jobs list (an id you may not read is not found either)",
    "node": "list nodes with acsp fleet nodes; a node id is PROVIDER/REGION/NODE",
    "institution": "register it with acsp grants institution (program office)",
}
"""The command to run next, by the kind of object that a NOT_FOUND call names."""


def missing_kinds(error: grpc.RpcError) -> list[str]:
    """Return the resource kinds that a NOT_FOUND call's ``google.rpc`` status details name."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    packed = dict(trailers or ()).get(STATUS_DETAILS_KEY)
    if not isinstance(packed, bytes):
        return []
    kinds = []
    for detail in status_pb2.Status.FromString(packed).details:
        info = error_details_pb2.ResourceInfo()
        if detail.Unpack(info):
            kinds.append(info.resource_type)
    return kinds


def exit_code_for_rpc_error(error: grpc.RpcError) -> int:
    code = error.code() if hasattr(error, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EXIT_NO_MESH
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_USAGE
    return EXIT_FAILURE


def rows_of(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Return ``[{"field": k, "value": v}, ...]`` for printing one object as a table."""
    return [{"field": key, "value": value} for key, value in pairs]


@contextmanager
def naming_options(options: Mapping[str, str]) -> Iterator[None]:
    """Add the command-line option behind each request field that a failed call names.

    Services name request fields (``pledge.model``); a CLI user sets options (``--model``).
    ``options`` maps field paths without list indexes or map keys to options, so
    ``spec.accelerators.models`` covers ``spec.accelerators.models[2]``. Each option is named
    once, after the first field that maps to it, which is a rejected one when the status
    details name one.
    """
    try:
        yield
    except grpc.RpcError as error:
        hints: dict[str, str] = {}
        for field in rejected_fields(error) + fields_in_text(error, options):
            option = options.get(field) or options.get(FIELD_INDEX.sub("", field))
            if option and option not in hints:
                hints[option] = f"{field} is set by {option}"
        if not hints:
            raise
        message = f"{describe_rpc_error(error)} ({'; '.join(hints.values())})"
        raise CommandError(message, exit_code_for_rpc_error(error)) from None


def fields_in_text(error: grpc.RpcError, options: Mapping[str, str]) -> list[str]:
    """Return the fields of ``options`` that a failed call's message names as whole words.

    A message may suggest other fields than the one it rejects (lower spec.task_count, or
    set spec.sub_allocation_id), and only the rejected one is in the status details.
    """
    details = error.details() if hasattr(error, "details") else None
    if not details:
        return []
    # A field counts when no word character or dotted path continues it on either side, so
    # spec.grant_id matches at the end of a sentence but not inside spec.grant_id_hint.
    return [
        field
        for field in options
        if re.search(rf"(?<![\w.]){re.escape(field)}(?!\w|\.\w)", details)
    ]


@contextmanager
def noting_end_date(text: str, option: str, field: str) -> Iterator[None]:
    """Explain a rejected end time that ``option`` set as a date alone.

    The service's message names the end that it received, the midnight after the date
    ``text`` (see :func:`parse_end_time`), which a user who typed that date does not
    recognise. Errors that do not name ``field``, or a ``text`` with a time of day, pass
    unchanged.
    """
    try:
        yield
    except grpc.RpcError as error:
        if not is_date_alone(text) or field not in rejected_fields(error):
            raise
        end = format_time(parse_end_time(text, option))
        message = (
            f"{describe_rpc_error(error)} ({field} is set by {option})\n"
            f"note: {option} {text} is a date alone, so the window ends at {end}, "
            "when that day ends"
        )
        raise CommandError(message, exit_code_for_rpc_error(error)) from None


def rejected_fields(error: grpc.RpcError) -> list[str]:
    """Return the request fields that a failed call's ``google.rpc`` status details name."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    packed = dict(trailers or ()).get(STATUS_DETAILS_KEY)
    if not isinstance(packed, bytes):
        return []
    status = status_pb2.Status.FromString(packed)
    fields: list[str] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        precondition = error_details_pb2.PreconditionFailure()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
        elif detail.Unpack(precondition):
            fields += [v.subject for v in precondition.violations]
    return list(dict.fromkeys(fields))
