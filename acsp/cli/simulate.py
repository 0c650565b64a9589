"""``acsp simulate``: replay a job trace on a fleet through the placement engine.

With no arguments it replays the Alibaba openb trace shipped in ``data/openb/``. The run is
in virtual time and needs no mesh; it writes ``summary.json`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from acsp.cli._common import EXIT_OK, EXIT_USAGE, CommandError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="replay a job trace on a fleet through the placement engine",
        description=(
            "Replay a job trace (openb pod CSV, or SWF when the file ends in .swf) on a fleet "
            "(openb node CSV) in virtual time, and write summary.json and plots."
        ),
    )
    parser.add_argument(
        "--trace", type=Path, default=None, help="job trace (default: the openb gpuspec33 pods)"
    )
    parser.add_argument(
        "--fleet", type=Path, default=None, help="node list CSV (default: the openb GPU nodes)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("sim-out"), help="output folder (default: sim-out)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="replay only the first N jobs by arrival"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the project assignment (default: 0)"
    )
    parser.add_argument(
        "--half-life",
        type=float,
        default=86_400.0,
        help="fair-share usage half-life in seconds (default: 86400)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="factor on arrival times; 0.01 makes arrivals 100 times denser (default: 1)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write summary.json only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scheduler.sim.runner import SimulationConfig, simulate
    from scheduler.sim.traces import OPENB_NODES, OPENB_PODS

    if args.jobs is not None and args.jobs <= 0:
        raise CommandError(f"--jobs {args.jobs} must be a positive count", EXIT_USAGE)
    if args.time_scale <= 0:
        raise CommandError(f"--time-scale {args.time_scale} must be > 0", EXIT_USAGE)
    if args.half_life <= 0:
        raise CommandError(f"--half-life {args.half_life} must be > 0 seconds", EXIT_USAGE)
    trace = args.trace or OPENB_PODS
    fleet = args.fleet or OPENB_NODES
    for option, path in (("--trace", trace), ("--fleet", fleet)):
        if not path.is_file():
            raise CommandError(f"{option} {path}: file not found", EXIT_USAGE)
    config = SimulationConfig(
        trace=trace,
        fleet=fleet,
        out=args.out,
        jobs=args.jobs,
        seed=args.seed,
        half_life_s=args.half_life,
        time_scale=args.time_scale,
        plots=not args.no_plots,
    )
    summary = simulate(config)
    _print_summary(summary, args.out)
    return EXIT_OK


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    jobs = summary["jobs"]
    delay = summary["queueing_delay_s"]["by_class"]
    lines = [
        f"jobs: {jobs['replayed']} replayed, {jobs['completed']} completed, "
        f"{jobs['never_started']} never started, {jobs['preemptions']} preemptions",
        f"utilization by model: {json.dumps(_rounded(summary['utilization']['by_model']))}",
        "queueing delay p50/p99 (s): "
        + ", ".join(f"{name} {_fmt(d['p50'])}/{_fmt(d['p99'])}" for name, d in delay.items()),
        f"Jain fairness over projects: {_fmt(summary['jain_fairness_projects'])}",
        f"stranded by fragmentation (mean): {_fmt(summary['stranded_fraction']['mean'])}",
        f"PF-days delivered: {summary['pf_days_delivered']['total']}",
        f"replay took {summary['wall_clock_s']} s for {summary['passes']} passes",
        f"wrote {out / 'summary.json'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in values.items()}
