"""Conversions between protobuf messages and the grant service's own values, at the edge.

Inputs are validated here, so every error names the request field the caller must fix.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import asyncpg
from google.protobuf import timestamp_pb2

from acsp.subjects import TOKEN_PATTERN
from acsp.time_range import EARLIEST_TIME, LATEST_TIME
from acsp.v1 import common_pb2, grant_pb2
from scheduler.engine.catalog import Catalog
from services.grant.amounts import format_amount, parse_amount
from services.grant.constraints import Placement
from services.grant.errors import InvalidArgument
from services.grant.ledger_rules import EntryKind, RolledBalance
from services.grant.review_rules import ApplicationState, Decision, RatePolicy, Tier

TIERS: Final = {
    grant_pb2.GRANT_TIER_EXPLORATORY: Tier.EXPLORATORY,
    grant_pb2.GRANT_TIER_STANDARD: Tier.STANDARD,
    grant_pb2.GRANT_TIER_FLAGSHIP: Tier.FLAGSHIP,
}
TIER_OUT: Final = {v: k for k, v in TIERS.items()}
ROLES: Final = {
    grant_pb2.PROJECT_ROLE_PI: "pi",
    grant_pb2.PROJECT_ROLE_MEMBER: "member",
    grant_pb2.PROJECT_ROLE_VIEWER: "viewer",
}
ROLE_OUT: Final = {v: k for k, v in ROLES.items()}
APPLICATION_STATES: Final = {
    ApplicationState.SUBMITTED: grant_pb2.APPLICATION_STATE_SUBMITTED,
    ApplicationState.IN_REVIEW: grant_pb2.APPLICATION_STATE_IN_REVIEW,
    ApplicationState.AWARDED: grant_pb2.APPLICATION_STATE_AWARDED,
    ApplicationState.REJECTED: grant_pb2.APPLICATION_STATE_REJECTED,
    ApplicationState.WITHDRAWN: grant_pb2.APPLICATION_STATE_WITHDRAWN,
}
APPLICATION_STATE_IN: Final = {v: k for k, v in APPLICATION_STATES.items()}
DECISIONS: Final = {
    grant_pb2.DECISION_OUTCOME_AWARD: Decision.AWARD,
    grant_pb2.DECISION_OUTCOME_AWARD_LESS: Decision.AWARD_LESS,
    grant_pb2.DECISION_OUTCOME_REJECT: Decision.REJECT,
}
DECISION_OUT: Final = {v: k for k, v in DECISIONS.items()}
ENTRY_KINDS: Final = {
    EntryKind.AWARD: common_pb2.LEDGER_ENTRY_KIND_AWARD,
    EntryKind.SUPPLEMENT: common_pb2.LEDGER_ENTRY_KIND_SUPPLEMENT,
    EntryKind.HOLD: common_pb2.LEDGER_ENTRY_KIND_HOLD,
    EntryKind.RELEASE: common_pb2.LEDGER_ENTRY_KIND_RELEASE,
    EntryKind.CHARGE: common_pb2.LEDGER_ENTRY_KIND_CHARGE,
    EntryKind.REFUND: common_pb2.LEDGER_ENTRY_KIND_REFUND,
    EntryKind.EXPIRY: common_pb2.LEDGER_ENTRY_KIND_EXPIRY,
    EntryKind.TRANSFER: common_pb2.LEDGER_ENTRY_KIND_TRANSFER,
}
ENTRY_KIND_IN: Final = {v: k for k, v in ENTRY_KINDS.items()}
MAX_TEXT: Final = 200
"""Characters in a name, subject or other one-line text."""
MAX_JUSTIFICATION: Final = 20_000
"""Characters in a justification, review comment or other multi-line text."""
MULTILINE_CONTROLS: Final = frozenset("\n\r\t")
"""Control characters that multi-line text may contain."""
CATALOG: Final = Catalog()
"""The accelerator models that providers may pledge, shared with the scheduler."""


def amount_in(field: str, message: common_pb2.Decimal, *, allow_zero: bool = False) -> Decimal:
    """Parse a PF-day amount; raise InvalidArgument naming ``field``."""
    return parse_amount(field, message.value, allow_zero=allow_zero)


def amount_out(value: Decimal) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=format_amount(value))


def time_in(field: str, message: timestamp_pb2.Timestamp, present: bool) -> datetime:
    """Convert a timestamp, raising InvalidArgument when it is missing or outside 2000..2199."""
    if not present:
        raise InvalidArgument(field, "is missing", "give a timestamp")
    earliest = int(EARLIEST_TIME.timestamp())
    latest = int(LATEST_TIME.timestamp())
    # Checked on the raw seconds, because converting a year-1 timestamp to UTC overflows.
    if not earliest <= message.seconds < latest or not 0 <= message.nanos < 1_000_000_000:
        raise InvalidArgument(
            field,
            f"{_time_text(message)} is outside the years "
            f"{EARLIEST_TIME.year}..{LATEST_TIME.year - 1}",
            f"give a time from {EARLIEST_TIME.date()} to before {LATEST_TIME.date()} (UTC)",
        )
    return message.ToDatetime(tzinfo=UTC)


def _time_text(message: timestamp_pb2.Timestamp) -> str:
    """Write a timestamp as ISO 8601 UTC, or as raw seconds outside the years 1 to 9999."""
    try:
        return message.ToDatetime(tzinfo=UTC).isoformat()
    except (ValueError, OverflowError):
        return f"{message.seconds} s, {message.nanos} ns since 1970"


def time_out(value: datetime, target: timestamp_pb2.Timestamp) -> None:
    target.FromDatetime(value.astimezone(UTC))


def text_in(field: str, value: str, *, required: bool = True, limit: int = MAX_TEXT) -> str:
    """Return stripped text, raising InvalidArgument when it is missing, too long or has controls.

    Text longer than MAX_TEXT may contain line breaks and tabs. Shorter text is one line, so it
    may contain no control character at all.
    """
    stripped = value.strip()
    if required and not stripped:
        raise InvalidArgument(field, "is missing", f"set {field} to text that is not blank")
    if len(stripped) > limit:
        raise InvalidArgument(
            field,
            f"is {len(stripped)} characters long, above the maximum of {limit}",
            f"keep it to {limit} characters",
        )
    allowed = MULTILINE_CONTROLS if limit > MAX_TEXT else frozenset()
    for index, char in enumerate(stripped):
        if unicodedata.category(char) == "Cc" and char not in allowed:
            raise InvalidArgument(
                field,
                f"contains the control character U+{ord(char):04X} at position {index}",
                "remove control characters"
                + (" other than line breaks and tabs" if allowed else ", line breaks included"),
            )
    return stripped


def names_in(field: str, values: Iterable[str]) -> tuple[str, ...]:
    return tuple(text_in(f"{field}[{i}]", v) for i, v in enumerate(values))


def models_in(field: str, values: Iterable[str]) -> tuple[str, ...]:
    """Convert accelerator model names; each must be in the catalog."""
    models = names_in(field, values)
    for index, model in enumerate(models):
        if model not in CATALOG:
            raise InvalidArgument(
                f"{field}[{index}]",
                f"{model!r} is not an accelerator model of the catalog",
                f"use one of {', '.join(CATALOG.names())}",
            )
    return models


def regions_in(field: str, values: Iterable[str]) -> tuple[str, ...]:
    """Convert region names; each must read ``<provider>/<region>`` with two valid ids.

    Only the format is checked here. :mod:`services.grant.fleet` checks that the scheduler
    registered the region when ACSP_SCHEDULER_ADDRESS is set.
    """
    regions = names_in(field, values)
    for index, key in enumerate(regions):
        provider, _, region = key.partition("/")
        if not TOKEN_PATTERN.match(provider) or not TOKEN_PATTERN.match(region):
            raise InvalidArgument(
                f"{field}[{index}]",
                f"{key!r} is not '<provider>/<region>'",
                "name the provider and the region with 1-64 letters, digits, '_' or '-' "
                "each, e.g. 'cloud-a/us-east'",
            )
    return regions


def providers_in(field: str, values: Iterable[str]) -> tuple[str, ...]:
    """Convert provider ids, each of 1-64 letters, digits, '_' or '-'.

    Only the format is checked here. :mod:`services.grant.fleet` checks that the scheduler
    registered the provider when ACSP_SCHEDULER_ADDRESS is set.
    """
    providers = names_in(field, values)
    for index, provider in enumerate(providers):
        if not TOKEN_PATTERN.match(provider):
            raise InvalidArgument(
                f"{field}[{index}]",
                f"{provider!r} is not a provider id",
                "name the provider with 1-64 letters, digits, '_' or '-', e.g. 'cloud-a'",
            )
    return providers


def check_region_providers(field: str, regions: Sequence[str], providers: Sequence[str]) -> None:
    """Raise InvalidArgument when a region's provider is not among ``providers``.

    Such a grant could pay for no placement at all, because a placement must satisfy both
    lists. An empty ``providers`` allows every provider.
    """
    if not providers:
        return
    for index, key in enumerate(regions):
        provider = key.partition("/")[0]
        if provider not in providers:
            listed = ", ".join(providers)
            raise InvalidArgument(
                f"{field}[{index}]",
                f"region {key!r} is of provider {provider!r}, which is not among the "
                f"providers {listed}",
                f"add {provider!r} to the providers, or name only regions of {listed}",
            )


def placement_in(prefix: str, request: grant_pb2.PlaceHoldRequest) -> Placement:
    """Convert a hold's placement; each region must read ``<provider>/<region>``."""
    regions = names_in(f"{prefix}placement_regions", request.placement_regions)
    for i, key in enumerate(regions):
        provider, _, region = key.partition("/")
        if not provider or not region:
            raise InvalidArgument(
                f"{prefix}placement_regions[{i}]",
                f"{key!r} is not '<provider>/<region>'",
                "name the provider and the region, e.g. 'cloud-a/us-east'",
            )
    model = text_in(f"{prefix}accelerator_model", request.accelerator_model, required=False)
    return Placement(regions, model)


def tier_in(field: str, value: int) -> Tier:
    tier = TIERS.get(value)  # type: ignore[call-overload]
    if tier is None:
        raise InvalidArgument(
            field, f"{value} is not a tier", "use exploratory, standard or flagship"
        )
    return tier


def rate_policy_in(value: int) -> RatePolicy:
    if value == grant_pb2.RATE_POLICY_FIXED_AT_AWARD:
        return RatePolicy.FIXED_AT_AWARD
    return RatePolicy.CURRENT


def rate_policy_out(value: str) -> int:
    if value == RatePolicy.FIXED_AT_AWARD:
        return grant_pb2.RATE_POLICY_FIXED_AT_AWARD
    return grant_pb2.RATE_POLICY_CURRENT


def institution_out(row: asyncpg.Record) -> grant_pb2.Institution:
    message = grant_pb2.Institution(
        institution_id=row["id"], display_name=row["name"], country_code=row["country_code"]
    )
    time_out(row["created_at"], message.create_time)
    return message


def project_out(row: asyncpg.Record, members: Sequence[asyncpg.Record]) -> grant_pb2.Project:
    message = grant_pb2.Project(
        project_id=row["id"],
        institution_id=row["institution_id"],
        display_name=row["name"],
        pi_subject=row["pi"],
        members=[
            grant_pb2.ProjectMember(subject=m["member"], role=ROLE_OUT[m["role"]]) for m in members
        ],
    )
    time_out(row["created_at"], message.create_time)
    return message


def balance_out(balance: RolledBalance) -> grant_pb2.Balance:
    return grant_pb2.Balance(
        credited_pf_days=amount_out(balance.credited),
        held_pf_days=amount_out(balance.held),
        charged_pf_days=amount_out(balance.charged),
        refunded_pf_days=amount_out(balance.refunded),
        delegated_pf_days=amount_out(balance.delegated),
        available_pf_days=amount_out(balance.available),
        sub_allocations_available_pf_days=amount_out(balance.sub_allocations_available),
        sub_allocations_held_pf_days=amount_out(balance.sub_allocations_held),
        sub_allocations_charged_pf_days=amount_out(balance.sub_allocations_charged),
    )


def grant_state_out(row: asyncpg.Record, now: datetime) -> int:
    if row["expired"]:
        return grant_pb2.GRANT_STATE_EXPIRED
    if now < row["starts_at"]:
        return grant_pb2.GRANT_STATE_PENDING
    return grant_pb2.GRANT_STATE_ACTIVE


def grant_out(
    row: asyncpg.Record,
    institution_id: str,
    balance: RolledBalance,
    now: datetime,
    tier_limits: Mapping[Tier, Decimal],
) -> grant_pb2.Grant:
    """Convert a grant row; ``tier_limits`` (PF-days by tier) bound its one supplement."""
    tier = Tier(row["tier"])
    # check_supplement allows one supplement of at most half the tier's limit.
    supplement_limit = Decimal(0) if row["supplemented"] else tier_limits[tier] / 2
    message = grant_pb2.Grant(
        grant_id=row["id"],
        project_id=row["project_id"],
        institution_id=institution_id,
        tier=TIER_OUT[tier],
        constraints=grant_pb2.GrantConstraints(
            providers=row["providers"],
            regions=row["regions"],
            accelerator_models=row["accelerator_models"],
        ),
        rate_policy=rate_policy_out(row["rate_policy"]),  # type: ignore[arg-type]
        rate_card_version=row["rate_card_version"] or 0,
        state=grant_state_out(row, now),  # type: ignore[arg-type]
        application_id=row["application_id"] or "",
        supplemented=row["supplemented"],
        balance=balance_out(balance),
        # NOTE: the weight is the credited budget in PF-days; the scheduler may scale it.
        fair_share_weight=amount_out(row["credited"]),
        supplement_limit_pf_days=amount_out(supplement_limit),
    )
    time_out(row["starts_at"], message.validity.start_time)
    time_out(row["ends_at"], message.validity.end_time)
    time_out(row["created_at"], message.create_time)
    return message


def hold_out(row: asyncpg.Record) -> grant_pb2.Hold:
    return grant_pb2.Hold(
        hold_id=row["id"],
        grant_id=row["grant_id"],
        sub_allocation_id=row["allocation_id"] or "",
        job_id=row["job_id"],
        held_pf_days=amount_out(row["amount"]),
        charged_pf_days=amount_out(row["charged"]),
        released_pf_days=amount_out(row["released"]),
        settled=row["settled"],
    )


def entry_out(row: asyncpg.Record, postings: Sequence[asyncpg.Record]) -> grant_pb2.LedgerEntry:
    message = grant_pb2.LedgerEntry(
        entry_id=row["id"],
        kind=ENTRY_KINDS[EntryKind(row["kind"])],
        grant_id=row["grant_id"],
        sub_allocation_id=row["allocation_id"] or "",
        hold_id=row["hold_id"] or "",
        job_id=row["job_id"],
        amount_pf_days=amount_out(row["amount"]),
        postings=[
            grant_pb2.Posting(account=p["account"], amount_pf_days=signed_out(p["amount"]))
            for p in postings
        ],
        idempotency_key=row["idempotency_key"],
        cause=common_pb2.Cause(
            trigger=row["trigger"],
            reference_id=row["idempotency_key"],
            actor=row["actor"],
            reason=row["reason"],
        ),
    )
    time_out(row["created_at"], message.cause.time)
    time_out(row["created_at"], message.create_time)
    return message


def signed_out(value: Decimal) -> common_pb2.Decimal:
    if value < 0:
        return common_pb2.Decimal(value="-" + format_amount(-value))
    return amount_out(value)
