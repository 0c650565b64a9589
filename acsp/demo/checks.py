"""The checks the demo runs on its own report; each returns whether it passed and why."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

CHARGE_TOLERANCE_PF_DAYS = Decimal("1e-18")
"""Largest gap allowed between charges and priced usage: rounding of each charge to the
ledger quantum (1e-24 PF-day) over up to a million samples."""


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail}


def run_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the result of every check; the demo exits non-zero if any did not pass."""
    ledger = report["ledger"]
    ingest = report["metering"]["ingest"]
    agents = report["metering"]["agents"] or {}
    jobs = report["jobs"]
    postings = Decimal(ledger["postings_sum_pf_days"])
    charged = Decimal(ingest.get("charged_pf_days", "0"))
    # The ledger nets refunds out of ``charged``; metering counts charges before refunds.
    ledger_charged = Decimal(report["pf_days"]["charged_gross"])
    priced = Decimal(ingest.get("priced_usage_pf_days", "0"))
    made = agents.get("usage_samples")
    ingested = ingest.get("samples_ingested")
    pending = agents.get("outbox_pending")
    dropped = (agents.get("outbox") or {}).get("dropped")
    unexplained = jobs["unexplained"]
    checks = [
        _check(
            "ledger postings sum to zero",
            postings == 0,
            f"sum of postings {postings} PF-days over {ledger['entry_count']} entries",
        ),
        _check(
            "no grant balance is negative",
            not ledger["negative_grant_ids"] and not report["grants"]["negative"],
            f"negative in the ledger summary: {ledger['negative_grant_ids'] or 'none'}; "
            f"negative available balances: {report['grants']['negative'] or 'none'}",
        ),
        _check(
            "charges equal metered usage times the rates",
            abs(charged - priced) <= CHARGE_TOLERANCE_PF_DAYS
            and charged == ledger_charged
            and ingest.get("uncommitted_charges") == 0,
            f"metering charged {charged}, usage times rates {priced}, grant ledgers "
            f"charged {ledger_charged} PF-days; "
            f"{ingest.get('uncommitted_charges')} charges not yet in the ledger",
        ),
        _check(
            "samples published equal samples ingested",
            made is not None and made == ingested and pending == 0 and dropped == 0,
            f"agents made {made} samples ({pending} messages unsent, {dropped} dropped); "
            f"metering ingested {ingested} "
            f"({ingest.get('duplicates_ignored')} duplicates ignored)",
        ),
        _check(
            "every job is finished or pending with a reason",
            not unexplained and not report["jobs"]["not_submitted"],
            f"{len(unexplained)} jobs neither finished nor pending with a reason "
            f"{unexplained[:5]}; {report['jobs']['not_submitted']} submissions rejected",
        ),
        _check(
            "live and simulated agree within the tolerance",
            report["comparison"]["accelerator_seconds"]["within"]
            and report["comparison"]["queueing_delay_p50"]["within"],
            "accelerator-seconds differ by "
            f"{report['comparison']['accelerator_seconds']['relative_difference']:.1%} "
            f"(at most {report['comparison']['accelerator_seconds']['tolerance']:.0%}); "
            "queueing delay p50 within "
            f"{report['comparison']['queueing_delay_p50']['allowance_s']:g} trace s: "
            f"{report['comparison']['queueing_delay_p50']['within']}",
        ),
    ]
    return checks
