"""Pure rules of applications and review: tiers, limits, conflicts of interest, decisions."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from services.grant.amounts import format_amount
from services.grant.errors import FailedPrecondition, InvalidArgument


class Tier(StrEnum):
    """Size class of an application and of the grant it leads to."""

    EXPLORATORY = "exploratory"
    STANDARD = "standard"
    FLAGSHIP = "flagship"


class ApplicationState(StrEnum):
    SUBMITTED = "submitted"
    """Waiting for reviewers."""
    IN_REVIEW = "in_review"
    """Reviewers assigned; reviews in progress."""
    AWARDED = "awarded"
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"


class Decision(StrEnum):
    AWARD = "award"
    AWARD_LESS = "award_less"
    REJECT = "reject"


class RatePolicy(StrEnum):
    """Pricing rule for a grant's usage."""

    FIXED_AT_AWARD = "fixed_at_award"
    """Rates of the rate card version current at award time, for the whole grant."""
    CURRENT = "current"
    """Rates of whichever rate card version is current when usage is charged."""


def parse_tier(field: str, text: str) -> Tier:
    try:
        return Tier(text.strip().lower())
    except ValueError:
        choices = ", ".join(t.value for t in Tier)
        raise InvalidArgument(field, f"{text!r} is not a tier", f"use one of {choices}") from None


def check_requested(tier: Tier, requested: Decimal, limits: Mapping[Tier, Decimal]) -> None:
    """Raise InvalidArgument naming the requested amount when it exceeds the tier limit."""
    limit = limits[tier]
    if requested > limit:
        raise InvalidArgument(
            "application.requested_pf_days",
            f"{format_amount(requested)} exceeds the {tier} limit of "
            f"{format_amount(limit)} PF-days",
            "request less or apply for a larger tier",
        )


def check_validity(
    starts_at: datetime, ends_at: datetime, now: datetime, max_days: int, end_field: str
) -> None:
    """Raise InvalidArgument naming ``end_field`` for a window that ended or is too long.

    The end must lie after the start and after ``now``, and the window may span at most
    ``max_days`` days.
    """
    if ends_at <= starts_at:
        raise InvalidArgument(
            end_field,
            f"{ends_at.isoformat()} is not after the start {starts_at.isoformat()}",
            "give an end time later than the start time",
        )
    if ends_at <= now:
        raise InvalidArgument(
            end_field,
            f"{ends_at.isoformat()} is in the past",
            "give an end time in the future",
        )
    if ends_at - starts_at > timedelta(days=max_days):
        raise InvalidArgument(
            end_field,
            f"the window from {starts_at.isoformat()} to {ends_at.isoformat()} is longer than "
            f"the maximum of {max_days} days",
            f"end it at most {max_days} days after the start",
        )


@dataclass(frozen=True, slots=True)
class ExploratoryHolding:
    """A project's live exploratory grant or pending exploratory application."""

    kind: str
    """``grant`` or ``application``."""
    identifier: str
    amount: Decimal
    """PF-days credited to the grant, or requested by the application."""


def check_exploratory_room(
    project_id: str,
    holdings: Sequence[ExploratoryHolding],
    requested: Decimal,
    limit: Decimal,
) -> None:
    """Raise FailedPrecondition when a project's exploratory budget would exceed the tier limit.

    The tier limit caps the sum over a project's live exploratory grants (neither expired nor
    past their end), its pending exploratory applications and the new request. Exploratory
    awards skip review, so without this cap repeated applications would award any amount.
    """
    existing_total = sum((h.amount for h in holdings), Decimal(0))
    if existing_total + requested <= limit:
        return
    named = ", ".join(
        f"{h.kind} {h.identifier} ({format_amount(h.amount)} PF-days)" for h in holdings
    )
    room = max(limit - existing_total, Decimal(0))
    fix = (
        f"request at most {format_amount(room)} PF-days, "
        if room > 0
        else "wait until those grants end, "
    )
    raise FailedPrecondition(
        f"project {project_id!r} already has {named} of the exploratory tier, whose limit "
        f"is {format_amount(limit)} PF-days per project at a time; {fix}or apply for the "
        "standard tier",
        field="application.requested_pf_days",
    )


@dataclass(frozen=True, slots=True)
class ExploratoryCaps:
    """Limits on the PF-days awarded without review over a rolling period."""

    pi_limit: Decimal
    """PF-days that the projects led by one PI may be awarded without review per period."""
    institution_limit: Decimal
    """PF-days that the projects of one institution may be awarded without review per period."""
    period_days: int
    """Length of the rolling period that ends now, in days."""


@dataclass(frozen=True, slots=True)
class AutoAwardTotals:
    """PF-days already awarded without review within the current period."""

    pi: Decimal
    """To the projects led by the applying project's PI."""
    institution: Decimal
    """To the projects of the applying project's institution."""


def exploratory_review_reason(
    pi: str,
    institution_id: str,
    requested: Decimal,
    totals: AutoAwardTotals,
    caps: ExploratoryCaps,
) -> str | None:
    """Return why an exploratory request goes to peer review, or None to award it at once.

    The per-project tier limit bounds one project, but a PI may create projects, so awards
    without review are also capped per PI and per institution over a rolling period.
    """
    checks = (
        (f"led by PI {pi!r}", totals.pi, caps.pi_limit, "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS"),
        (
            f"of institution {institution_id!r}",
            totals.institution,
            caps.institution_limit,
            "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS",
        ),
    )
    for scope, total, limit, variable in checks:
        if total + requested > limit:
            return (
                f"the projects {scope} were awarded {format_amount(total)} PF-days without "
                f"review in the last {caps.period_days} days, and {format_amount(requested)} "
                f"more would exceed the limit of {format_amount(limit)} PF-days ({variable}), "
                "so the application goes to peer review instead of being awarded at once"
            )
    return None


def is_auto_approved(tier: Tier) -> bool:
    """Return whether applications of the tier are awarded without review (within its limit)."""
    return tier is Tier.EXPLORATORY


def check_reviewer_conflict(
    reviewer: str,
    reviewer_institution: str | None,
    applicant_institution: str,
    project_members: Collection[str],
    *,
    subject_field: str = "reviewer_subject",
    institution_field: str = "reviewer_institution_id",
) -> None:
    """Raise FailedPrecondition naming the field when the reviewer has a conflict of interest.

    A reviewer conflicts when they belong to the applicant's institution or to the project. An
    unknown institution (None) is checked only for project membership.
    """
    if reviewer in project_members:
        raise FailedPrecondition(
            f"reviewer {reviewer!r} is a member of the applying project: conflict of interest",
            field=subject_field,
        )
    if reviewer_institution == applicant_institution:
        raise FailedPrecondition(
            f"reviewer {reviewer!r} belongs to the applicant's institution "
            f"{applicant_institution!r}: conflict of interest",
            field=institution_field,
        )


def check_known_institution(
    reviewer: str, given: str, known: Collection[str], *, field: str
) -> None:
    """Raise FailedPrecondition when ``given`` disagrees with the reviewer's known institutions.

    ``known`` contains the institutions the service has seen for the reviewer (from their own
    tokens or the projects they lead); an empty collection knows nothing and accepts any.
    """
    if known and given not in known:
        names = ", ".join(sorted(known))
        raise FailedPrecondition(
            f"reviewer {reviewer!r} is known to belong to {names}, not {given!r}",
            field=field,
        )


def check_score(score: int, *, minimum: int = 1, maximum: int = 5) -> None:
    if not minimum <= score <= maximum:
        raise InvalidArgument(
            "score",
            f"{score} is outside {minimum}..{maximum}",
            f"give a whole score from {minimum} to {maximum}",
        )


def decide_amount(
    decision: Decision, requested: Decimal, awarded: Decimal | None, reason: str
) -> Decimal:
    """Return the PF-days a decision awards, zero for a rejection.

    ``award`` grants what was requested, ``award_less`` needs an amount below it, and every
    decision needs a reason. An amount with ``award`` or ``reject`` is rejected rather than
    ignored, so that a decision never grants other than what its caller wrote.
    """
    if not reason.strip():
        raise InvalidArgument("decision.reason", "is missing", "record why the decision was made")
    if awarded is not None and decision is not Decision.AWARD_LESS:
        raise InvalidArgument(
            "decision.awarded_pf_days",
            f"{format_amount(awarded)} is set, but the outcome {decision} takes no amount",
            "leave the amount out, or use the outcome award_less to grant less than requested",
        )
    if decision is Decision.REJECT:
        return Decimal(0)
    if decision is Decision.AWARD:
        return requested
    if awarded is None:
        raise InvalidArgument(
            "decision.awarded_pf_days", "is missing", "give the amount that award_less grants"
        )
    if awarded >= requested:
        raise InvalidArgument(
            "decision.awarded_pf_days",
            f"{format_amount(awarded)} is not less than the requested {format_amount(requested)}",
            "use the outcome award to grant the full request",
        )
    return awarded


def check_supplement(
    tier: Tier, amount: Decimal, already_supplemented: bool, limits: Mapping[Tier, Decimal]
) -> None:
    """Raise unless a supplement is the grant's first and at most half its tier limit."""
    if already_supplemented:
        raise FailedPrecondition(
            "the grant was already supplemented: a grant gets at most one supplement",
            field="grant_id",
        )
    cap = limits[tier] / 2
    if amount > cap:
        raise InvalidArgument(
            "amount_pf_days",
            f"{format_amount(amount)} exceeds half the {tier} limit, {format_amount(cap)} PF-days",
            "request at most half the tier limit",
        )
