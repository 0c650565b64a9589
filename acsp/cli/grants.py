"""``acsp grants``: institutions, projects, applications, review, awards, balances, history."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import grpc

from acsp.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    connection_options,
    decimal_value,
    describe_rpc_error,
    end_time_cell,
    exit_code_for_rpc_error,
    format_time,
    naming_options,
    note_more_rows,
    noting_end_date,
    output_options,
    parse_end_time,
    parse_window,
    print_records,
    rows_of,
    whole_number,
)
from acsp.cli._grant_fields import FIELD_OPTIONS
from acsp.cli._grant_views import balance_rows, enum_name, print_application, print_grant
from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc

TIERS = {
    "exploratory": grant_pb2.GRANT_TIER_EXPLORATORY,
    "standard": grant_pb2.GRANT_TIER_STANDARD,
    "flagship": grant_pb2.GRANT_TIER_FLAGSHIP,
}
OUTCOMES = {
    "award": grant_pb2.DECISION_OUTCOME_AWARD,
    "award-less": grant_pb2.DECISION_OUTCOME_AWARD_LESS,
    "reject": grant_pb2.DECISION_OUTCOME_REJECT,
}
ROLES = {"member": grant_pb2.PROJECT_ROLE_MEMBER, "viewer": grant_pb2.PROJECT_ROLE_VIEWER}
MAX_PAGE_SIZE = 1000
"""Maximum rows of one grant service list call; the service rejects larger pages."""
MAX_ENTRY_ID = 2**63 - 1
"""Largest ledger entry id: the maximum of a PostgreSQL ``bigint``, the type of the ids."""
END_FIELD = "application.validity.end_time"
"""The field of SubmitApplication that ``acsp grants apply --end`` sets."""
KINDS = {
    name.removeprefix("LEDGER_ENTRY_KIND_").lower(): number
    for name, number in common_pb2.LedgerEntryKind.items()
    if number
}


@contextmanager
def open_grants(args: argparse.Namespace) -> Iterator[grant_pb2_grpc.GrantServiceStub]:
    """Yield the grant service stub of the running mesh."""
    from acsp.client import Client

    with Client.from_mesh(
        args.data_dir, token=args.token, timeout_s=args.timeout, wait_for_ready=False
    ) as client:
        yield client.grants


def _decimal(text: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=text)


def _note_limit(response: Any, shown: int, args: argparse.Namespace, narrow: str) -> None:
    """Write a note to stderr when a list stopped at ``--limit`` and the service has more rows."""
    if not response.page.next_page_token:
        return
    if args.limit < MAX_PAGE_SIZE:
        note_more_rows(shown, f"pass a --limit above {args.limit}, up to {MAX_PAGE_SIZE}")
    else:
        note_more_rows(shown, f"{MAX_PAGE_SIZE} is the largest --limit; {narrow}")


def _request_id(args: argparse.Namespace) -> str:
    return args.request_id or uuid.uuid4().hex


def _grant_record(grant: grant_pb2.Grant) -> dict[str, Any]:
    return {
        "grant": grant.grant_id,
        "project": grant.project_id,
        "tier": enum_name(grant_pb2.GrantTier, grant.tier, "GRANT_TIER_"),
        "state": enum_name(grant_pb2.GrantState, grant.state, "GRANT_STATE_"),
        "available": decimal_value(grant.balance.available_pf_days),
        "held": decimal_value(grant.balance.held_pf_days),
        "charged": decimal_value(grant.balance.charged_pf_days),
        # A grant is pending until its window starts, so the start explains that state.
        "starts": format_time(grant.validity.start_time),
        "ends": end_time_cell(grant.validity.end_time),
    }


def run_institution(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        institution = grants.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(
                request_id=_request_id(args),
                institution=grant_pb2.Institution(
                    institution_id=args.institution_id,
                    display_name=args.name,
                    country_code=args.country,
                ),
            )
        )
    print_records(
        rows_of([("institution", institution.institution_id), ("name", institution.display_name)]),
        ["field", "value"],
        output_format=args.format,
    )
    return EXIT_OK


def run_project(args: argparse.Namespace) -> int:
    members = []
    for text in args.member:
        subject, _, role = text.partition(":")
        if role and role not in ROLES:
            raise CommandError(f"--member {text!r}: role must be member or viewer", EXIT_USAGE)
        members.append(grant_pb2.ProjectMember(subject=subject, role=ROLES[role or "member"]))
    with open_grants(args) as grants:
        project = grants.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=_request_id(args),
                project=grant_pb2.Project(
                    project_id=args.project_id,
                    institution_id=args.institution,
                    display_name=args.name or args.project_id,
                    pi_subject=args.pi,
                    members=members,
                ),
            )
        )
    _print_project(project, args.format)
    return EXIT_OK


def _print_project(project: grant_pb2.Project, output_format: str) -> None:
    records = [
        {"member": m.subject, "role": enum_name(grant_pb2.ProjectRole, m.role, "PROJECT_ROLE_")}
        for m in project.members
    ]
    title = f"{project.project_id} ({project.institution_id})"
    print_records(records, ["member", "role"], output_format=output_format, title=title)


def run_member(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        if args.remove:
            project = grants.RemoveProjectMember(
                grant_pb2.RemoveProjectMemberRequest(
                    request_id=_request_id(args), project_id=args.project, subject=args.subject
                )
            )
        else:
            project = grants.AddProjectMember(
                grant_pb2.AddProjectMemberRequest(
                    request_id=_request_id(args),
                    project_id=args.project,
                    member=grant_pb2.ProjectMember(subject=args.subject, role=ROLES[args.role]),
                )
            )
    _print_project(project, args.format)
    return EXIT_OK


def run_apply(args: argparse.Namespace) -> int:
    application = grant_pb2.Application(
        project_id=args.project,
        tier=TIERS[args.tier],
        requested_pf_days=_decimal(args.pf_days),
        accelerator_models=args.model,
        regions=args.region,
        justification=args.justification,
    )
    start, end = parse_window(args.start, args.end)
    application.validity.start_time.CopyFrom(start)
    application.validity.end_time.CopyFrom(end)
    with open_grants(args) as grants, noting_end_date(args.end, "--end", END_FIELD):
        app = grants.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=_request_id(args), application=application
            )
        )
    print_application(app, args.format)
    return EXIT_OK


def run_assign(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        app = grants.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=_request_id(args),
                application_id=args.application,
                reviewer_subject=args.reviewer,
                reviewer_institution_id=args.institution,
            )
        )
    print_application(app, args.format)
    return EXIT_OK


def run_review(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        app = grants.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=_request_id(args),
                application_id=args.application,
                score=args.score,
                comments=args.comments,
            )
        )
    print_application(app, args.format)
    return EXIT_OK


def run_award(args: argparse.Namespace) -> int:
    decision = grant_pb2.Decision(outcome=OUTCOMES[args.outcome], reason=args.reason)
    if args.pf_days:
        decision.awarded_pf_days.CopyFrom(_decimal(args.pf_days))
    with open_grants(args) as grants:
        app = grants.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=_request_id(args),
                application_id=args.application,
                decision=decision,
                constraints=grant_pb2.GrantConstraints(
                    providers=args.provider, regions=args.region, accelerator_models=args.model
                ),
                rate_policy=(
                    grant_pb2.RATE_POLICY_FIXED_AT_AWARD
                    if args.fixed_rates
                    else grant_pb2.RATE_POLICY_CURRENT
                ),
            )
        )
    print_application(app, args.format)
    return EXIT_OK


def run_applications(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        if args.application:
            app = grants.GetApplication(
                grant_pb2.GetApplicationRequest(application_id=args.application)
            )
            print_application(app, args.format)
            return EXIT_OK
        response = grants.ListApplications(
            grant_pb2.ListApplicationsRequest(
                project_id=args.project or "",
                page=common_pb2.PageRequest(page_size=args.limit),
            )
        )
    records = [
        {
            "application": a.application_id,
            "project": a.project_id,
            "tier": enum_name(grant_pb2.GrantTier, a.tier, "GRANT_TIER_"),
            "requested": decimal_value(a.requested_pf_days),
            "state": enum_name(grant_pb2.ApplicationState, a.state, "APPLICATION_STATE_"),
            "grant": a.grant_id,
        }
        for a in response.applications
    ]
    columns = ["application", "project", "tier", "requested", "state", "grant"]
    print_records(records, columns, output_format=args.format, title="applications")
    _note_limit(response, len(records), args, "narrow the list with --project")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        listed: list[grant_pb2.Grant] = []
        if not args.sub_allocations or args.project:
            response = grants.ListGrants(
                grant_pb2.ListGrantsRequest(
                    project_id=args.project or "",
                    page=common_pb2.PageRequest(page_size=args.limit),
                )
            )
            listed = list(response.grants)
        if not args.sub_allocations:
            records = [_grant_record(g) for g in listed]
            columns = [
                "grant",
                "project",
                "tier",
                "state",
                "available",
                "held",
                "charged",
                "starts",
                "ends",
            ]
            print_records(records, columns, output_format=args.format, title="grants (PF-days)")
            _note_limit(response, len(records), args, "narrow the list with --project")
        # CSV and JSON keep one kind of record, so they list sub-allocations only when asked.
        if args.sub_allocations or args.format == "table":
            grant_ids = {g.grant_id for g in listed}
            _print_drawable(grants, args, grant_ids, quiet=not args.sub_allocations)
    return EXIT_OK


def _print_drawable(
    grants: grant_pb2_grpc.GrantServiceStub,
    args: argparse.Namespace,
    listed_grants: set[str],
    *,
    quiet: bool = False,
) -> None:
    """Print the sub-allocations the caller may draw on, of any grant.

    With ``--project``, only those of ``listed_grants`` (the project's grants) or held by the
    project are printed. With ``quiet``, an empty list prints nothing, and so does a grant
    service older than ``caller_may_draw``, which rejects the request for its missing grant id.
    """
    request = grant_pb2.ListSubAllocationsRequest(
        caller_may_draw=True, page=common_pb2.PageRequest(page_size=args.limit)
    )
    try:
        response = grants.ListSubAllocations(request)
    except grpc.RpcError as error:
        if quiet and error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return
        raise
    allocations = [
        s
        for s in response.sub_allocations
        if not args.project or s.holder == args.project or s.grant_id in listed_grants
    ]
    if quiet and not allocations:
        return
    records = [
        {
            "grant": s.grant_id,
            "sub-allocation": s.sub_allocation_id,
            "holder": s.holder,
            "available": decimal_value(s.balance.available_pf_days),
            "held": decimal_value(s.balance.held_pf_days),
            "charged": decimal_value(s.balance.charged_pf_days),
            "credited": decimal_value(s.balance.credited_pf_days),
        }
        for s in allocations
    ]
    columns = ["grant", "sub-allocation", "holder", "available", "held", "charged", "credited"]
    title = "sub-allocations you may draw on (PF-days)"
    print_records(records, columns, output_format=args.format, title=title)
    _note_limit(
        response, len(response.sub_allocations), args, "the SDK's ListSubAllocations pages further"
    )


def run_balance(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        balance = grants.GetBalance(
            grant_pb2.GetBalanceRequest(
                grant_id=args.grant, sub_allocation_id=args.sub_allocation or ""
            )
        )
    title = args.grant + (f" / {args.sub_allocation}" if args.sub_allocation else "")
    print_records(
        rows_of(balance_rows(balance)), ["field", "value"], output_format=args.format, title=title
    )
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        try:
            grant = grants.GetGrant(grant_pb2.GetGrantRequest(grant_id=args.grant))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or not args.grant.startswith("sub-"):
                raise
            # The grant service names every sub-allocation sub-<hex>.
            raise CommandError(
                f"{describe_rpc_error(error)}; {args.grant} looks like a sub-allocation id, "
                f"so read it with acsp grants balance GRANT_ID --sub-allocation {args.grant}",
                exit_code_for_rpc_error(error),
            ) from None
    print_grant(grant, args.format)
    return EXIT_OK


def run_history(args: argparse.Namespace) -> int:
    kind = KINDS.get(args.kind, 0) if args.kind else 0
    with open_grants(args) as grants:
        response = grants.ListLedgerEntries(
            grant_pb2.ListLedgerEntriesRequest(
                grant_id=args.grant,
                kind=kind,  # type: ignore[arg-type]
                page=common_pb2.PageRequest(
                    page_size=args.limit,
                    page_token=str(args.after) if args.after is not None else "",
                ),
            )
        )
    records = [
        {
            "entry": e.entry_id,
            "time": format_time(e.create_time),
            "kind": enum_name(common_pb2.LedgerEntryKind, e.kind, "LEDGER_ENTRY_KIND_"),
            "PF-days": decimal_value(e.amount_pf_days),
            "from": _accounts(e, debited=True),
            "to": _accounts(e, debited=False),
            "hold": e.hold_id,
            "job": e.job_id,
            "by": e.cause.actor,
        }
        for e in response.entries
    ]
    columns = ["entry", "time", "kind", "PF-days", "from", "to", "hold", "job", "by"]
    print_records(records, columns, output_format=args.format, title=f"ledger of {args.grant}")
    if response.page.next_page_token and args.format == "table":
        print(f"more: acsp grants history {args.grant} --after {response.page.next_page_token}")
    return EXIT_OK


def _accounts(entry: grant_pb2.LedgerEntry, *, debited: bool) -> str:
    """Return the accounts an entry takes PF-days from (``debited``) or moves them to."""
    names = [
        posting.account
        for posting in entry.postings
        if (Decimal(posting.amount_pf_days.value) < 0) == debited
        and Decimal(posting.amount_pf_days.value) != 0
    ]
    return ", ".join(names)


def run_delegate(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        sub = grants.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id=_request_id(args),
                grant_id=args.grant,
                parent_sub_allocation_id=args.parent or "",
                holder=args.holder,
                amount_pf_days=_decimal(args.pf_days),
            )
        )
    rows = [("sub-allocation", sub.sub_allocation_id), ("holder", sub.holder)]
    rows += balance_rows(sub.balance)
    print_records(rows_of(rows), ["field", "value"], output_format=args.format)
    return EXIT_OK


def run_suballocations(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        response = grants.ListSubAllocations(
            grant_pb2.ListSubAllocationsRequest(
                grant_id=args.grant, page=common_pb2.PageRequest(page_size=args.limit)
            )
        )
    records = [
        {
            "sub-allocation": s.sub_allocation_id,
            "parent": s.parent_sub_allocation_id or args.grant,
            "holder": s.holder,
            "available": decimal_value(s.balance.available_pf_days),
            "held": decimal_value(s.balance.held_pf_days),
            "charged": decimal_value(s.balance.charged_pf_days),
            "delegated": decimal_value(s.balance.delegated_pf_days),
        }
        for s in response.sub_allocations
    ]
    columns = ["sub-allocation", "parent", "holder", "available", "held", "charged", "delegated"]
    title = f"sub-allocations of {args.grant} (PF-days)"
    print_records(records, columns, output_format=args.format, title=title)
    # NOTE: ListSubAllocations has no filter, so rows past the 1000th cannot be listed here.
    _note_limit(response, len(records), args, "the SDK's ListSubAllocations pages further")
    return EXIT_OK


def run_expire(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        response = grants.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id=_request_id(args)))
    rows = [
        ("grants expired", ", ".join(response.grant_ids) or "none"),
        ("returned to the program pool, PF-days", decimal_value(response.returned_pf_days)),
    ]
    print_records(rows_of(rows), ["field", "value"], output_format=args.format)
    return EXIT_OK


def run_supplement(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        grant = grants.SupplementGrant(
            grant_pb2.SupplementGrantRequest(
                request_id=_request_id(args),
                grant_id=args.grant,
                amount_pf_days=_decimal(args.pf_days),
                reason=args.reason,
            )
        )
    print_records([_grant_record(grant)], list(_grant_record(grant)), output_format=args.format)
    return EXIT_OK


def run_extend(args: argparse.Namespace) -> int:
    end = parse_end_time(args.end, "--end")
    with open_grants(args) as grants, noting_end_date(args.end, "--end", "new_end_time"):
        grant = grants.ExtendGrant(
            grant_pb2.ExtendGrantRequest(
                request_id=_request_id(args),
                grant_id=args.grant,
                new_end_time=end,
                reason=args.reason,
            )
        )
    print_records([_grant_record(grant)], list(_grant_record(grant)), output_format=args.format)
    return EXIT_OK


def _negated(text: str) -> Decimal:
    """Return the negation of a decimal string."""
    # copy_negate is exact; unary minus would round to the context's 28 digits.
    return Decimal(text or "0").copy_negate()


def run_summary(args: argparse.Namespace) -> int:
    with open_grants(args) as grants:
        summary = grants.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    # The program pool is never funded by an entry: awards and supplements draw it below zero
    # and expiries return budget to it. Its negation is what the program has handed out net.
    rows = [
        ("postings sum PF-days", decimal_value(summary.postings_sum_pf_days)),
        ("entries", summary.entry_count),
        (
            "net awarded from the program pool PF-days",
            _negated(summary.program_pool_pf_days.value),
        ),
        ("grants with negative available", ", ".join(summary.negative_grant_ids) or "none"),
    ]
    print_records(rows_of(rows), ["field", "value"], output_format=args.format, title="ledger")
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``acsp grants ...`` to the ``acsp`` parser."""
    common = [connection_options(), output_options()]
    group = subparsers.add_parser(
        "grants", help="institutions, projects, applications, grants and the ledger"
    )
    commands = group.add_subparsers(title="grant commands", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        parser = commands.add_parser(name, parents=common, help=help, description=help)
        options = {"request_id": "--request-id", **FIELD_OPTIONS.get(name, {})}

        def run(args: argparse.Namespace) -> int:
            with naming_options(options):
                return func(args)

        parser.set_defaults(func=run)
        return parser

    def idempotent(parser: Any) -> None:
        parser.add_argument(
            "--request-id",
            help="idempotency key; pass the same one to retry safely (default: a new one)",
        )

    p = command("institution", run_institution, "register an institution (program office)")
    p.add_argument("institution_id", help="id of the new institution, e.g. uni-a")
    p.add_argument("name", help="the institution's display name, e.g. 'University A'")
    p.add_argument(
        "--country", required=True, help="ISO 3166-1 alpha-2 country code, e.g. DE or NO"
    )
    idempotent(p)

    p = command("project", run_project, "create a project with its PI and members")
    p.add_argument("project_id", help="id of the new project, e.g. alice-lab")
    p.add_argument("--institution", required=True, help="institution the project belongs to")
    p.add_argument("--pi", required=True, help="subject of the principal investigator")
    p.add_argument("--name", help="display name (default: the project id)")
    p.add_argument(
        "--member", action="append", default=[], help="SUBJECT[:member|viewer]; repeatable"
    )
    idempotent(p)

    p = command("member", run_member, "add, change or remove a project member (PI only)")
    p.add_argument("project", help="the project, which you lead as its PI")
    p.add_argument("subject", help="the member's user id, the subject of their token")
    p.add_argument(
        "--role",
        choices=sorted(ROLES),
        default="member",
        help="a viewer may only read, and a member also submits jobs (default: member)",
    )
    p.add_argument("--remove", action="store_true", help="remove the member instead")
    idempotent(p)

    p = command("apply", run_apply, "submit an application (exploratory ones are awarded at once)")
    p.add_argument("--project", required=True, help="project that applies")
    p.add_argument(
        "--tier",
        choices=sorted(TIERS),
        required=True,
        help="exploratory is awarded at once, up to the exploratory limit per project at a "
        "time and within the caps per PI and per institution over a rolling period, 365 days "
        "by default (over a cap it goes to peer review, and the application's history says "
        "why); standard and flagship are reviewed",
    )
    p.add_argument("--pf-days", required=True, help="requested budget in PF-days, e.g. 12.5")
    p.add_argument("--start", required=True, help="start of the validity window, ISO 8601")
    p.add_argument(
        "--end",
        required=True,
        help="end of the validity window, ISO 8601; a date alone includes that whole day",
    )
    p.add_argument(
        "--justification", required=True, help="what the compute is for, for the reviewers"
    )
    p.add_argument("--model", action="append", default=[], help="preferred accelerator model")
    p.add_argument("--region", action="append", default=[], help="preferred <provider>/<region>")
    idempotent(p)

    p = command("assign", run_assign, "assign a reviewer to an application (program office)")
    p.add_argument("application", help="the application to assign a reviewer to")
    p.add_argument("--reviewer", required=True, help="subject of the reviewer")
    p.add_argument("--institution", required=True, help="the reviewer's institution")
    idempotent(p)

    p = command("review", run_review, "submit your review of an application")
    p.add_argument("application", help="the application to review")
    p.add_argument(
        "--score", type=whole_number(1, 5), required=True, help="1 (poor) to 5 (excellent)"
    )
    p.add_argument("--comments", required=True, help="the review's text")
    idempotent(p)

    p = command("award", run_award, "decide an application: award, award less or reject")
    p.add_argument("application", help="the application to decide")
    p.add_argument(
        "--outcome",
        choices=sorted(OUTCOMES),
        default="award",
        help="award grants the request in full, award-less grants --pf-days (default: award)",
    )
    p.add_argument("--reason", required=True, help="why, shown to the applicant")
    p.add_argument("--pf-days", help="the awarded PF-days, for --outcome award-less")
    p.add_argument(
        "--provider",
        action="append",
        default=[],
        help="restrict to a registered provider; repeatable, and final once awarded",
    )
    p.add_argument(
        "--region",
        action="append",
        default=[],
        help="restrict to a registered <provider>/<region>; repeatable, and final once awarded",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="restrict to an accelerator model of the catalog; repeatable, and final once awarded",
    )
    p.add_argument(
        "--fixed-rates", action="store_true", help="price at the rate card current at award"
    )
    idempotent(p)

    p = command("applications", run_applications, "list applications, or show one")
    p.add_argument("application", nargs="?", help="show this application with its history")
    p.add_argument("--project", help="only this project's applications")
    p.add_argument(
        "--limit",
        type=whole_number(1, MAX_PAGE_SIZE),
        default=100,
        help=f"rows to show, at most {MAX_PAGE_SIZE} (default: 100)",
    )

    p = command(
        "list",
        run_list,
        "list the grants you may see, and in a table also the sub-allocations you may draw on",
    )
    p.add_argument(
        "--project",
        help="only this project's grants, and the sub-allocations of them or held by it",
    )
    p.add_argument(
        "--sub-allocations",
        action="store_true",
        help=(
            "list only the sub-allocations you may draw on, of any grant whose window has not "
            "ended, with their grant id: those you hold, those of grants of projects you lead, "
            "and those held by sub-projects you are a member of (submit with --grant and "
            "--sub-allocation)"
        ),
    )
    p.add_argument(
        "--limit",
        type=whole_number(1, MAX_PAGE_SIZE),
        default=100,
        help=f"rows to show, at most {MAX_PAGE_SIZE} (default: 100)",
    )

    p = command("balance", run_balance, "show a grant's or sub-allocation's balance")
    p.add_argument("grant", help="the grant whose balance to show")
    p.add_argument("--sub-allocation", help="this sub-allocation of the grant instead")

    p = command(
        "show", run_show, "show a grant: its window, limits on providers, regions and models"
    )
    p.add_argument("grant", help="the grant to show")

    p = command("history", run_history, "list a grant's ledger entries, oldest first")
    p.add_argument("grant", help="the grant whose ledger entries to list")
    p.add_argument("--kind", choices=sorted(KINDS), help="only entries of this kind")
    p.add_argument(
        "--limit",
        type=whole_number(1, MAX_PAGE_SIZE),
        default=100,
        help=f"entries to show, at most {MAX_PAGE_SIZE} (default: 100)",
    )
    p.add_argument(
        "--after",
        type=whole_number(1, MAX_ENTRY_ID),
        help="continue after this entry id, as the 'more:' line of the previous page gives it",
    )

    p = command(
        "delegate", run_delegate, "delegate part of a grant to a member or sub-project (PI only)"
    )
    p.add_argument("grant", help="the grant to delegate from")
    p.add_argument(
        "--holder",
        required=True,
        help=(
            "a member (not a viewer) of the grant's project, or the id of another project "
            "that its PI leads, as a sub-project. A member's sub-allocation pays for jobs of "
            "the grant's project that the member or the PI submits; a sub-project's pays for "
            "jobs of the sub-project, submitted by any of its members, and for jobs of the "
            "grant's project that the PI submits"
        ),
    )
    p.add_argument("--pf-days", required=True, help="PF-days to delegate, e.g. 12.5")
    p.add_argument("--parent", help="parent sub-allocation (default: the grant itself)")
    idempotent(p)

    p = command("suballocations", run_suballocations, "list a grant's sub-allocations")
    p.add_argument("grant", help="the grant whose sub-allocations to list")
    p.add_argument(
        "--limit",
        type=whole_number(1, MAX_PAGE_SIZE),
        default=100,
        help=f"rows to show, at most {MAX_PAGE_SIZE} (default: 100)",
    )

    p = command("expire", run_expire, "expire grants whose window ended (program office)")
    idempotent(p)

    p = command("supplement", run_supplement, "add the one supplement to a grant (program office)")
    p.add_argument("grant", help="the grant to add to")
    p.add_argument(
        "--pf-days",
        required=True,
        help="PF-days to add, at most half the tier limit, once per grant",
    )
    p.add_argument("--reason", required=True, help="why, recorded with the change")
    idempotent(p)

    p = command("extend", run_extend, "move a grant's end later (program office)")
    p.add_argument("grant", help="the grant to extend")
    p.add_argument(
        "--end", required=True, help="new end time, ISO 8601; a date alone includes that day"
    )
    p.add_argument("--reason", required=True, help="why, recorded with the change")
    idempotent(p)

    command("summary", run_summary, "check the whole ledger's invariants (program office)")
