"""``acsp simulate``: replay a job trace on a fleet through the placement engine.

With no arguments it replays the Alibaba openb trace shipped in ``data/openb/``. The run is
in virtual time and needs no mesh; it writes ``summary.json`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from acsp.cli._common import EXIT_OK, EXIT_USAGE, CommandError

if TYPE_CHECKING:
    from scheduler.sim.runner import SimulationConfig
    from scheduler.sim.traces import TraceJob

MAX_TRACE_SECONDS: Final = 1e10
"""Largest arrival or run time taken from a trace, in seconds (about 317 years).

Real traces stay far below it; at 1e308 the replay's float arithmetic divides by zero.
"""


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
    # A NaN passes a plain `<= 0` test and makes the replay loop forever.
    if not 0 < args.time_scale < math.inf:
        raise CommandError(
            f"--time-scale {args.time_scale} is invalid; give a finite factor above 0", EXIT_USAGE
        )
    if not 0 < args.half_life < math.inf:
        raise CommandError(
            f"--half-life {args.half_life} is invalid; give a finite number of seconds above 0",
            EXIT_USAGE,
        )
    trace = args.trace or OPENB_PODS
    fleet = args.fleet or OPENB_NODES
    for option, path in (("--trace", trace), ("--fleet", fleet)):
        if not path.is_file():
            raise CommandError(f"{option} {path}: not found or not a file", EXIT_USAGE)
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
    _check_inputs(config)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            f"--out {args.out}: cannot create the folder ({exc.strerror}); "
            "name a folder you can write",
            EXIT_USAGE,
        ) from None
    summary = simulate(config)
    _print_summary(summary, args.out)
    _warn_deleted_before_start(summary)
    if trace.suffix.lower() == ".swf":
        _warn_skipped_rows(summary, trace)
    return EXIT_OK


def _warn_skipped_rows(summary: dict[str, Any], trace: Path) -> None:
    """Warn on stderr about the trace rows the replay left out.

    The first line counts them by reason, and the next lines name the first few rows of each
    reason by file and line.
    """
    skipped = {
        reason: count for reason, count in summary["inputs"]["skipped_rows"].items() if count
    }
    total = sum(skipped.values())
    if not total:
        return
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
    lines = [
        f"warning: skipped {total} trace row{'' if total == 1 else 's'} ({reasons}); "
        "summary.json counts them under inputs.skipped_rows"
    ]
    examples = summary["inputs"].get("skipped_examples", [])
    lines += [f"  {trace}:{row['line']}: {row['reason']}: {row['detail']}" for row in examples]
    if len(examples) < total:
        lines.append(f"  ({total - len(examples)} more not shown)")
    sys.stderr.write("\n".join(lines) + "\n")


def _warn_deleted_before_start(summary: dict[str, Any]) -> None:
    """Warn on stderr about trace rows that the replay left out for ending before they start."""
    from scheduler.sim.traces import DELETED_BEFORE_START

    count = summary["inputs"]["skipped_rows"].get(DELETED_BEFORE_START, 0)
    if count:
        sys.stderr.write(
            f"warning: skipped {count} trace row{'' if count == 1 else 's'} whose deletion_time "
            "is before its creation_time or scheduled_time; summary.json counts them under "
            f"inputs.skipped_rows.{DELETED_BEFORE_START}\n"
        )


def _check_inputs(config: SimulationConfig) -> None:
    """Load the trace and the fleet once to reject bad files before the replay starts.

    The replay loads them again: a second read of a trace costs far less than the replay.
    """
    from scheduler.sim.runner import load_trace
    from scheduler.sim.traces import load_openb_nodes

    expected = "an SWF file" if config.trace.suffix.lower() == ".swf" else "an openb pod CSV"
    try:
        trace = load_trace(config)
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as exc:
        raise CommandError(
            f"--trace {config.trace}: cannot read it as {expected} ({_describe(exc)})",
            EXIT_USAGE,
        ) from None
    if not trace.jobs:
        raise CommandError(
            f"--trace {config.trace}: no job to replay (rows skipped: {trace.skipped}); "
            f"give {expected} with jobs that request accelerators",
            EXIT_USAGE,
        )
    for job in trace.jobs:
        times = (
            ("arrival", job.arrival),
            ("run time", job.runtime),
            ("wall time", job.wall_time_s),
        )
        for field, value in times:
            if not 0 <= value <= MAX_TRACE_SECONDS:
                raise CommandError(
                    f"--trace {config.trace}: job {job.name} has an invalid {field} of {value} s; "
                    f"times must be finite, from 0 to {MAX_TRACE_SECONDS:.0e} s",
                    EXIT_USAGE,
                )
    _check_job_specs(config, trace.jobs)
    try:
        nodes = load_openb_nodes(config.fleet)
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as exc:
        raise CommandError(
            f"--fleet {config.fleet}: cannot read it as an openb node CSV ({_describe(exc)})",
            EXIT_USAGE,
        ) from None
    if not nodes:
        raise CommandError(
            f"--fleet {config.fleet}: no node with accelerators; give an openb node CSV "
            "with columns sn, gpu and model",
            EXIT_USAGE,
        )


def _check_job_specs(config: SimulationConfig, jobs: Sequence[TraceJob]) -> None:
    """Submit every job to a throwaway engine, so that the rows it rejects fail the command.

    The replay submits the same specs, and a row the engine rejects there (a negative GPU
    count, a model outside the catalog, a repeated name) would end it with a traceback.
    """
    from scheduler.engine.catalog import Catalog
    from scheduler.engine.engine import Engine
    from scheduler.engine.spec import EngineConfig, InvalidInputError
    from scheduler.sim.replay import job_spec

    engine = Engine(EngineConfig(half_life_s=config.half_life_s), Catalog())
    for job in jobs:
        try:
            engine.submit(job_spec(job))
        except InvalidInputError as exc:
            raise CommandError(
                f"--trace {config.trace}: {exc}; fix or remove that row", EXIT_USAGE
            ) from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing column {exc}"
    return str(exc)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    jobs = summary["jobs"]
    lines = [
        f"jobs: {jobs['replayed']} replayed, {jobs['completed']} completed, "
        f"{jobs['never_started']} never started, {jobs['preemptions']} preemptions",
        f"utilization by model: {json.dumps(_rounded(summary['utilization']['by_model']))}",
        _delay_line(summary["queueing_delay_s"]["by_class"]),
        "Jain fairness over projects: "
        + _fmt(summary["jain_fairness_projects"], "n/a, no job completed"),
        "stranded by fragmentation (mean): "
        + _fmt(
            summary["stranded_fraction"]["mean"],
            "n/a, no job waited for capacity at a sample time",
        ),
        f"PF-days delivered: {summary['pf_days_delivered']['total']}",
        f"replay took {summary['wall_clock_s']} s for {summary['passes']} passes",
        f"wrote {', '.join([str(out / 'summary.json'), *summary.get('plots', [])])}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def _delay_line(by_class: dict[str, dict[str, Any]]) -> str:
    """Write the queueing delay of each class that started a job, and name the others."""
    started = [
        f"{name} {_fmt(d['p50'])}/{_fmt(d['p99'])}" for name, d in by_class.items() if d["jobs"]
    ]
    idle = [name for name, d in by_class.items() if not d["jobs"]]
    if not started:
        return "queueing delay p50/p99 (s): n/a, no job started"
    line = "queueing delay p50/p99 (s): " + ", ".join(started)
    if idle:
        line += f" (no job of class {', '.join(idle)} started)"
    return line


def _fmt(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.4g}"


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in values.items()}
