"""Settings of the grant service: program limits, event thresholds and ledger batching."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from services.grant.amounts import format_amount
from services.grant.review_rules import ExploratoryCaps, Tier
from services.runtime.settings import Settings, SettingsError, setting

MAX_EXPLORATORY_PERIOD_DAYS = 3660
"""Ten years, in days. The bound keeps the period's start a valid timestamp."""


def _parse_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("no service name given")
    return names


@dataclass(frozen=True)
class GrantSettings(Settings):
    """Settings read once from ``ACSP_*`` variables at start."""

    exploratory_limit_pf_days: Decimal = setting(
        "ACSP_GRANT_EXPLORATORY_LIMIT_PF_DAYS",
        Decimal(10),
        "largest exploratory request in PF-days; these are awarded without review",
        minimum=0,
    )
    # Two full exploratory grants a PI and twenty an institution per year, before the program
    # office reviews further ones.
    exploratory_pi_limit_pf_days: Decimal = setting(
        "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS",
        Decimal(20),
        "PF-days that the projects led by one PI may be awarded without review per period;"
        " further exploratory applications go to peer review",
        minimum=0,
    )
    exploratory_institution_limit_pf_days: Decimal = setting(
        "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS",
        Decimal(200),
        "PF-days that the projects of one institution may be awarded without review per"
        " period; further exploratory applications go to peer review",
        minimum=0,
    )
    exploratory_period_days: int = setting(
        "ACSP_GRANT_EXPLORATORY_PERIOD_DAYS",
        365,
        f"days of the rolling period over which awards without review are summed, at most"
        f" {MAX_EXPLORATORY_PERIOD_DAYS}",
        minimum=1,
    )
    standard_limit_pf_days: Decimal = setting(
        "ACSP_GRANT_STANDARD_LIMIT_PF_DAYS", Decimal(500), "largest standard request, PF-days"
    )
    flagship_limit_pf_days: Decimal = setting(
        "ACSP_GRANT_FLAGSHIP_LIMIT_PF_DAYS", Decimal(5000), "largest flagship request, PF-days"
    )
    # Five years of 365 days plus the two leap days such a span can contain.
    max_validity_days: int = setting(
        "ACSP_GRANT_MAX_VALIDITY_DAYS",
        1827,
        "longest validity window of an application or grant, extensions included, in days",
        minimum=1,
    )
    budget_low_fraction: Decimal = setting(
        "ACSP_GRANT_BUDGET_LOW_FRACTION",
        Decimal("0.1"),
        "share of a grant's credited budget below which one budget-low event is sent (0..1)",
        minimum=0,
    )
    expiring_soon_days: float = setting(
        "ACSP_GRANT_EXPIRING_SOON_DAYS",
        14.0,
        "days before a grant's end at which one expiring-soon event is sent",
        minimum=0,
    )
    expiry_interval_s: float = setting(
        "ACSP_GRANT_EXPIRY_INTERVAL_S",
        60.0,
        "seconds between scans for grants whose window ended",
        minimum=0.05,
    )
    outbox_interval_s: float = setting(
        "ACSP_GRANT_OUTBOX_INTERVAL_S",
        0.5,
        "seconds between polls of the event outbox when it was empty",
        minimum=0.01,
    )
    max_event_rejections: int = setting(
        "ACSP_GRANT_MAX_EVENT_REJECTIONS",
        5,
        "times JetStream may reject a grant event for good (over the stream's max_msg_size, no"
        " stream for its subject) before the event moves to the grant.dead_events table",
        minimum=1,
    )
    ledger_workers: int = setting(
        "ACSP_GRANT_LEDGER_WORKERS",
        4,
        "ledger transactions run at once; keep it below ACSP_DB_POOL_MAX",
        minimum=1,
    )
    ledger_max_batch: int = setting(
        "ACSP_GRANT_LEDGER_MAX_BATCH",
        64,
        "most ledger requests applied in one transaction; 1 gives one transaction per request",
        minimum=1,
    )
    ledger_max_queue: int = setting(
        "ACSP_GRANT_LEDGER_MAX_QUEUE",
        4096,
        "ledger requests that may wait, split evenly across the workers; more get UNAVAILABLE",
        minimum=1,
    )
    money_services: frozenset[str] = setting(
        "ACSP_GRANT_MONEY_SERVICES",
        frozenset({"scheduler", "metering"}),
        "comma-separated service identities allowed to hold, charge, release and refund",
        parse=_parse_names,
    )

    scheduler_address: str | None = setting(
        "ACSP_SCHEDULER_ADDRESS",
        None,
        "host:port of the scheduler, whose registered providers and regions an award's limits"
        " are checked against; unset checks only their format",
    )
    service_token_file: Path | None = setting(
        "ACSP_GRANT_SERVICE_TOKEN_FILE",
        None,
        "file holding the bearer token this service presents to the scheduler",
        existing_file=True,
    )

    def tier_limits(self) -> dict[Tier, Decimal]:
        return {
            Tier.EXPLORATORY: self.exploratory_limit_pf_days,
            Tier.STANDARD: self.standard_limit_pf_days,
            Tier.FLAGSHIP: self.flagship_limit_pf_days,
        }

    def exploratory_caps(self) -> ExploratoryCaps:
        return ExploratoryCaps(
            pi_limit=self.exploratory_pi_limit_pf_days,
            institution_limit=self.exploratory_institution_limit_pf_days,
            period_days=self.exploratory_period_days,
        )

    def validate(self) -> None:
        super().validate()
        if self.exploratory_period_days > MAX_EXPLORATORY_PERIOD_DAYS:
            raise SettingsError(
                "ACSP_GRANT_EXPLORATORY_PERIOD_DAYS",
                f"{self.exploratory_period_days} is above the maximum"
                f" {MAX_EXPLORATORY_PERIOD_DAYS}",
                "give a period of at most ten years in days, e.g. 365",
            )
        if self.exploratory_pi_limit_pf_days > self.exploratory_institution_limit_pf_days:
            raise SettingsError(
                "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS",
                f"{format_amount(self.exploratory_pi_limit_pf_days)} PF-days is above the"
                " per-institution limit ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS of"
                f" {format_amount(self.exploratory_institution_limit_pf_days)} PF-days",
                "lower the per-PI limit or raise the per-institution limit",
            )
        if self.budget_low_fraction > 1:
            raise SettingsError(
                "ACSP_GRANT_BUDGET_LOW_FRACTION",
                f"{format_amount(self.budget_low_fraction)} is above 1",
                "give a share between 0 and 1, e.g. 0.1",
            )
