"""``acsp usage`` and ``acsp settlement``: metered usage, charges, refunds, efficiency, rates and
provider settlements. Every listing prints as a table, CSV or JSON lines (``--format``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc

from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    connection_options,
    decimal_text,
    decimal_value,
    describe_rpc_error,
    format_time,
    is_date_alone,
    note_more_rows,
    output_options,
    parse_time,
    print_records,
    rows_of,
    table_text,
    whole_number,
)
from acsp.cli.usage_arrays import job_records
from acsp.v1 import common_pb2, grant_pb2, metering_pb2, metering_pb2_grpc

GROUPINGS = {
    "grant": metering_pb2.USAGE_GROUPING_GRANT,
    "project": metering_pb2.USAGE_GROUPING_PROJECT,
    "institution": metering_pb2.USAGE_GROUPING_INSTITUTION,
    "provider": metering_pb2.USAGE_GROUPING_PROVIDER,
    "region": metering_pb2.USAGE_GROUPING_REGION,
    "model": metering_pb2.USAGE_GROUPING_MODEL,
}
UNATTRIBUTED = "(unattributed)"
"""Institution key metering lists for usage stored with no institution."""
MAX_PAGE_SIZE = 1000
"""Maximum rows of one metering list call; the service rejects larger pages."""
MAX_PAGES = 10_000
"""Upper bound on pages fetched by --all, so a server bug cannot loop forever."""

# Metering charges a period's usage once the period has ended and the lateness has passed
# (ACSP_METERING_PERIOD_S, ACSP_METERING_LATENESS_S), so for a recent range the two commands
# differ by the usage that is not charged yet. Both notes go to stderr, like note_more_rows.
USAGE_HOURS_NOTE = (
    "note: accelerator hours count all metered usage whose charging period starts in the "
    "range, charged or not yet charged; acsp settlement counts charged usage only, so it "
    "shows less until metering charges the latest periods\n"
)
SETTLEMENT_HOURS_NOTE = (
    "note: accelerator hours and PF-days count charged usage only, by the start of its "
    "charging period; usage that is not charged yet (a period that has not ended, or an "
    "attempt that ended less than the lateness ago) is added when it is charged, and acsp "
    "usage query counts it already\n"
)


@contextmanager
def open_metering(args: argparse.Namespace) -> Iterator[metering_pb2_grpc.MeteringServiceStub]:
    """Yield the metering service stub of the running mesh."""
    from acsp.client import Client

    with Client.from_mesh(
        args.data_dir, token=args.token, timeout_s=args.timeout, wait_for_ready=False
    ) as client:
        yield client.metering


def _window(args: argparse.Namespace) -> common_pb2.TimeWindow:
    """Return the range of --from and --to; raise CommandError unless it ends after it starts."""
    start = parse_time(args.start, "--from")
    end = parse_time(args.end, "--to")
    if end.ToNanoseconds() <= start.ToNanoseconds():
        message = f"--to {args.end} is not after --from {args.start}; end the range later"
        end_date = end.ToDatetime(tzinfo=UTC).date()
        if is_date_alone(args.end) and end_date < date.max:
            next_day = (end_date + timedelta(days=1)).isoformat()
            message += (
                f". --to is exclusive and a date alone is that day's start, so --to "
                f"{next_day} includes {args.end}"
            )
        raise CommandError(message, EXIT_USAGE)
    return common_pb2.TimeWindow(start_time=start, end_time=end)


def _pages(
    fetch: Callable[[common_pb2.PageRequest], Any], args: argparse.Namespace
) -> Iterator[Any]:
    """Yield responses page by page: one page, or every page with --all.

    Without --all, a note on stderr warns when the page was full, so more rows may
    exist.
    """
    token = ""
    for _ in range(MAX_PAGES):
        response = fetch(common_pb2.PageRequest(page_size=args.page_size, page_token=token))
        yield response
        token = response.page.next_page_token
        if not token:
            return
        if not args.all:
            note_more_rows(args.page_size, "pass --all to fetch every page")
            return


@contextmanager
def _filter_required(
    filtered: bool, listing: str, options: str, others: Sequence[str] = ()
) -> Iterator[None]:
    """Name the CLI options that filter a listing when the service denies an unfiltered one.

    The service's message names its request fields, which a CLI user does not set directly.
    ``others`` are the filters given that only the program office may use alone: with one of
    them the denial is a permission error (exit 1), without any a usage error (exit 2).
    """
    try:
        yield
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        if filtered or code != grpc.StatusCode.PERMISSION_DENIED:
            raise
        if others:
            raise CommandError(
                f"permission denied: only the program office may list {listing} filtered by "
                f"{' and '.join(others)} alone; a PI or project member may filter by "
                f"{options}, so add one of those",
                EXIT_FAILURE,
            ) from error
        raise CommandError(
            f"a filter is required to list {listing}: pass {options}, because only the program "
            f"office may list the {listing} of every project",
            EXIT_USAGE,
        ) from error


def run_query(args: argparse.Namespace) -> int:
    records = []
    options = "--project PROJECT or --grant GRANT of a project you are a member of"
    window = _window(args)
    others = [
        f"--{name} {value}"
        for name, value in (("institution", args.institution), ("provider", args.provider))
        if value
    ]
    with (
        _filter_required(bool(args.project or args.grant), "usage", options, others),
        open_metering(args) as metering,
    ):

        def fetch(page: common_pb2.PageRequest) -> metering_pb2.QueryUsageResponse:
            return metering.QueryUsage(
                metering_pb2.QueryUsageRequest(
                    grouping=GROUPINGS[args.by],
                    range=window,
                    grant_id=args.grant or "",
                    project_id=args.project or "",
                    institution_id=args.institution or "",
                    provider_id=args.provider or "",
                    page=page,
                )
            )

        for response in _pages(fetch, args):
            for row in response.rows:
                records.append(
                    {
                        args.by: row.key,
                        "accelerator hours": decimal_value(row.accelerator_hours),
                        "charged PF-days": decimal_value(row.charged_pf_days),
                        "refunded PF-days": decimal_value(row.refunded_pf_days),
                        "mean utilization": f"{row.mean_utilization:.3f}",
                        "samples": row.sample_count,
                    }
                )
    if not records and args.institution:
        _check_institution(args)
    columns = [args.by, "accelerator hours", "charged PF-days", "refunded PF-days"]
    columns += ["mean utilization", "samples"]
    print_records(records, columns, output_format=args.format, title=f"usage by {args.by}")
    if records:
        sys.stderr.write(USAGE_HOURS_NOTE)
    return EXIT_OK


def _check_institution(args: argparse.Namespace) -> None:
    """Raise CommandError when --institution names no institution of the grant service.

    Metering stores an institution only on the jobs that ran, so an empty listing cannot tell
    an unknown institution from one without usage. The grant service registers every
    institution, and it is asked only after an empty listing, so a query with rows costs no
    extra call.
    """
    from acsp.cli.grants import open_grants

    if args.institution == UNATTRIBUTED:
        return
    try:
        with open_grants(args) as grants:
            grants.GetInstitution(grant_pb2.GetInstitutionRequest(institution_id=args.institution))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        raise CommandError(
            f"--institution {args.institution}: institution not found; pass the id that "
            "registered it with acsp grants institution",
            EXIT_FAILURE,
        ) from error


def run_charges(args: argparse.Namespace) -> int:
    options = "--grant GRANT or --job JOB of a project you are a member of"
    with (
        _filter_required(bool(args.grant or args.job), "charges", options),
        open_metering(args) as metering,
    ):
        if args.job:
            charges = job_records(
                args, "charges", lambda job_id: _list_charges(metering, args, job_id)
            )
        else:
            charges = _list_charges(metering, args, "")
    records = [
        {
            "charge": charge.charge_id,
            "job": charge.job_id,
            "grant": charge.grant_id,
            "period start": format_time(charge.period_start_time),
            "accelerator seconds": decimal_value(charge.accelerator_seconds),
            "PF-days": decimal_value(charge.amount_pf_days),
            "rate card": charge.rate_card_version,
            "committed": charge.committed,
        }
        for charge in charges
    ]
    columns = ["charge", "job", "grant", "period start", "accelerator seconds", "PF-days"]
    columns += ["rate card", "committed"]
    print_records(records, columns, output_format=args.format, title="charges")
    return EXIT_OK


def _list_charges(
    metering: metering_pb2_grpc.MeteringServiceStub, args: argparse.Namespace, job_id: str
) -> list[metering_pb2.Charge]:
    """Return the charges of ``job_id`` (or of every job, when empty) and of ``--grant``."""

    def fetch(page: common_pb2.PageRequest) -> metering_pb2.ListChargesResponse:
        return metering.ListCharges(
            metering_pb2.ListChargesRequest(job_id=job_id, grant_id=args.grant or "", page=page)
        )

    return [charge for response in _pages(fetch, args) for charge in response.charges]


def refund_row(refund: metering_pb2.RefundRecord) -> dict[str, Any]:
    """Build the output row of one refund."""
    return {
        "refund": refund.refund_id,
        "job": refund.job_id,
        "provider": refund.provider_id,
        "PF-days": decimal_value(refund.amount_pf_days),
        # Metering measures the lost time to the microsecond, and whole seconds would hide up
        # to half a second of it.
        "lost (s)": f"{refund.lost_seconds:.6f}".rstrip("0").rstrip("."),
        "reason": refund.reason,
        "time": format_time(refund.create_time),
        "committed": refund.committed,
    }


def run_refunds(args: argparse.Namespace) -> int:
    records: list[dict[str, Any]] = []
    options = (
        "--job JOB of a project you are a member of, or --provider PROVIDER as that "
        "provider's operator"
    )
    with (
        _filter_required(bool(args.job or args.provider), "refunds", options),
        open_metering(args) as metering,
    ):
        if args.job:
            refunds = job_records(
                args, "refunds", lambda job_id: _list_refunds(metering, args, job_id)
            )
        else:
            refunds = _list_refunds(metering, args, "")
        records.extend(refund_row(refund) for refund in refunds)
    columns = [
        "refund",
        "job",
        "provider",
        "PF-days",
        "lost (s)",
        "reason",
        "time",
        "committed",
    ]
    print_records(records, columns, output_format=args.format, title="refunds")
    return EXIT_OK


def _list_refunds(
    metering: metering_pb2_grpc.MeteringServiceStub, args: argparse.Namespace, job_id: str
) -> list[metering_pb2.RefundRecord]:
    """Return the refunds of ``job_id`` (or of every job, when empty) and of ``--provider``."""

    def fetch(page: common_pb2.PageRequest) -> metering_pb2.ListRefundsResponse:
        return metering.ListRefunds(
            metering_pb2.ListRefundsRequest(
                provider_id=args.provider or "", job_id=job_id, page=page
            )
        )

    return [refund for response in _pages(fetch, args) for refund in response.refunds]


def run_efficiency(args: argparse.Namespace) -> int:
    records = []
    options = "--project PROJECT of a project you are a member of"
    with (
        _filter_required(bool(args.project), "efficiency", options),
        open_metering(args) as metering,
    ):

        def fetch(page: common_pb2.PageRequest) -> metering_pb2.ListJobEfficiencyResponse:
            return metering.ListJobEfficiency(
                metering_pb2.ListJobEfficiencyRequest(
                    project_id=args.project or "", flagged_only=args.flagged, page=page
                )
            )

        for response in _pages(fetch, args):
            for job in response.jobs:
                records.append(
                    {
                        "job": job.job_id,
                        "project": job.project_id,
                        "mean": f"{job.mean_utilization:.3f}",
                        "median": f"{job.median_utilization:.3f}",
                        "longest idle (s)": f"{job.low_utilization_seconds:.0f}",
                        "waste": job.flagged_waste,
                        "accelerator hours": decimal_value(job.accelerator_hours),
                    }
                )
    columns = ["job", "project", "mean", "median", "longest idle (s)", "waste", "accelerator hours"]
    print_records(records, columns, output_format=args.format, title="job efficiency")
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    window = _window(args)
    with open_metering(args) as metering:
        response = metering.GetModelReport(metering_pb2.GetModelReportRequest(range=window))
    records = [
        {
            "model": report.model,
            "accelerator hours": decimal_value(report.accelerator_hours),
            "fatal events": report.fatal_events,
            "per 1000 hours": f"{report.failures_per_thousand_hours:.3f}",
            "mean utilization": f"{report.mean_utilization:.3f}",
        }
        for report in response.models
    ]
    columns = ["model", "accelerator hours", "fatal events", "per 1000 hours", "mean utilization"]
    print_records(records, columns, output_format=args.format, title="accelerator models")
    return EXIT_OK


def run_rates(args: argparse.Namespace) -> int:
    with open_metering(args) as metering:
        try:
            card = metering.GetRateCard(metering_pb2.GetRateCardRequest(version=args.version))
        except grpc.RpcError as error:
            if args.version == 0 or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # One more call, on this error path only, to name the version that does exist.
            current = metering.GetRateCard(metering_pb2.GetRateCardRequest(version=0))
            raise CommandError(
                f"{describe_rpc_error(error)}; the current version is {current.version}, and "
                "versions count up from 1. Pass one of them, or leave out --version for the "
                "current card"
            ) from None
    records = [
        {
            "model": rate.model.name,
            "vendor": common_pb2.Vendor.Name(rate.model.vendor).removeprefix("VENDOR_").lower(),
            "memory (GiB)": rate.model.memory_gib,
            "peak TFLOP/s": decimal_value(rate.model.peak_dense_tflops),
            "PF-days per hour": decimal_value(rate.pf_days_per_accelerator_hour),
            "effective time": format_time(card.effective_time),
            "source": rate.model.source,
        }
        for rate in card.rates
    ]
    columns = ["model", "vendor", "memory (GiB)", "peak TFLOP/s", "PF-days per hour"]
    columns += ["effective time", "source"]
    title = f"rate card version {card.version}"
    print_records(records, columns, output_format=args.format, title=title)
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    with open_metering(args) as metering:
        status = metering.GetIngestStatus(metering_pb2.GetIngestStatusRequest())
    rows = rows_of(
        [
            ("samples ingested", status.samples_ingested),
            ("duplicates ignored (this replica)", status.duplicates_ignored),
            ("dead letters", status.dead_lettered),
            ("dead events", status.dead_events),
            ("messages pending", status.pending_messages),
            ("uncommitted charges", status.uncommitted_charges),
            ("accelerator-seconds", decimal_value(status.accelerator_seconds)),
            ("charged PF-days", decimal_value(status.charged_pf_days)),
            ("priced usage PF-days", decimal_value(status.priced_usage_pf_days)),
        ]
    )
    print_records(rows, ["field", "value"], output_format=args.format, title="ingest")
    return EXIT_OK


def settlement_provider(args: argparse.Namespace) -> str:
    """Return the provider of ``acsp settlement show`` or ``export``: ``--provider``, or the
    deprecated positional argument. Raise CommandError unless exactly one provider is named."""
    option, positional = args.provider_option, args.provider
    if option and positional and option != positional:
        raise CommandError(
            f"the PROVIDER argument names provider {positional}, but --provider names "
            f"{option}; give the provider once, with --provider",
            EXIT_USAGE,
        )
    provider: str | None = option or positional
    if not provider:
        raise CommandError(
            "--provider is required; name the provider whose settlement to build", EXIT_USAGE
        )
    return provider


def run_settlement_show(args: argparse.Namespace) -> int:
    provider = settlement_provider(args)
    window = _window(args)
    with open_metering(args) as metering:
        settlement = metering.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id=provider, period=window)
        )
    records = [
        {
            "region": line.region_id,
            "model": line.model,
            "accelerator hours": decimal_value(line.accelerator_hours),
            "PF-days": decimal_value(line.pf_days),
            "refunded PF-days": _line_amount(line, "refunded_pf_days"),
            "net PF-days": _line_amount(line, "net_pf_days"),
            "pledged hours": decimal_value(line.pledged_accelerator_hours),
            "recalled hours": decimal_value(line.recalled_accelerator_hours),
        }
        for line in settlement.lines
    ]
    columns = ["region", "model", "accelerator hours", "PF-days", "refunded PF-days"]
    columns += ["net PF-days", "pledged hours", "recalled hours"]
    delivered = table_text(settlement.delivered_pf_days)
    refunded = table_text(settlement.refunded_pf_days)
    title = (
        f"{settlement.provider_id}: delivered {delivered} PF-days, "
        f"refunded {refunded}, net {table_text(settlement.net_pf_days)}, "
        f"pledge {'kept' if settlement.pledge_kept else 'broken'}, "
        f"{settlement.recall_count} recall{'' if settlement.recall_count == 1 else 's'}"
    )
    if args.format == "json":
        _print_settlement_json(settlement)
    else:
        print_records(records, columns, output_format=args.format, title=title)
    if records:
        sys.stderr.write(SETTLEMENT_HOURS_NOTE)
    if settlement.short_pledge_ids:
        sys.stderr.write(
            "note: fewer healthy accelerators than protected in pledges "
            f"{', '.join(settlement.short_pledge_ids)}\n"
        )
    if settlement.uncounted_pledge_ids:
        sys.stderr.write(
            "note: metering never counted the accelerators of pledges "
            f"{', '.join(settlement.uncounted_pledge_ids)} in the period, so 'kept' does not "
            "cover them\n"
        )
    stale = _stale_pledges_note(settlement, datetime.now(UTC))
    if stale:
        sys.stderr.write(stale)
    return EXIT_OK


STALE_PLEDGES_AFTER = timedelta(seconds=30)
"""Age of metering's copy of the pledges past which ``acsp settlement show`` prints its time.
Metering copies them for each settlement, so an older copy means it could not read the
scheduler."""


def _stale_pledges_note(settlement: metering_pb2.Settlement, now: datetime) -> str:
    """Return a note naming the time of the settlement's pledges if they are old, or ''."""
    if not settlement.HasField("pledges_copy_time"):
        return ""
    copied = settlement.pledges_copy_time.ToDatetime(tzinfo=UTC)
    if now - copied <= STALE_PLEDGES_AFTER:
        return ""
    return (
        f"note: pledges as of {copied:%Y-%m-%d %H:%M:%S} UTC, because metering could not read "
        "newer ones from the scheduler; pledges and recalls made since then are missing\n"
    )


PLEDGE_COPY_SOURCES = {
    metering_pb2.PLEDGE_COPY_SOURCE_FRESH: "fresh",
    metering_pb2.PLEDGE_COPY_SOURCE_STORED: "stored",
}
"""The word for each source of the pledge copy in JSON output, as the settlement CSV writes it.
A server that does not report the source leaves it unset, which JSON output writes as null."""


def _line_amount(line: metering_pb2.SettlementLine, field: str) -> Decimal | str | None:
    """Return an amount of ``line`` as :func:`decimal_value` does, or None when it is unset,
    as metering versions that predate the field leave it."""
    if not line.HasField(field):
        return None
    return decimal_value(getattr(line, field))


def _line_text(line: metering_pb2.SettlementLine, field: str) -> str | None:
    """Return an amount of ``line`` as :func:`decimal_text` does, or None when it is unset."""
    return decimal_text(getattr(line, field)) if line.HasField(field) else None


def settlement_row(line: metering_pb2.SettlementLine) -> dict[str, Any]:
    """Describe one line of a settlement for JSON, keyed by the columns of ``acsp settlement
    export``, with amounts as exact decimal strings."""
    return {
        "region": line.region_id,
        "accelerator_model": line.model,
        "accelerator_hours": decimal_text(line.accelerator_hours),
        "pf_days": decimal_text(line.pf_days),
        "refunded_pf_days": _line_text(line, "refunded_pf_days"),
        "net_pf_days": _line_text(line, "net_pf_days"),
        "pledged_accelerator_hours": decimal_text(line.pledged_accelerator_hours),
        "recalled_accelerator_hours": decimal_text(line.recalled_accelerator_hours),
    }


def _print_settlement_json(settlement: metering_pb2.Settlement) -> None:
    """Write a settlement as one JSON object: the summary, and its lines under ``rows``.

    The keys are the columns of ``acsp settlement export``. A line's refunded and net PF-days
    are null when metering predates them.
    """
    document = {
        "provider": settlement.provider_id,
        "period_start": format_time(settlement.period.start_time),
        "period_end": format_time(settlement.period.end_time),
        "delivered_pf_days": decimal_text(settlement.delivered_pf_days),
        "refunded_pf_days": decimal_text(settlement.refunded_pf_days),
        "net_pf_days": decimal_text(settlement.net_pf_days),
        "pledge_kept": settlement.pledge_kept,
        "recall_count": settlement.recall_count,
        "short_pledge_ids": list(settlement.short_pledge_ids),
        "uncounted_pledge_ids": list(settlement.uncounted_pledge_ids),
        "pledges_copied_at": (
            settlement.pledges_copy_time.ToDatetime(tzinfo=UTC).isoformat()
            if settlement.HasField("pledges_copy_time")
            else None
        ),
        "pledges_copy_source": PLEDGE_COPY_SOURCES.get(settlement.pledges_copy_source),
        "rows": [settlement_row(line) for line in settlement.lines],
    }
    sys.stdout.write(json.dumps(document) + "\n")


def run_settlement_export(args: argparse.Namespace) -> int:
    provider = settlement_provider(args)
    window = _window(args)
    with open_metering(args) as metering:
        response = metering.ExportSettlement(
            metering_pb2.ExportSettlementRequest(provider_id=provider, period=window)
        )
    if args.output is None:
        sys.stdout.write(response.csv)
    else:
        try:
            args.output.write_text(response.csv, encoding="utf-8")
        except OSError as exc:
            raise CommandError(
                f"--output {str(args.output)!r}: cannot write the file ({exc.strerror}); "
                "give a path in an existing folder you can write to",
                EXIT_USAGE,
            ) from None
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``acsp usage ...`` and ``acsp settlement ...`` to the ``acsp`` parser."""
    common = [connection_options(), output_options()]
    usage = subparsers.add_parser("usage", help="metered usage, charges, refunds and efficiency")
    commands = usage.add_subparsers(title="usage commands", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        parser = commands.add_parser(name, parents=common, help=help, description=help)
        parser.set_defaults(func=func)
        return parser

    def window(parser: Any) -> None:
        parser.add_argument("--from", dest="start", required=True, help="start time, ISO 8601")
        parser.add_argument(
            "--to",
            dest="end",
            required=True,
            help="end time, ISO 8601, exclusive: a date alone is that day's start, so "
            "--from 2026-01-01 --to 2026-02-01 is all of January",
        )

    def paged(parser: Any) -> None:
        parser.add_argument(
            "--page-size",
            type=whole_number(1, MAX_PAGE_SIZE),
            default=100,
            help=f"rows per page, at most {MAX_PAGE_SIZE} (default: 100)",
        )
        parser.add_argument("--all", action="store_true", help="fetch every page")

    p = command("query", run_query, "usage grouped over a time range")
    p.add_argument(
        "--by", choices=sorted(GROUPINGS), default="grant", help="how to group (default: grant)"
    )
    window(p)
    for name in ("grant", "project", "institution", "provider"):
        p.add_argument(f"--{name}", help=f"only this {name}")
    paged(p)

    p = command("charges", run_charges, "charges committed against holds")
    p.add_argument("--job", help="only this job, or the elements of this job array")
    p.add_argument("--grant", help="only this grant")
    paged(p)

    p = command("refunds", run_refunds, "refunds of time lost to faults and recalls")
    p.add_argument("--provider", help="only this provider's refunds")
    p.add_argument("--job", help="only this job, or the elements of this job array")
    paged(p)

    p = command("efficiency", run_efficiency, "utilization per job and waste flags")
    p.add_argument("--project", help="only this project")
    p.add_argument("--flagged", action="store_true", help="only jobs flagged as waste")
    paged(p)

    p = command("models", run_models, "failure rate and utilization per accelerator model")
    window(p)

    p = command("rates", run_rates, "the rate card: PF-days per accelerator-hour by model")
    p.add_argument(
        "--version", type=whole_number(0), default=0, help="rate card version (default: current)"
    )

    command("status", run_status, "ingest counters and the exactness check")

    settlement = subparsers.add_parser("settlement", help="provider settlement statements")
    settle = settlement.add_subparsers(
        title="settlement commands", metavar="COMMAND", required=True
    )
    show_description = (
        "a provider's settlement for a period. A table shows the summary (delivered, refunded "
        "and net PF-days, whether the pledge was kept, recalls) in its title, and --format "
        "json writes one object with the summary and the lines under rows, keyed by the "
        "columns of acsp settlement export. --format csv writes the lines only, without the "
        "summary"
    )
    export_description = (
        "a provider's settlement as CSV: one row per region and model, then a TOTAL row. The "
        "last two columns, pledges_copied_at and pledges_copy_source (fresh or stored), name "
        "the copy of the provider's pledges that the settlement used"
    )
    for name, func, help, description in (
        ("show", run_settlement_show, "a provider's settlement for a period", show_description),
        ("export", run_settlement_export, "a provider's settlement as CSV", export_description),
    ):
        p = settle.add_parser(name, parents=common, help=help, description=description or help)
        p.set_defaults(func=func)
        p.add_argument(
            "--provider",
            dest="provider_option",
            metavar="PROVIDER",
            help="provider whose settlement to build",
        )
        # The positional form came first, and scripts may still use it.
        p.add_argument("provider", nargs="?", metavar="PROVIDER", help="deprecated: use --provider")
        window(p)
        if name == "export":
            p.add_argument(
                "-o", "--output", type=Path, help="write the CSV to this file (default: stdout)"
            )
