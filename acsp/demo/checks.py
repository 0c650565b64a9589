"""The checks the demo runs on its own report; each returns whether it passed and why."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from acsp.decimals import format_decimal

CHARGE_RULE = (
    "each charge line (one attempt, charging period, provider, region and model) costs its "
    "accelerator-seconds x peak TFLOP/s / 86,400,000 at the charge's rate-card version, "
    "rounded half-even to 1e-24 PF-day, and the charges must equal the sum of those line prices"
)
"""Metering's pricing rule. The charges check compares with equality, because a rounding that
departs from this rule by even one quantum is a metering fault."""


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail}


def run_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the result of every check; the demo exits non-zero if any did not pass."""
    checks = [
        *_ledger_checks(report),
        _charges_check(report),
        _refunds_check(report),
        _samples_check(report),
        _jobs_check(report),
        _comparison_check(report),
        _fleet_check(report),
    ]
    if report["inputs"].get("kill_metering_at_s") is not None:
        restarts = report.get("metering_restarts", [])
        checks.append(
            _check(
                "metering was killed and came back",
                len(restarts) == 1,
                f"restarts: {restarts or 'none'}",
            )
        )
    return checks


def _ledger_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    ledger = report["ledger"]
    postings = Decimal(ledger["postings_sum_pf_days"])
    negative = report["grants"]["negative"]
    return [
        _check(
            "ledger postings sum to zero",
            postings == 0,
            f"sum of postings {format_decimal(postings)} PF-days over {ledger['entry_count']} "
            "entries",
        ),
        _check(
            "no grant balance is negative",
            not ledger["negative_grant_ids"] and not negative,
            f"negative in the ledger summary: {ledger['negative_grant_ids'] or 'none'}; "
            f"negative available balances: {negative or 'none'}",
        ),
    ]


def _charges_check(report: dict[str, Any]) -> dict[str, Any]:
    ingest = report["metering"]["ingest"]
    charged = Decimal(ingest.get("charged_pf_days", "0"))
    priced = Decimal(ingest.get("priced_usage_pf_days", "0"))
    # The ledger nets refunds out of ``charged``; metering counts charges before refunds.
    ledger_charged = Decimal(report["pf_days"]["charged_gross"])
    uncommitted = ingest.get("uncommitted_charges")
    return _check(
        "charges equal metered usage times the rates",
        charged == priced and charged == ledger_charged and uncommitted == 0,
        f"metering charged {format_decimal(charged)}, metered usage priced by the rule "
        f"{format_decimal(priced)}, grant ledgers charged {format_decimal(ledger_charged)} "
        f"PF-days; {uncommitted} charges not yet in the ledger. Rule: {CHARGE_RULE}",
    )


def _refunds_check(report: dict[str, Any]) -> dict[str, Any]:
    refunds = report["pf_days"]["refunds"]
    by_job = refunds.get("by_job", [])
    over = [
        row["job_id"]
        for row in by_job
        if Decimal(row["refunded_pf_days"]) > Decimal(row["charged_pf_days"])
    ]
    return _check(
        "refunds do not exceed charges per job",
        not over and len(by_job) <= refunds["count"],
        f"{refunds['count']} refunds of {refunds['pf_days']} PF-days to {len(by_job)} jobs in "
        f"the grant ledgers; refunded more than charged: {over[:5] or 'none'}",
    )


def _samples_check(report: dict[str, Any]) -> dict[str, Any]:
    ingest = report["metering"]["ingest"]
    agents = report["metering"]["agents"] or {}
    made = agents.get("usage_samples")
    ingested = ingest.get("samples_ingested")
    pending = agents.get("outbox_pending")
    dropped = (agents.get("outbox") or {}).get("dropped")
    return _check(
        "samples published equal samples ingested",
        made is not None and made == ingested and pending == 0 and dropped == 0,
        f"agents made {made} samples ({pending} messages unsent, {dropped} dropped); "
        f"metering ingested {ingested} ({ingest.get('duplicates_ignored')} duplicates ignored)",
    )


def _jobs_check(report: dict[str, Any]) -> dict[str, Any]:
    unexplained = report["jobs"]["unexplained"]
    rejected = report["jobs"]["not_submitted"]
    return _check(
        "every job is finished or pending with a reason",
        not unexplained and not rejected,
        f"{len(unexplained)} jobs neither finished nor pending with a reason "
        f"{unexplained[:5]}; {rejected} submissions rejected",
    )


def _comparison_check(report: dict[str, Any]) -> dict[str, Any]:
    seconds = report["comparison"]["accelerator_seconds"]
    delays = report["comparison"]["queueing_delay_p50"]
    by_class = ", ".join(
        f"{item['class']} {item['live_p50_s']:.0f}/{item['simulated_p50_s']:.0f}"
        for item in delays.get("by_class", [])
    )
    verdict = "all within" if delays["within"] else "not all within"
    allowance = f"{delays['allowance_s']:g} s"
    if "allowance_wall_s" in delays:
        allowance += f" ({delays['allowance_wall_s']:g} wall s)"
    return _check(
        "live and simulated agree within the tolerance",
        seconds["within"] and delays["within"],
        f"accelerator-seconds differ by {seconds['relative_difference']:.1%} "
        f"(at most {seconds['tolerance']:.0%}); queueing delay p50 live/simulated in trace s: "
        f"{by_class or 'no class started a job'}, {verdict} {allowance}",
    )


def _fleet_check(report: dict[str, Any]) -> dict[str, Any]:
    """Pass when every provider, pledge and recall call succeeded; UNIMPLEMENTED fails too."""
    failed = report["fleet"]["failed_calls"]
    unimplemented = report["fleet"]["unimplemented_rpcs"]
    return _check(
        "provider, pledge and recall calls succeeded",
        not failed and not unimplemented,
        f"{len(failed)} failed {[(c['rpc'], c['target'], c['status']) for c in failed][:5]}; "
        f"not implemented by the scheduler: {unimplemented or 'none'}",
    )
