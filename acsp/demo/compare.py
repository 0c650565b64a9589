"""The simulator on the same slice, fleet and seed, and the tolerance the live run must meet.

Live figures are converted to trace seconds (wall seconds times the speed) before they are
compared with the simulator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from acsp.demo.fleet import FleetPlan
from acsp.demo.workload import Workload
from scheduler.engine import Catalog, Engine, EngineConfig, PriorityClass
from scheduler.sim.metrics import percentile
from scheduler.sim.replay import Replay, ReplayResult

LIVE_HALF_LIFE_S: Final = 7 * 86_400.0
"""The scheduler service's default fair-share half-life, wall seconds."""
UTILIZATION_TOLERANCE: Final = 0.15
"""Largest relative difference of accelerator-seconds delivered, live against simulated.

Live runs lose work to injected faults (the simulator has none) and placement may pick other
nodes of the same model, so the two never match exactly.
"""
DELAY_LATENCY_ALLOWANCE_WALL_S: Final = 0.5
"""Wall seconds a live queueing delay p50 may exceed the simulated one.

The simulator places a job at its arrival instant, and the demo's slice leaves most jobs no
wait, so the simulated p50 is 0. The live p50 then measures what the mesh adds: the scheduler
pass that the submission triggers, the hold at the grant service, the start command over NATS
and the agent's report that every task started. Two runs of the default demo on a 2-core
machine measured a live p50 of 0.065 to 0.07 wall seconds in each class. The allowance leaves
room for a machine several times slower. Starts that waited for the scheduler's periodic pass
(every 1 s, so 0.5 s at the median) instead of the pass a submission triggers would exceed it.
At speed ``x`` it is ``0.5 x`` trace seconds, 4,000 at the default 8,000.
"""


@dataclass(frozen=True, slots=True)
class Simulated:
    result: ReplayResult
    summary: dict[str, Any]


def simulate_slice(fleet: FleetPlan, workload: Workload) -> Simulated:
    """Replay the demo's compressed slice on the demo's fleet through the engine."""
    catalog = Catalog()
    # The live scheduler decays fair-share usage with a half-life of 7 wall days. The
    # simulator runs in trace seconds, so its half-life is stretched by the speed.
    engine = Engine(EngineConfig(half_life_s=LIVE_HALF_LIFE_S * workload.speed), catalog)
    result = Replay(engine, fleet.engine_nodes(), workload.jobs).run()
    delays: dict[str, list[float]] = {c.name.lower(): [] for c in PriorityClass}
    for run in result.runs.values():
        if run.first_start is not None:
            delays[run.trace.priority.name.lower()].append(run.first_start - run.trace.arrival)
    by_region: dict[str, Decimal] = {}
    by_model: dict[str, Decimal] = {}
    for pool, seconds in result.accelerator_seconds.items():
        provider, region, model = pool.split("/")
        key = f"{provider}/{region}"
        by_region[key] = by_region.get(key, Decimal(0)) + seconds
        by_model[model] = by_model.get(model, Decimal(0)) + seconds
    summary = {
        "started": sum(1 for r in result.runs.values() if r.first_start is not None),
        "completed": sum(1 for r in result.runs.values() if r.end is not None),
        "never_started": len(result.never_started),
        "accelerator_seconds_by_region": {k: float(v) for k, v in sorted(by_region.items())},
        "accelerator_seconds_by_model": {k: float(v) for k, v in sorted(by_model.items())},
        "queueing_delay_s": {
            name: {"jobs": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for name, v in delays.items()
        },
        "span_s": result.end - result.start,
    }
    return Simulated(result, summary)


def relative_difference(live: float, simulated: float) -> float:
    if simulated == 0:
        return 0.0 if live == 0 else float("inf")
    return abs(live - simulated) / simulated


def compare(
    live_seconds_total: float,
    live_delay_p50_by_class: dict[str, float | None],
    simulated: Simulated,
    speed: float,
) -> dict[str, Any]:
    """Compare live and simulated figures (both in trace seconds) with the stated tolerances."""
    sim_total = sum(simulated.summary["accelerator_seconds_by_region"].values())
    difference = relative_difference(live_seconds_total, sim_total)
    delays = []
    allowance = DELAY_LATENCY_ALLOWANCE_WALL_S * speed
    for name, live_p50 in sorted(live_delay_p50_by_class.items()):
        sim_p50 = simulated.summary["queueing_delay_s"][name]["p50"]
        if live_p50 is None or sim_p50 is None:
            continue
        delays.append(
            {
                "class": name,
                "live_p50_s": live_p50,
                "simulated_p50_s": sim_p50,
                "within": abs(live_p50 - sim_p50) <= allowance,
            }
        )
    return {
        "accelerator_seconds": {
            "live": live_seconds_total,
            "simulated": sim_total,
            "relative_difference": difference,
            "tolerance": UTILIZATION_TOLERANCE,
            "within": difference <= UTILIZATION_TOLERANCE,
        },
        "queueing_delay_p50": {
            "allowance_s": allowance,
            "allowance_wall_s": DELAY_LATENCY_ALLOWANCE_WALL_S,
            "by_class": delays,
            "within": all(item["within"] for item in delays),
        },
    }


def live_delays(values: Sequence[float]) -> float | None:
    return percentile(values, 0.5)
