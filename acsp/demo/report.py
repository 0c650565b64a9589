"""Build ``report.json`` and ``report.md`` from what the live run and the simulator produced."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acsp.demo import plots
from acsp.demo.collect import JobRecord, LiveFigures, Settlement
from acsp.demo.compare import Simulated, compare
from acsp.demo.fleet import FleetPlan
from acsp.demo.live import LiveRun
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
    speed = workload.speed
    region_capacity: dict[str, int] = {}
    model_capacity: dict[str, int] = {}
    for pool, count in fleet.capacity().items():
        provider, region, model = pool.split("/")
        region_capacity[f"{provider}/{region}"] = (
            region_capacity.get(f"{provider}/{region}", 0) + count
        )
        model_capacity[model] = model_capacity.get(model, 0) + count
    span = max(simulated.summary["span_s"], 1.0)
    live_region = _live_seconds(figures.usage_by_region, speed, list(region_capacity))
    live_model = _live_seconds(figures.usage_by_model, speed, list(model_capacity))
    sim_region = simulated.summary["accelerator_seconds_by_region"]
    sim_model = simulated.summary["accelerator_seconds_by_model"]
    delays = _delays_by_class(figures.jobs, workload)
    live_total = float(Decimal(figures.ingest["accelerator_seconds"])) * speed
    comparison = compare(
        live_total, {name: percentile(v, 0.5) for name, v in delays.items()}, simulated, speed
    )
    charged = sum((Decimal(b["charged"]) for b in figures.balances.values()), Decimal(0))
    refunded = sum((Decimal(b["refunded"]) for b in figures.balances.values()), Decimal(0))
    held = sum((Decimal(b["held"]) for b in figures.balances.values()), Decimal(0))
    negative = [g for g, b in figures.balances.items() if Decimal(b["available"]) < 0]
    return {
        "inputs": {
            "trace": "Alibaba openb pod list with GPU-model constraints (gpuspec33)",
            "jobs_in_slice": len(workload.jobs),
            "seed": config.seed,
            "speed": speed,
            "max_gap_s": workload.max_gap_s,
            "max_runtime_s": workload.max_runtime_s,
            "trace_span_s": workload.span_s,
            "wall_span_s": workload.span_s / speed,
            "skipped_rows": workload.skipped,
            "account_rule": "project = sha256(f'{seed}:{pod name}') mod 48, institution = "
            "project mod 12 (scheduler.sim.accounts)",
        },
        "fleet": {
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
        },
        "grants": {
            "count": len(grants),
            "reviewed": sum(g.reviewed for g in grants),
            "by_tier": {
                tier: sum(1 for g in grants if g.tier == tier)
                for tier in ("exploratory", "standard", "flagship")
            },
            "awarded_pf_days": str(sum((g.awarded_pf_days for g in grants), Decimal(0))),
            "negative": negative,
        },
        "jobs": _jobs_section(figures, run, workload),
        "pf_days": {
            "charged": str(charged),
            "charged_gross": str(charged + refunded),
            "refunded": str(refunded),
            "held_at_end": str(held),
            "refunds": figures.refunds,
        },
        "metering": {
            "settled": settled.settled,
            "waited_s": round(settled.waited_s, 1),
            "ingest": figures.ingest,
            "agents": figures.agent_stats,
            "ingest_when_settled": settled.ingest,
        },
        "utilization": {
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
        },
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
    (out / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(document))
    (out / "progress.json").write_text(
        json.dumps([asdict(sample) for sample in run.progress], default=str) + "\n"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(document: dict[str, Any]) -> str:
    inputs = document["inputs"]
    jobs = document["jobs"]
    parts = [
        "# acsp demo report\n",
        f"{inputs['jobs_in_slice']} jobs of the {inputs['trace']}, seed {inputs['seed']}, "
        f"speed {inputs['speed']:g}x (arrival gaps cut to {inputs['max_gap_s']:g} s, run times "
        f"to {inputs['max_runtime_s']:g} s of trace time). Wall clock: "
        f"{document.get('wall_clock_s')} s.\n",
        "## Checks\n",
        _table(
            ["check", "passed", "detail"],
            [[c["name"], c["passed"], c["detail"]] for c in document.get("checks", [])],
        ),
        "## Jobs\n",
        _table(
            ["submitted", "completed", "failed", "timed out", "cancelled", "pending", "requeued"],
            [
                [
                    jobs["submitted"],
                    jobs["completed"],
                    jobs["failed"],
                    jobs["timed_out"],
                    jobs["cancelled"],
                    jobs["pending"],
                    jobs["requeued"],
                ]
            ],
        ),
        _table(["pending reason", "jobs"], sorted(jobs["pending_by_reason"].items())),
        "## PF-days\n",
        _table(
            ["charged", "refunded", "held at end", "refunds"],
            [
                [
                    document["pf_days"]["charged"],
                    document["pf_days"]["refunded"],
                    document["pf_days"]["held_at_end"],
                    document["pf_days"]["refunds"]["count"],
                ]
            ],
        ),
        "## Usage samples\n",
        _table(
            ["made by agents", "ingested", "duplicates ignored", "dead-lettered", "settled"],
            [
                [
                    (document["metering"]["agents"] or {}).get("usage_samples"),
                    document["metering"]["ingest"].get("samples_ingested"),
                    document["metering"]["ingest"].get("duplicates_ignored"),
                    document["metering"]["ingest"].get("dead_lettered"),
                    document["metering"]["settled"],
                ]
            ],
        ),
        "## Utilization (share of accelerator time over the simulated span)\n",
        _table(
            ["region", "live", "simulated"],
            [
                [k, v, document["utilization"]["by_region"]["simulated"].get(k)]
                for k, v in document["utilization"]["by_region"]["live"].items()
            ],
        ),
        _table(
            ["model", "live", "simulated"],
            [
                [k, v, document["utilization"]["by_model"]["simulated"].get(k)]
                for k, v in document["utilization"]["by_model"]["live"].items()
            ],
        ),
        "## Queueing delay (trace seconds)\n",
        _table(
            ["class", "jobs", "live p50", "live p99", "simulated p50", "simulated p99"],
            [
                [
                    name,
                    live["jobs"],
                    live["p50"],
                    live["p99"],
                    document["queueing_delay_s"]["simulated"][name]["p50"],
                    document["queueing_delay_s"]["simulated"][name]["p99"],
                ]
                for name, live in document["queueing_delay_s"]["live"].items()
            ],
        ),
        "## Fairness\n",
        _table(
            ["Jain's index over projects", "live", "simulated"],
            [
                [
                    "mean run time / time in system",
                    document["fairness"]["jain_index_projects_live"],
                    document["fairness"]["jain_index_projects_simulated"],
                ]
            ],
        ),
        "## Settlement per provider\n",
        _table(
            ["provider", "delivered PF-days", "refunded PF-days", "net PF-days", "pledge kept"],
            [
                [
                    p,
                    s.get("delivered_pf_days"),
                    s.get("refunded_pf_days"),
                    s.get("net_pf_days"),
                    s.get("pledge_kept", s.get("error")),
                ]
                for p, s in document["settlement"].items()
            ],
        ),
        "## Ledger\n",
        _table(
            ["postings sum", "entries", "negative grants"],
            [
                [
                    document["ledger"]["postings_sum_pf_days"],
                    document["ledger"]["entry_count"],
                    len(document["ledger"]["negative_grant_ids"]),
                ]
            ],
        ),
        "## Fleet\n",
        _table(
            ["provider", "region", "nodes", "accelerators", "simulated fleet"],
            [
                [
                    r["provider"],
                    r["region"],
                    r["nodes"],
                    ", ".join(f"{m} {c}" for m, c in sorted(r["accelerators_by_model"].items())),
                    r["simulated_fleet"],
                ]
                for r in document["fleet"]["regions"]
            ],
        ),
        _table(
            ["setup call", "target", "status"],
            [[c["rpc"], c["target"], c["status"]] for c in document["fleet"]["setup_calls"]],
        ),
        "## Plots\n",
        "".join(f"![{p}]({p})\n" for p in document.get("plots", [])),
    ]
    return "\n".join(parts)


def summary_lines(document: dict[str, Any]) -> str:
    jobs = document["jobs"]
    lines = [
        f"jobs: {jobs['submitted']} submitted, {jobs['completed']} completed, "
        f"{jobs['failed']} failed, {jobs['pending']} pending",
        f"PF-days charged {document['pf_days']['charged']}, refunded "
        f"{document['pf_days']['refunded']}",
    ]
    for check in document["checks"]:
        mark = "ok  " if check["passed"] else "FAIL"
        lines.append(f"{mark} {check['name']}: {check['detail']}")
    lines.append(f"wall clock {document['wall_clock_s']} s")
    return "\n".join(lines) + "\n"
