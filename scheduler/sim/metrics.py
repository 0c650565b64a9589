"""Figures of a replay: utilization, queueing delay, completion time, fairness, PF-days."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from acsp.decimals import exact_sum, format_decimal
from scheduler.engine import Catalog, PriorityClass
from scheduler.sim.replay import ReplayResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the ``q`` quantile (0..1) by linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "jobs": len(values),
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
    }


def jain_index(values: Iterable[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all are equal."""
    items = list(values)
    squares = sum(x * x for x in items)
    if not items or squares == 0:
        return None
    return sum(items) ** 2 / (len(items) * squares)


def summarize(result: ReplayResult, catalog: Catalog) -> dict[str, Any]:
    """Build the ``summary.json`` document of a replay."""
    span = max(result.end - result.start, 1.0)
    by_pool = {
        pool: float(seconds / (result.capacity[pool] * Decimal(repr(span))))
        for pool, seconds in sorted(result.accelerator_seconds.items())
    }
    delays_by_class: dict[str, list[float]] = {c.name.lower(): [] for c in PriorityClass}
    delays_by_institution: dict[str, list[float]] = {}
    completion: list[float] = []
    speed_by_project: dict[str, list[float]] = {}
    for run in result.runs.values():
        if run.first_start is None:
            continue
        trace = run.trace
        delay = run.first_start - trace.arrival
        delays_by_class[trace.priority.name.lower()].append(delay)
        delays_by_institution.setdefault(trace.account.institution, []).append(delay)
        if run.end is not None:
            completion.append(run.end - trace.arrival)
            speed = trace.runtime / (run.end - trace.arrival)
            speed_by_project.setdefault(trace.account.project, []).append(speed)
    pf_days: dict[str, Decimal] = {}
    for pool, seconds in result.accelerator_seconds.items():
        model = pool.rsplit("/", 1)[1]
        delivered = catalog.get(model).pf_days(seconds)
        pf_days[model] = exact_sum((pf_days.get(model, Decimal(0)), delivered))
    stranded = [s.stranded_fraction for s in result.samples if s.stranded_fraction is not None]
    return {
        "jobs": {
            "replayed": len(result.runs),
            "started": sum(1 for r in result.runs.values() if r.first_start is not None),
            "completed": len(completion),
            "never_started": len(result.never_started),
            "preemptions": sum(r.preemptions for r in result.runs.values()),
            "requeues": sum(r.requeues for r in result.runs.values()),
        },
        "virtual_span_s": span,
        "passes": result.passes,
        "wall_clock_s": round(result.wall_clock_s, 3),
        "utilization": {
            "by_pool": by_pool,
            "by_region": _weighted(result, span, lambda pool: pool.rsplit("/", 1)[0]),
            "by_model": _weighted(result, span, lambda pool: pool.rsplit("/", 1)[1]),
        },
        "queueing_delay_s": {
            "by_class": {name: distribution(v) for name, v in delays_by_class.items()},
            "by_institution": {
                name: distribution(v) for name, v in sorted(delays_by_institution.items())
            },
        },
        "job_completion_time_s": distribution(completion),
        "jain_fairness_projects": jain_index(
            sum(v) / len(v) for _, v in sorted(speed_by_project.items())
        ),
        "stranded_fraction": {
            "mean": sum(stranded) / len(stranded) if stranded else None,
            "max": max(stranded) if stranded else None,
            "samples": len(stranded),
        },
        "pf_days_delivered": {
            "total": format_decimal(exact_sum(pf_days.values())),
            "by_model": {model: format_decimal(value) for model, value in sorted(pf_days.items())},
        },
    }


def _weighted(result: ReplayResult, span: float, key: Any) -> dict[str, float]:
    seconds: dict[str, Decimal] = {}
    capacity: dict[str, int] = {}
    for pool, value in result.accelerator_seconds.items():
        group = key(pool)
        seconds[group] = seconds.get(group, Decimal(0)) + value
        capacity[group] = capacity.get(group, 0) + result.capacity[pool]
    return {
        group: float(seconds[group] / (capacity[group] * Decimal(repr(span))))
        for group in sorted(seconds)
    }
