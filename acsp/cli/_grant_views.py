"""Views of one application or one grant for ``acsp grants``: field rows, or one JSON object.

A table and CSV get one ``field, value`` row per fact. JSON gets one object per application or
grant, with lists of objects for its reviews and history and exact amounts as strings, so a
script reads each value by its key.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from acsp.cli._common import (
    ReadableCell,
    decimal_text,
    decimal_value,
    format_end_time,
    format_time,
    print_records,
    rows_of,
)
from acsp.v1 import common_pb2, grant_pb2

ANY: str = "any"
"""Table text of an empty limit list, which allows every value."""


def enum_name(enum: Any, number: int, prefix: str) -> str:
    return str(enum.Name(number)).removeprefix(prefix).lower()


def balance_rows(balance: grant_pb2.Balance) -> list[tuple[str, Any]]:
    """Return one row per amount of ``balance``, as the Balance message documents them.

    Held and charged include the sub-allocations', and delegated is what was transferred to
    them, which their holds and charges leave unchanged.
    """
    return [
        ("available PF-days", decimal_value(balance.available_pf_days)),
        ("held PF-days", decimal_value(balance.held_pf_days)),
        ("charged PF-days", decimal_value(balance.charged_pf_days)),
        ("refunded PF-days", decimal_value(balance.refunded_pf_days)),
        ("delegated PF-days", decimal_value(balance.delegated_pf_days)),
        (
            "sub-allocations available PF-days",
            decimal_value(balance.sub_allocations_available_pf_days),
        ),
        ("sub-allocations held PF-days", decimal_value(balance.sub_allocations_held_pf_days)),
        (
            "sub-allocations charged PF-days",
            decimal_value(balance.sub_allocations_charged_pf_days),
        ),
        ("credited PF-days", decimal_value(balance.credited_pf_days)),
    ]


def window_cell(window: common_pb2.TimeWindow) -> ReadableCell:
    start = format_time(window.start_time)
    return ReadableCell(
        f"{start} to {format_time(window.end_time)}",
        f"{start} to {format_end_time(window.end_time)}",
    )


def _event(step: common_pb2.Cause) -> str:
    return step.trigger.removeprefix("application:")


def application_rows(app: grant_pb2.Application) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("application", app.application_id),
        ("project", app.project_id),
        ("tier", enum_name(grant_pb2.GrantTier, app.tier, "GRANT_TIER_")),
        ("requested PF-days", decimal_value(app.requested_pf_days)),
        ("state", enum_name(grant_pb2.ApplicationState, app.state, "APPLICATION_STATE_")),
        ("window", window_cell(app.validity)),
        ("preferred models", ", ".join(app.accelerator_models) or ANY),
        ("preferred regions", ", ".join(app.regions) or ANY),
        ("reviewers", ", ".join(app.reviewer_subjects)),
        ("grant", app.grant_id),
    ]
    for review in app.reviews:
        rows.append((f"review by {review.reviewer_subject}", f"{review.score}/5 {review.comments}"))
    if app.HasField("decision"):
        outcome = enum_name(grant_pb2.DecisionOutcome, app.decision.outcome, "DECISION_OUTCOME_")
        rows.append(("decision", f"{outcome} by {app.decision.decided_by}: {app.decision.reason}"))
    for step in app.history:
        detail = f": {step.reason}" if step.reason else ""
        rows.append((format_time(step.time), f"{_event(step)} by {step.actor}{detail}"))
    return rows


def application_document(app: grant_pb2.Application) -> dict[str, Any]:
    """Describe an application as one JSON object, with amounts as exact decimal strings."""
    decision: dict[str, Any] | None = None
    if app.HasField("decision"):
        awarded = app.decision.HasField("awarded_pf_days")
        decision = {
            "outcome": enum_name(
                grant_pb2.DecisionOutcome, app.decision.outcome, "DECISION_OUTCOME_"
            ),
            "decided_by": app.decision.decided_by,
            "reason": app.decision.reason,
            "awarded_pf_days": decimal_text(app.decision.awarded_pf_days) if awarded else None,
            "time": format_time(app.decision.decide_time),
        }
    return {
        "application": app.application_id,
        "project": app.project_id,
        "tier": enum_name(grant_pb2.GrantTier, app.tier, "GRANT_TIER_"),
        "requested_pf_days": decimal_text(app.requested_pf_days),
        "state": enum_name(grant_pb2.ApplicationState, app.state, "APPLICATION_STATE_"),
        "start": format_time(app.validity.start_time),
        "end": format_time(app.validity.end_time),
        "accelerator_models": list(app.accelerator_models),
        "regions": list(app.regions),
        "applicant": app.applicant_subject,
        "reviewers": list(app.reviewer_subjects),
        "grant": app.grant_id,
        "reviews": [
            {
                "reviewer": review.reviewer_subject,
                "score": review.score,
                "comments": review.comments,
                "time": format_time(review.submit_time),
            }
            for review in app.reviews
        ],
        "decision": decision,
        "history": [
            {
                "time": format_time(step.time),
                "event": _event(step),
                "actor": step.actor,
                "detail": step.reason,
            }
            for step in app.history
        ],
    }


def print_application(app: grant_pb2.Application, output_format: str) -> None:
    if output_format == "json":
        _print_json(application_document(app))
        return
    print_records(rows_of(application_rows(app)), ["field", "value"], output_format=output_format)


def grant_rows(grant: grant_pb2.Grant) -> list[tuple[str, Any]]:
    limits = grant.constraints
    rate_policy = enum_name(grant_pb2.RatePolicy, grant.rate_policy, "RATE_POLICY_")
    if grant.rate_policy == grant_pb2.RATE_POLICY_FIXED_AT_AWARD:
        rate_policy += f" (rate card version {grant.rate_card_version})"
    return [
        ("grant", grant.grant_id),
        ("project", grant.project_id),
        ("institution", grant.institution_id),
        ("tier", enum_name(grant_pb2.GrantTier, grant.tier, "GRANT_TIER_")),
        ("state", enum_name(grant_pb2.GrantState, grant.state, "GRANT_STATE_")),
        ("window", window_cell(grant.validity)),
        ("providers", ", ".join(limits.providers) or ANY),
        ("regions", ", ".join(limits.regions) or ANY),
        ("accelerator models", ", ".join(limits.accelerator_models) or ANY),
        ("rate policy", rate_policy),
        ("application", grant.application_id),
        ("supplemented", grant.supplemented),
        *balance_rows(grant.balance),
    ]


def grant_document(grant: grant_pb2.Grant) -> dict[str, Any]:
    """Describe a grant as one JSON object; an empty limit list allows every value."""
    balance = grant.balance
    return {
        "grant": grant.grant_id,
        "project": grant.project_id,
        "institution": grant.institution_id,
        "tier": enum_name(grant_pb2.GrantTier, grant.tier, "GRANT_TIER_"),
        "state": enum_name(grant_pb2.GrantState, grant.state, "GRANT_STATE_"),
        "start": format_time(grant.validity.start_time),
        "end": format_time(grant.validity.end_time),
        "providers": list(grant.constraints.providers),
        "regions": list(grant.constraints.regions),
        "accelerator_models": list(grant.constraints.accelerator_models),
        "rate_policy": enum_name(grant_pb2.RatePolicy, grant.rate_policy, "RATE_POLICY_"),
        "rate_card_version": grant.rate_card_version or None,
        "application": grant.application_id,
        "supplemented": grant.supplemented,
        "available_pf_days": decimal_text(balance.available_pf_days),
        "held_pf_days": decimal_text(balance.held_pf_days),
        "charged_pf_days": decimal_text(balance.charged_pf_days),
        "refunded_pf_days": decimal_text(balance.refunded_pf_days),
        "delegated_pf_days": decimal_text(balance.delegated_pf_days),
        "sub_allocations_available_pf_days": decimal_text(
            balance.sub_allocations_available_pf_days
        ),
        "sub_allocations_held_pf_days": decimal_text(balance.sub_allocations_held_pf_days),
        "sub_allocations_charged_pf_days": decimal_text(balance.sub_allocations_charged_pf_days),
        "credited_pf_days": decimal_text(balance.credited_pf_days),
    }


def print_grant(grant: grant_pb2.Grant, output_format: str) -> None:
    if output_format == "json":
        _print_json(grant_document(grant))
        return
    print_records(
        rows_of(grant_rows(grant)),
        ["field", "value"],
        output_format=output_format,
        title=f"grant {grant.grant_id} (PF-days)",
    )


def _print_json(document: dict[str, Any]) -> None:
    # One object on one line, as --format json writes every record.
    sys.stdout.write(json.dumps(document) + "\n")
