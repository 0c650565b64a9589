"""Run a whole simulation: load the inputs, replay, write ``summary.json`` and plots."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scheduler.engine import Catalog, Engine, EngineConfig, NodeSpec
from scheduler.sim.metrics import summarize
from scheduler.sim.plots import write_plots
from scheduler.sim.replay import SAMPLE_INTERVAL_S, Replay
from scheduler.sim.traces import (
    OPENB_NODES,
    OPENB_PODS,
    LoadedTrace,
    load_openb_nodes,
    load_openb_pods,
    load_swf,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    trace: Path = OPENB_PODS
    """An openb-style pod CSV, or an SWF file (``.swf``)."""
    fleet: Path = OPENB_NODES
    out: Path = Path("sim-out")
    jobs: int | None = None
    """Replay only the first ``jobs`` jobs by arrival."""
    seed: int = 0
    """Seed of the project assignment of traces without users."""
    half_life_s: float = 86_400.0
    time_scale: float = 1.0
    """Factor on arrival times; below 1 compresses arrivals and so raises the load."""
    plots: bool = True


def load_trace(config: SimulationConfig) -> LoadedTrace:
    if config.time_scale <= 0:
        raise ValueError(f"time_scale: {config.time_scale} must be > 0")
    if config.trace.suffix.lower() == ".swf":
        trace = load_swf(config.trace, config.jobs, config.seed)
    else:
        trace = load_openb_pods(config.trace, config.jobs, config.seed)
    if config.time_scale == 1.0:
        return trace
    jobs = tuple(replace(job, arrival=job.arrival * config.time_scale) for job in trace.jobs)
    return replace(trace, jobs=jobs)


def simulate(config: SimulationConfig) -> dict[str, Any]:
    """Replay the trace on the fleet, write the outputs into ``config.out``, return the summary."""
    trace = load_trace(config)
    nodes: list[NodeSpec] = load_openb_nodes(config.fleet)
    catalog = Catalog()
    engine = Engine(EngineConfig(half_life_s=config.half_life_s), catalog)
    logger.info("replaying %s jobs of %s on %s nodes", len(trace.jobs), trace.source, len(nodes))
    # Sample as often in trace time whatever the time scale, but at most every 10 virtual s.
    interval = max(10.0, SAMPLE_INTERVAL_S * config.time_scale)
    result = Replay(engine, nodes, trace.jobs, interval).run()
    summary = summarize(result, catalog)
    summary["inputs"] = {
        "trace": str(config.trace),
        "fleet": str(config.fleet),
        "nodes": len(nodes),
        "accelerators": sum(len(n.accelerator_ids) for n in nodes),
        "skipped_rows": trace.skipped,
        "skipped_examples": [
            {"line": row.line, "reason": row.reason, "detail": row.detail}
            for row in trace.skipped_examples
        ],
        "seed": config.seed,
        "half_life_s": config.half_life_s,
        "time_scale": config.time_scale,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.plots:
        summary["plots"] = [str(p) for p in write_plots(result, config.out)]
    return summary
