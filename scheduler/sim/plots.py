"""PNG plots of a replay (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from scheduler.engine import MILLIS_PER_ACCELERATOR, PriorityClass
from scheduler.sim.replay import ReplayResult

DAY = 86_400.0


def write_plots(result: ReplayResult, out: Path) -> list[Path]:
    """Write the plots into ``out`` and return their paths."""
    return [
        _utilization_over_time(result, out / "utilization.png"),
        _delay_cdf(result, out / "queueing_delay_cdf.png"),
        _stranded_over_time(result, out / "stranded.png"),
    ]


def _utilization_over_time(result: ReplayResult, path: Path) -> Path:
    capacity: dict[str, int] = {}
    for pool, count in result.capacity.items():
        model = pool.rsplit("/", 1)[1]
        capacity[model] = capacity.get(model, 0) + count
    figure, axes = plt.subplots(figsize=(10, 4))
    days = [(s.time - result.start) / DAY for s in result.samples]
    for model in sorted(capacity):
        share = [
            s.used_by_model.get(model, 0) / (capacity[model] * MILLIS_PER_ACCELERATOR)
            for s in result.samples
        ]
        axes.plot(days, share, label=model, linewidth=0.8)
    axes.set_xlabel("days since trace start")
    axes.set_ylabel("accelerators in use (fraction)")
    axes.set_ylim(0, 1.05)
    axes.legend(loc="upper left", fontsize="small", ncol=4)
    axes.set_title("Utilization per accelerator model")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _delay_cdf(result: ReplayResult, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    for priority in PriorityClass:
        delays = sorted(
            max(run.first_start - run.trace.arrival, 0.1)
            for run in result.runs.values()
            if run.first_start is not None and run.trace.priority is priority
        )
        if delays:
            fractions = [(i + 1) / len(delays) for i in range(len(delays))]
            axes.step(delays, fractions, where="post", label=priority.name.lower())
    axes.set_xscale("log")
    axes.set_xlabel("queueing delay (s, log; 0 drawn at 0.1)")
    axes.set_ylabel("fraction of jobs")
    axes.legend()
    axes.set_title("Queueing delay by priority class")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _stranded_over_time(result: ReplayResult, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(10, 3))
    points = [
        ((s.time - result.start) / DAY, s.stranded_fraction)
        for s in result.samples
        if s.stranded_fraction is not None
    ]
    if points:
        axes.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.8)
    note = stranded_note(points)
    if note is not None:
        # An empty or flat plot alone looks like a failed run.
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center")
        axes.set_ylim(0, 1)
    axes.set_xlabel("days since trace start")
    axes.set_ylabel("stranded fraction")
    axes.set_title("Free capacity no waiting job fits into")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def stranded_note(points: list[tuple[float, float]]) -> str | None:
    """Return the note for a stranded plot that shows nothing, or None if it shows some.

    ``points`` are (day, stranded fraction) of the samples at which a job waited for
    capacity; other samples have no stranded fraction.
    """
    if not points:
        return "no job waited for capacity, so no free capacity was stranded"
    if all(fraction == 0 for _, fraction in points):
        return (
            "jobs waited for capacity, but none was stranded:\n"
            "no free accelerator or share was too small for the smallest waiting job"
        )
    return None
