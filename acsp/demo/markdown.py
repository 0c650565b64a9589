"""``report.md``: the report's figures as Markdown tables, and the summary printed at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
        _table(
            ["refunded job", "charged PF-days", "refunded PF-days"],
            [
                [row["job_id"], row["charged_pf_days"], row["refunded_pf_days"]]
                for row in document["pf_days"]["refunds"].get("by_job", [])
            ],
        ),
        _table(
            ["refund reason", "refunds"],
            sorted(document["pf_days"]["refunds"]["by_reason"].items()),
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
        f"PF-days charged {document['pf_days']['charged']} after refunds of "
        f"{document['pf_days']['refunded']}",
    ]
    for check in document["checks"]:
        mark = "ok  " if check["passed"] else "FAIL"
        lines.append(f"{mark} {check['name']}: {check['detail']}")
    lines.append(f"wall clock {document['wall_clock_s']} s")
    return "\n".join(lines) + "\n"
