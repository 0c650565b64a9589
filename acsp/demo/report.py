"""Build ``report.json`` and ``report.md`` from what the live run and the simulator produced."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acsp.decimals import exact_sum, format_decimal
from acsp.demo import plots
from acsp.demo.collect import JobRecord, LiveFigures, Settlement
from acsp.demo.compare import Simulated, compare
from acsp.demo.fleet import FleetPlan
from acsp.demo.live import LiveRun
from acsp.demo.markdown import markdown
from acsp.demo.setup import AwardedGrant, FleetSetup
from acsp.demo.workload import Workload
from scheduler.engine import PriorityClass
from scheduler.sim.metrics import jain_index, percentile

if TYPE_CHECKING:
    from acsp.demo.runner import DemoConfig

FINISHED = ("completed", "failed", "cancelled", "timed_out")


def _delays_by_class(jobs: Sequence[JobRecord], workload: Workload) -> dict[str, list[float]]:
    """Queueing delay of each started job in trace seconds, by priority class."""
    by_name = {job.name: job for job in workload.jobs}
    delays: dict[str, list[float]] = {c.name.lower(): [] for c in PriorityClass}
    for record in jobs:
        if record.start_time is None or record.submit_time is None:
            continue
        trace = by_name[record.name]
        wall = max(record.start_time - record.submit_time, 0.0)
        delays[trace.priority.name.lower()].append(wall * workload.speed)
    return delays


def _jain_over_projects(jobs: Sequence[JobRecord], workload: Workload) -> float | None:
    """Jain's index over projects of the mean slowdown inverse (run time over time in system)."""
    by_name = {job.name: job for job in workload.jobs}
    speeds: dict[str, list[float]] = {}
    for record in jobs:
        if record.state != "completed" or record.end_time is None or record.submit_time is None:
            continue
        trace = by_name[record.name]
        in_system = max((record.end_time - record.submit_time) * workload.speed, trace.runtime)
        speeds.setdefault(trace.account.project, []).append(trace.runtime / in_system)
    return jain_index(sum(v) / len(v) for _, v in sorted(speeds.items()))


def _jobs_section(figures: LiveFigures, run: LiveRun, workload: Workload) -> dict[str, Any]:
    by_state: dict[str, int] = {}
    pending_by_reason: dict[str, int] = {}
    unexplained = []
    for record in figures.jobs:
        by_state[record.state] = by_state.get(record.state, 0) + 1
        if record.state == "pending":
            reason = record.pending_reason
            if reason and reason != "unspecified":
                pending_by_reason[reason] = pending_by_reason.get(reason, 0) + 1
            else:
                unexplained.append(record.job_id)
        elif record.state not in FINISHED:
            unexplained.append(record.job_id)
    seen = {record.job_id for record in figures.jobs}
    missing = [job_id for job_id in run.job_ids.values() if job_id not in seen]
    return {
        "in_slice": len(workload.jobs),
        "submitted": len(run.job_ids),
        "not_submitted": len(run.rejected),
        "rejections": dict(list(run.rejected.items())[:10]),
        "completed": by_state.get("completed", 0),
        "failed": by_state.get("failed", 0),
        "timed_out": by_state.get("timed_out", 0),
        "cancelled": by_state.get("cancelled", 0),
        "pending": by_state.get("pending", 0),
        "pending_by_reason": pending_by_reason,
        "by_state": by_state,
        "requeued": sum(1 for r in figures.jobs if r.attempt > 1),
        "unexplained": unexplained + missing,
    }


def _utilization(
    seconds_by_key: dict[str, float], capacity: dict[str, int], span_s: float
) -> dict[str, float]:
    return {
        key: seconds_by_key.get(key, 0.0) / (count * span_s) if count and span_s else 0.0
        for key, count in sorted(capacity.items())
    }


def _live_seconds(
    rows: dict[str, dict[str, str]], speed: float, keys: Sequence[str]
) -> dict[str, float]:
    """Metered accelerator-hours per row key, in trace accelerator-seconds, matched to ``keys``."""
    result: dict[str, float] = {}
    for key, row in rows.items():
        seconds = float(Decimal(row["accelerator_hours"]) * 3600) * speed
        match = next((k for k in keys if k == key or k.endswith(f"/{key}")), key)
        result[match] = result.get(match, 0.0) + seconds
    return result


def _capacity_by(fleet: FleetPlan) -> tuple[dict[str, int], dict[str, int]]:
    """Return accelerators per ``provider/region`` and per model."""
    by_region: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for pool, count in fleet.capacity().items():
        provider, region, model = pool.split("/")
        by_region[f"{provider}/{region}"] = by_region.get(f"{provider}/{region}", 0) + count
        by_model[model] = by_model.get(model, 0) + count
    return by_region, by_model


def _utilization_section(
    fleet: FleetPlan, figures: LiveFigures, simulated: Simulated, speed: float
) -> dict[str, Any]:
    region_capacity, model_capacity = _capacity_by(fleet)
    span = max(simulated.summary["span_s"], 1.0)
    live_region = _live_seconds(figures.usage_by_region, speed, list(region_capacity))
    live_model = _live_seconds(figures.usage_by_model, speed, list(model_capacity))
    sim_region = simulated.summary["accelerator_seconds_by_region"]
    sim_model = simulated.summary["accelerator_seconds_by_model"]
    return {
        "window_trace_s": span,
        "by_region": {
            "live": _utilization(live_region, region_capacity, span),
            "simulated": _utilization(sim_region, region_capacity, span),
        },
        "by_model": {
            "live": _utilization(live_model, model_capacity, span),
            "simulated": _utilization(sim_model, model_capacity, span),
        },
        "metered_by_region": figures.usage_by_region,
    }


def _inputs_section(config: DemoConfig, workload: Workload) -> dict[str, Any]:
    return {
        "trace": "Alibaba openb pod list with GPU-model constraints (gpuspec33)",
        "jobs_in_slice": len(workload.jobs),
        "seed": config.seed,
        "speed": workload.speed,
        "max_gap_s": workload.max_gap_s,
        "max_runtime_s": workload.max_runtime_s,
        "trace_span_s": workload.span_s,
        "wall_span_s": workload.span_s / workload.speed,
        "skipped_rows": workload.skipped,
        "account_rule": "project = sha256(f'{seed}:{pod name}') mod 48, institution = "
        "project mod 12 (scheduler.sim.accounts)",
    }


def _fleet_section(fleet: FleetPlan, fleet_setup: FleetSetup) -> dict[str, Any]:
    return {
        "regions": [
            {
                "provider": r.provider,
                "region": r.region,
                "nodes": len(r.nodes),
                "accelerators_by_model": r.accelerators_by_model(),
                "simulated_fleet": r.simulated_fleet,
            }
            for r in fleet.regions
        ],
        "setup_calls": fleet_setup.calls,
        "unimplemented_rpcs": fleet_setup.unimplemented,
        "failed_calls": fleet_setup.failed,
    }


def _grants_section(grants: Sequence[AwardedGrant], figures: LiveFigures) -> dict[str, Any]:
    return {
        "count": len(grants),
        "reviewed": sum(g.reviewed for g in grants),
        "by_tier": {
            tier: sum(1 for g in grants if g.tier == tier)
            for tier in ("exploratory", "standard", "flagship")
        },
        "awarded_pf_days": format_decimal(exact_sum(g.awarded_pf_days for g in grants)),
        "negative": [g for g, b in figures.balances.items() if Decimal(b["available"]) < 0],
    }


def _pf_days_section(figures: LiveFigures) -> dict[str, Any]:
    def total(field: str) -> Decimal:
        return exact_sum(Decimal(b[field]) for b in figures.balances.values())

    charged = total("charged")
    refunded = total("refunded")
    return {
        "charged": format_decimal(charged),
        "charged_gross": format_decimal(exact_sum((charged, refunded))),
        "refunded": format_decimal(refunded),
        "held_at_end": format_decimal(total("held")),
        "refunds": figures.refunds,
    }


def build(
    config: DemoConfig,
    fleet: FleetPlan,
    workload: Workload,
    grants: Sequence[AwardedGrant],
    fleet_setup: FleetSetup,
    run: LiveRun,
    figures: LiveFigures,
    settled: Settlement,
    simulated: Simulated,
) -> dict[str, Any]:
    """Assemble the report document (without the checks, which run on it afterwards)."""
    speed = workload.speed
    delays = _delays_by_class(figures.jobs, workload)
    live_total = float(Decimal(figures.ingest["accelerator_seconds"])) * speed
    comparison = compare(
        live_total, {name: percentile(v, 0.5) for name, v in delays.items()}, simulated, speed
    )
    return {
        "inputs": _inputs_section(config, workload),
        "fleet": _fleet_section(fleet, fleet_setup),
        "grants": _grants_section(grants, figures),
        "jobs": _jobs_section(figures, run, workload),
        "pf_days": _pf_days_section(figures),
        "metering": {
            "settled": settled.settled,
            "waited_s": round(settled.waited_s, 1),
            "ingest": figures.ingest,
            "agents": figures.agent_stats,
            "ingest_when_settled": settled.ingest,
        },
        "utilization": _utilization_section(fleet, figures, simulated, speed),
        "queueing_delay_s": {
            "live": {
                name: {"jobs": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
                for name, v in delays.items()
            },
            "simulated": simulated.summary["queueing_delay_s"],
        },
        "fairness": {
            "jain_index_projects_live": _jain_over_projects(figures.jobs, workload),
            "jain_index_projects_simulated": _sim_jain(simulated),
        },
        "settlement": figures.settlements,
        "ledger": figures.ledger,
        "comparison": comparison,
        "replay": {
            "submitted_within_s": round(run.submitted_by, 1),
            "drained_after_s": round(run.drained_by, 1),
        },
    }


def _sim_jain(simulated: Simulated) -> float | None:
    speeds: dict[str, list[float]] = {}
    for run in simulated.result.runs.values():
        if run.end is None:
            continue
        trace = run.trace
        speeds.setdefault(trace.account.project, []).append(
            trace.runtime / max(run.end - trace.arrival, trace.runtime)
        )
    return jain_index(sum(v) / len(v) for _, v in sorted(speeds.items()))


def write(
    document: dict[str, Any],
    run: LiveRun,
    figures: LiveFigures,
    grants: Sequence[AwardedGrant],
    workload: Workload,
    simulated: Simulated,
    out: Path,
) -> None:
    """Write the plots, ``report.json``, ``report.md`` and ``progress.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    delays = _delays_by_class(figures.jobs, workload)
    tiers = {grant.grant_id: grant.tier for grant in grants}
    written = plots.write_plots(document, run, simulated, delays, tiers, out)
    document["plots"] = [path.name for path in written]
    (out / "report.json").write_text(json.dumps(document, indent=2, default=json_value) + "\n")
    (out / "report.md").write_text(markdown(document))
    (out / "progress.json").write_text(
        json.dumps([asdict(sample) for sample in run.progress], default=json_value) + "\n"
    )


def json_value(value: object) -> str:
    """Convert a value that JSON has no type for to text.

    A Decimal is written in plain notation, and anything else with ``str()``.
    """
    if isinstance(value, Decimal):
        return format_decimal(value)
    return str(value)
