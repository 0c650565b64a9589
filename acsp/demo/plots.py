"""PNG plots of a demo run (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from acsp.demo.compare import Simulated
from acsp.demo.live import BalanceSample, LiveRun
from scheduler.engine import PriorityClass


def write_plots(
    document: dict[str, Any],
    run: LiveRun,
    simulated: Simulated,
    live_delays: dict[str, list[float]],
    grant_tiers: dict[str, str],
    out: Path,
) -> list[Path]:
    """Write the four plots into ``out`` and return their paths.

    ``live_delays`` maps each priority class to its queueing delays in trace seconds, and
    ``grant_tiers`` the tier of each grant id.
    """
    return [
        _utilization(run, out / "utilization_by_region.png"),
        _delays(document, live_delays, simulated, out / "queueing_delay_by_class.png"),
        _burn_down(grant_tiers, run, out / "grant_burn_down.png"),
        _settlement(document, out / "provider_settlement.png"),
    ]


def _utilization(run: LiveRun, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(9, 4))
    regions = sorted({r for s in run.progress for r in s.total_millis_by_region})
    for region in regions:
        points = [
            (s.elapsed_s, s.used_millis_by_region.get(region, 0) / s.total_millis_by_region[region])
            for s in run.progress
            if s.total_millis_by_region.get(region)
        ]
        axes.plot([p[0] for p in points], [p[1] for p in points], label=region, linewidth=1)
    axes.set_xlabel("wall seconds since the first submission")
    axes.set_ylabel("accelerators in use (fraction)")
    axes.set_title("Utilization per region (scheduler's view, live)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _delays(
    document: dict[str, Any], live: dict[str, list[float]], simulated: Simulated, path: Path
) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4))
    speed = document["inputs"]["speed"]
    for index, priority in enumerate(PriorityClass):
        name = priority.name.lower()
        color = f"C{index}"
        values = sorted(max(v, 1.0) for v in live.get(name, []))
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            axes.step(values, fractions, where="post", color=color, label=f"{name} live")
        sim = sorted(
            max(r.first_start - r.trace.arrival, 1.0)
            for r in simulated.result.runs.values()
            if r.first_start is not None and r.trace.priority is priority
        )
        if sim:
            fractions = [(i + 1) / len(sim) for i in range(len(sim))]
            axes.step(
                sim, fractions, where="post", color=color, linestyle="--", label=f"{name} simulated"
            )
    axes.set_xscale("log")
    axes.set_xlabel(f"queueing delay (trace s, log; 0 drawn at 1; 1 wall s = {speed:g} trace s)")
    axes.set_ylabel("fraction of started jobs")
    axes.set_title("Queueing delay by priority class")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _burn_down(tiers: dict[str, str], run: LiveRun, path: Path) -> Path:
    figure, (charged_axes, held_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for tier in ("exploratory", "standard", "flagship"):
        times = [elapsed for elapsed, _ in run.balances]
        charged = [_tier_sum(balances, tiers, tier, "charged") for _, balances in run.balances]
        held = [_tier_sum(balances, tiers, tier, "held") for _, balances in run.balances]
        charged_axes.plot(times, charged, label=tier)
        held_axes.plot(times, held, label=tier)
    for axes in (charged_axes, held_axes):
        axes.set_xlabel("wall seconds since the first submission")
        axes.legend(fontsize="small")
    charged_axes.set_ylabel("PF-days charged (sum over the tier's grants)")
    charged_axes.set_title("Grant burn-down: budget consumed")
    held_axes.set_ylabel("PF-days held by running jobs")
    held_axes.set_title("Budget reserved by holds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _settlement(document: dict[str, Any], path: Path) -> Path:
    providers = sorted(document["settlement"])
    delivered = [float(document["settlement"][p].get("delivered_pf_days", 0)) for p in providers]
    refunded = [float(document["settlement"][p].get("refunded_pf_days", 0)) for p in providers]
    figure, axes = plt.subplots(figsize=(6, 4))
    positions = range(len(providers))
    axes.bar([p - 0.2 for p in positions], delivered, width=0.4, label="delivered")
    axes.bar([p + 0.2 for p in positions], refunded, width=0.4, label="refunded")
    axes.set_xticks(list(positions), providers)
    axes.set_ylabel("PF-days")
    axes.set_title("Provider settlement")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _tier_sum(
    balances: dict[str, BalanceSample], tiers: dict[str, str], tier: str, field: str
) -> float:
    total = sum(
        (getattr(b, field) for g, b in balances.items() if tiers.get(g) == tier), Decimal(0)
    )
    return float(total)
