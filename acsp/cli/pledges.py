"""``acsp fleet pledge`` and ``acsp fleet recall``: a provider's pledged capacity and recalls."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any, Final

from google.protobuf import timestamp_pb2

from acsp.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    TIME_EXAMPLE,
    CommandError,
    end_time_cell,
    format_time,
    naming_options,
    parse_end_time,
    parse_time,
    parse_window,
    positive_seconds,
    print_records,
    whole_number,
)
from acsp.cli.jobs import open_scheduler
from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.service.pledges import MAX_PLEDGE_ACCELERATORS

PLEDGE_COLUMNS: Final = (
    "pledge",
    "provider",
    "region",
    "model",
    "protected",
    "recallable",
    "registered",
    "start",
    "end",
)
RECALL_COLUMNS: Final = ("recall", "pledge", "count", "effective", "end", "reason")
"""Columns of a recall; the reply to ``acsp fleet recall create`` adds ``freed``, and
``acsp fleet recall list`` adds ``state``."""
TIME_HELP: Final = f"ISO 8601, UTC unless it has an offset ({TIME_EXAMPLE})"
END_HELP: Final = f"{TIME_HELP}; a date alone includes that whole day"
PLEDGE_OPTIONS: Final = {
    "pledge.pledge_id": "--pledge-id",
    "pledge.provider_id": "--provider",
    "pledge.region_id": "--region",
    "pledge.model": "--model",
    "pledge.window": "--start and --end",
    "pledge.window.start_time": "--start",
    "pledge.window.end_time": "--end",
    "pledge.protected_count": "--protected",
    "pledge.recallable_count": "--recallable",
    "pledge": "--protected and --recallable",
}
"""The option of ``acsp fleet pledge set`` that sets each field SetPledge may reject."""
RECALL_OPTIONS: Final = {
    "recall.pledge_id": "the PLEDGE argument",
    "recall.count": "--count",
    "recall.effective_time": "--notice or --effective",
    "recall.end_time": "--end or --duration",
    "notice": "--notice",
    "duration": "--duration",
}
"""The option of ``acsp fleet recall create`` that sets each field RecallCapacity may reject."""
MAX_TIMESTAMP_S: Final = 253_402_300_799
"""9999-12-31T23:59:59Z in Unix seconds, the last time a protobuf Timestamp can carry."""


def register(commands: Any, connection: argparse.ArgumentParser, output: Any) -> None:
    """Add the ``pledge`` and ``recall`` command groups under ``acsp fleet``."""
    pledge = commands.add_parser("pledge", help="set, change and list capacity pledges")
    pledge_commands = pledge.add_subparsers(
        title="pledge commands", metavar="COMMAND", required=True
    )
    set_pledge = pledge_commands.add_parser(
        "set",
        parents=[connection, output],
        help="create a pledge, or change one named by --pledge-id",
    )
    set_pledge.add_argument("--provider", required=True, help="provider that pledges")
    set_pledge.add_argument(
        "--region",
        required=True,
        help="registered region of the provider, e.g. region-1 (provider/region-1 also works)",
    )
    set_pledge.add_argument("--model", required=True, help="accelerator model of the catalog")
    set_pledge.add_argument(
        "--protected",
        type=whole_number(0, MAX_PLEDGE_ACCELERATORS),
        default=0,
        help=(
            "accelerators that cannot be recalled in the window, "
            f"0 to {MAX_PLEDGE_ACCELERATORS} (default: 0)"
        ),
    )
    set_pledge.add_argument(
        "--recallable",
        type=whole_number(0, MAX_PLEDGE_ACCELERATORS),
        default=0,
        help=(
            "accelerators the provider may recall with notice, "
            f"0 to {MAX_PLEDGE_ACCELERATORS} (default: 0)"
        ),
    )
    set_pledge.add_argument("--start", required=True, help=f"start of the window: {TIME_HELP}")
    set_pledge.add_argument("--end", required=True, help=f"end of the window: {END_HELP}")
    set_pledge.add_argument(
        "--pledge-id", default="", help="pledge to change (default: create a new pledge)"
    )
    set_pledge.add_argument(
        "--request-id", default="", help="idempotency key (default: a random one)"
    )
    set_pledge.set_defaults(func=set_pledge_command)

    list_pledges = pledge_commands.add_parser(
        "list", parents=[connection, output], help="list pledges"
    )
    list_pledges.add_argument("--provider", default="", help="only this provider's pledges")
    list_pledges.set_defaults(func=list_pledges_command)

    recall = commands.add_parser("recall", help="recall recallable capacity and list recalls")
    recall_commands = recall.add_subparsers(
        title="recall commands", metavar="COMMAND", required=True
    )
    create = recall_commands.add_parser(
        "create",
        parents=[connection, output],
        help="take recallable accelerators of a pledge back after a notice period",
    )
    create.add_argument("pledge", help="pledge to recall from (see `acsp fleet pledge list`)")
    create.add_argument(
        "--count", type=whole_number(1), required=True, help="accelerators to recall"
    )
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--notice",
        type=positive_seconds,
        metavar="SECONDS",
        help="notice period: the capacity must be free this many seconds from now",
    )
    when.add_argument("--effective", help=f"when the capacity must be free: {TIME_HELP}")
    until = create.add_mutually_exclusive_group()
    until.add_argument(
        "--end",
        help=f"when the capacity returns, at the latest when the pledge ends: {END_HELP}",
    )
    until.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="SECONDS",
        help="how long the recall lasts after it takes effect (default: until the pledge ends)",
    )
    create.add_argument("--reason", default="", help="why, e.g. 'commercial peak'")
    create.add_argument("--request-id", default="", help="idempotency key (default: a random one)")
    create.set_defaults(func=create_recall_command)

    list_recalls = recall_commands.add_parser(
        "list",
        parents=[connection, output],
        help="list recalls",
        description="list recalls, each with its state: scheduled before its effective time, "
        "active until its end time, then ended. The scheduler does not store how many "
        "accelerators a recall freed, so only acsp fleet recall create prints that",
    )
    list_recalls.add_argument("--provider", default="", help="only this provider's recalls")
    list_recalls.set_defaults(func=list_recalls_command)


def pledge_from_args(args: argparse.Namespace) -> scheduler_pb2.Pledge:
    """Build the pledge of ``acsp fleet pledge set``; raise CommandError naming the option."""
    if args.protected + args.recallable == 0:
        raise CommandError(
            "--protected and --recallable are both 0; pledge at least one accelerator",
            EXIT_USAGE,
        )
    start, end = parse_window(args.start, args.end)
    return scheduler_pb2.Pledge(
        pledge_id=args.pledge_id,
        provider_id=args.provider,
        region_id=args.region,
        model=args.model,
        window=common_pb2.TimeWindow(start_time=start, end_time=end),
        protected_count=args.protected,
        recallable_count=args.recallable,
    )


def recall_request_from_args(
    args: argparse.Namespace, now: float
) -> scheduler_pb2.RecallCapacityRequest:
    """Build the RecallCapacity request of ``acsp fleet recall create``.

    ``--notice`` and ``--duration`` travel as durations that the scheduler resolves once, when
    it first accepts the request. So a retry with the same ``--request-id`` sends the same
    values and gets the stored recall back.
    """
    args.request_id = args.request_id or uuid.uuid4().hex
    request = scheduler_pb2.RecallCapacityRequest(
        request_id=args.request_id, recall=recall_from_args(args, now)
    )
    if args.notice is not None:
        request.notice.FromNanoseconds(round(args.notice * 1e9))
    if args.duration is not None:
        request.duration.FromNanoseconds(round(args.duration * 1e9))
    return request


def recall_from_args(args: argparse.Namespace, now: float) -> scheduler_pb2.Recall:
    """Build the recall of ``acsp fleet recall create`` with the times given as times.

    The times that ``--notice`` and ``--duration`` lead to are counted from ``now`` (Unix
    seconds) only to check them here; the recall does not carry them.
    """
    recall = scheduler_pb2.Recall(pledge_id=args.pledge, count=args.count, reason=args.reason)
    if args.effective is not None:
        effective = parse_time(args.effective, "--effective")
        recall.effective_time.CopyFrom(effective)
    else:
        effective = seconds_later(now, args.notice, "--notice")
    if args.end is not None:
        end = parse_end_time(args.end, "--end")
        if end.ToNanoseconds() <= effective.ToNanoseconds():
            raise CommandError(
                f"--end {args.end} is not after the time the recall takes effect "
                f"({format_time(effective)}); end the recall later",
                EXIT_USAGE,
            )
        recall.end_time.CopyFrom(end)
    elif args.duration is not None:
        seconds_later(effective.ToNanoseconds() / 1e9, args.duration, "--duration")
    return recall


def seconds_later(start: float, seconds: float, option: str) -> timestamp_pb2.Timestamp:
    """Return ``seconds`` after ``start`` (Unix seconds); raise CommandError naming ``option``
    past the last time a protobuf Timestamp can carry."""
    if start + seconds > MAX_TIMESTAMP_S:
        raise CommandError(
            f"{option} {seconds:g} ends after 9999-12-31T23:59:59Z; give fewer seconds",
            EXIT_USAGE,
        )
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((start + seconds) * 1e9))
    return stamp


def set_pledge_command(args: argparse.Namespace) -> int:
    pledge = pledge_from_args(args)
    with open_scheduler(args) as scheduler, naming_options(PLEDGE_OPTIONS):
        stored = scheduler.SetPledge(
            scheduler_pb2.SetPledgeRequest(
                request_id=args.request_id or uuid.uuid4().hex, pledge=pledge
            )
        )
    print_records([pledge_row(stored)], PLEDGE_COLUMNS, output_format=args.format)
    warn_above_registered([stored])
    return EXIT_OK


def list_pledges_command(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        response = scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id=args.provider)
        )
    rows = [pledge_row(p) for p in response.pledges]
    print_records(rows, PLEDGE_COLUMNS, output_format=args.format, title="pledges")
    # A standby scheduler does not count the fleet, and its listing has 0 registered.
    if response.fleet_counted:
        warn_above_registered(response.pledges)
    return EXIT_OK


def create_recall_command(args: argparse.Namespace) -> int:
    request = recall_request_from_args(args, time.time())
    with open_scheduler(args) as scheduler, naming_options(RECALL_OPTIONS):
        stored = scheduler.RecallCapacity(request)
    row = recall_row(stored)
    # A new recall that frees nothing is rejected, so 0 marks the reply to a repeated request,
    # for which the scheduler returns the stored recall without its freed count.
    repeated = stored.freed_count == 0
    row["freed"] = None if repeated else stored.freed_count
    print_records([row], (*RECALL_COLUMNS, "freed"), output_format=args.format)
    if repeated:
        print(
            f"note: request id {args.request_id} repeats the request that created recall "
            f"{stored.recall_id}, so nothing changed; the scheduler does not store how many "
            "accelerators that request freed",
            file=sys.stderr,
        )
    if 0 < stored.freed_count < stored.count:
        print(
            f"warning: recall {stored.recall_id} frees {stored.freed_count} of the "
            f"{stored.count} accelerators it recalls, because the region has fewer registered "
            "accelerators than the pledge, and recalls never take its protected ones",
            file=sys.stderr,
        )
    return EXIT_OK


def list_recalls_command(args: argparse.Namespace) -> int:
    with open_scheduler(args) as scheduler:
        response = scheduler.ListRecalls(
            scheduler_pb2.ListRecallsRequest(provider_id=args.provider)
        )
        pledges = scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id=args.provider)
        ).pledges
    pledge_ends = {p.pledge_id: _seconds(p.window.end_time) for p in pledges}
    now = time.time()
    rows = []
    for recall in response.recalls:
        row = recall_row(recall)
        row["state"] = recall_state(recall, now, pledge_ends.get(recall.pledge_id))
        rows.append(row)
    print_records(rows, (*RECALL_COLUMNS, "state"), output_format=args.format, title="recalls")
    return EXIT_OK


def recall_state(recall: scheduler_pb2.Recall, now: float, pledge_end: float | None) -> str:
    """Return scheduled, active or ended: where Unix time ``now`` falls in the recall's window.

    A recall is active from its effective time up to the earlier of its end time and
    ``pledge_end``, the end of its pledge's window (None when unknown). Both ends are exclusive.
    The pledge's end counts because the scheduler stops counting a recall when its pledge
    ends, even a recall stored without an end or with a later one.
    """
    if now < _seconds(recall.effective_time):
        return "scheduled"
    ends = [pledge_end] if pledge_end is not None else []
    if recall.HasField("end_time"):
        ends.append(_seconds(recall.end_time))
    if ends and now >= min(ends):
        return "ended"
    return "active"


def _seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def warn_above_registered(pledges: Iterable[scheduler_pb2.Pledge]) -> None:
    """Print a warning on stderr for each pledge above its region's registered accelerators.

    Such a pledge is accepted because it may precede its hardware, but jobs can use only the
    registered accelerators.
    """
    for pledge in pledges:
        pledged = pledge.protected_count + pledge.recallable_count
        if pledge.registered_count >= pledged:
            continue
        where = f"{pledge.provider_id}/{pledge.region_id} {pledge.model}"
        print(
            f"warning: pledge {pledge.pledge_id} ({where}): pledged {pledged}, registered "
            f"{pledge.registered_count}; jobs can use only the registered accelerators until "
            "more nodes join",
            file=sys.stderr,
        )


def pledge_row(pledge: scheduler_pb2.Pledge) -> dict[str, Any]:
    return {
        "pledge": pledge.pledge_id,
        "provider": pledge.provider_id,
        "region": pledge.region_id,
        "model": pledge.model,
        "protected": pledge.protected_count,
        "recallable": pledge.recallable_count,
        "registered": pledge.registered_count,
        "start": format_time(pledge.window.start_time),
        "end": end_time_cell(pledge.window.end_time),
    }


def recall_row(recall: scheduler_pb2.Recall) -> dict[str, Any]:
    return {
        "recall": recall.recall_id,
        "pledge": recall.pledge_id,
        "count": recall.count,
        "effective": format_time(recall.effective_time),
        "end": end_time_cell(recall.end_time) if recall.HasField("end_time") else "",
        "reason": recall.reason,
    }
