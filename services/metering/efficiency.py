"""Efficiency: per-attempt utilization, sustained low use flagged as waste, per-model reports.

The rules are pure functions over samples; the queries around them read PostgreSQL. Waste
is flagged when ListJobEfficiency reads an attempt and, for every ended attempt, by the
background scan in :mod:`services.metering.waste_scan`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from services.metering.samples import micros_to_seconds

MAX_GAP = timedelta(seconds=120)
"""Samples further apart than this break a run of low utilization (the agent was silent)."""


@dataclass(frozen=True, slots=True)
class UtilizationPoint:
    start_time: datetime
    end_time: datetime
    utilization: float


@dataclass(frozen=True, slots=True)
class JobEfficiency:
    job_id: str
    attempt: int
    project_id: str
    mean_utilization: float
    """Weighted by accelerator-seconds."""
    median_utilization: float
    low_utilization_seconds: float
    """Maximum run of consecutive samples below the threshold, seconds of wall time."""
    flagged_waste: bool
    accelerator_hours: Decimal
    low_run_start: datetime | None
    low_run_end: datetime | None


@dataclass(frozen=True, slots=True)
class LowRun:
    """The maximum stretch of consecutive samples below the threshold."""

    seconds: float
    start: datetime | None
    end: datetime | None


def longest_low_run(points: Sequence[UtilizationPoint], threshold: float) -> LowRun:
    """Return the longest wall-time run of samples with utilization below ``threshold``."""
    best = LowRun(0.0, None, None)
    run_start: datetime | None = None
    last_end: datetime | None = None
    for point in sorted(points, key=lambda p: p.start_time):
        low = point.utilization < threshold
        contiguous = last_end is not None and point.start_time - last_end <= MAX_GAP
        if not low:
            run_start = None
        elif run_start is None or not contiguous:
            run_start = point.start_time
        if run_start is not None:
            seconds = (point.end_time - run_start).total_seconds()
            if seconds > best.seconds:
                best = LowRun(seconds, run_start, point.end_time)
        last_end = point.end_time
    return best


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else 0.0


async def job_efficiency(
    conn: asyncpg.Connection,
    *,
    project_id: str,
    after: tuple[str, int] | None,
    limit: int,
    threshold: float,
    sustained_s: float,
) -> list[JobEfficiency]:
    """Compute one page of attempts (ordered by job id and attempt) with their efficiency,
    and store a waste flag for each newly flagged one."""
    attempts = await conn.fetch(
        """
        SELECT j.job_id, j.attempt, j.project_id,
               coalesce(sum(up.accelerator_micros), 0) AS micros,
               coalesce(sum(up.utilization_seconds), 0) AS used,
               coalesce(sum(up.utilization_weight), 0) AS weight
        FROM metering.jobs j
        JOIN metering.usage_periods up ON up.job_id = j.job_id AND up.attempt = j.attempt
        WHERE ($1 = '' OR j.project_id = $1)
          AND ($2::text IS NULL OR (j.job_id, j.attempt) > ($2, $3))
        GROUP BY j.job_id, j.attempt, j.project_id
        ORDER BY j.job_id, j.attempt
        LIMIT $4
        """,
        project_id,
        after[0] if after else None,
        after[1] if after else 0,
        limit,
    )
    results = [await evaluate_attempt(conn, row, threshold, sustained_s) for row in attempts]
    await record_waste_flags(conn, results, threshold)
    return results


async def evaluate_attempt(
    conn: asyncpg.Connection, usage: asyncpg.Record, threshold: float, sustained_s: float
) -> JobEfficiency:
    """Compute one attempt's efficiency from its samples.

    ``usage`` has ``job_id``, ``attempt``, ``project_id`` and the attempt's summed
    ``micros``, ``used`` and ``weight`` from ``metering.usage_periods``.
    """
    samples = await conn.fetch(
        "SELECT start_time, end_time, utilization FROM metering.usage_samples "
        "WHERE job_id = $1 AND attempt = $2 AND utilization IS NOT NULL",
        usage["job_id"],
        usage["attempt"],
    )
    points = [UtilizationPoint(s[0], s[1], s[2]) for s in samples]
    run = longest_low_run(points, threshold)
    weight = usage["weight"]
    return JobEfficiency(
        job_id=usage["job_id"],
        attempt=usage["attempt"],
        project_id=usage["project_id"],
        mean_utilization=usage["used"] / weight if weight else 0.0,
        median_utilization=median(p.utilization for p in points),
        low_utilization_seconds=run.seconds,
        flagged_waste=run.seconds >= sustained_s,
        low_run_start=run.start,
        low_run_end=run.end,
        accelerator_hours=micros_to_seconds(usage["micros"]) / 3600,
    )


async def record_waste_flags(
    conn: asyncpg.Connection, results: Sequence[JobEfficiency], threshold: float
) -> None:
    """Store a waste flag for each flagged attempt that has none yet.

    A new flag is published once as a WasteFlagEvent by services.metering.waste_events.
    """
    flagged = [r for r in results if r.flagged_waste]
    if not flagged:
        return
    await conn.executemany(
        """
        INSERT INTO metering.waste_flags
            (job_id, attempt, project_id, window_start, window_end, mean_utilization,
             threshold)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (job_id, attempt) DO NOTHING
        """,
        [
            (
                r.job_id,
                r.attempt,
                r.project_id,
                r.low_run_start,
                r.low_run_end,
                r.mean_utilization,
                threshold,
            )
            for r in flagged
        ],
    )


@dataclass(frozen=True, slots=True)
class ModelReport:
    accelerator_model: str
    accelerator_hours: Decimal
    fatal_events: int
    failures_per_thousand_hours: float
    mean_utilization: float


async def model_report(
    conn: asyncpg.Connection, start: datetime, end: datetime
) -> list[ModelReport]:
    """Per accelerator model: hours delivered, fatal health events and mean utilization."""
    usage = await conn.fetch(
        """
        SELECT accelerator_model, sum(accelerator_micros) AS micros,
               sum(utilization_seconds) AS used, sum(utilization_weight) AS weight
        FROM metering.usage_periods
        WHERE period_start >= $1 AND period_start < $2
        GROUP BY accelerator_model
        """,
        start,
        end,
    )
    # A health event names an accelerator; its model is the one its usage samples report.
    failures = await conn.fetch(
        """
        SELECT m.accelerator_model, count(*) AS fatal
        FROM metering.health_events h
        JOIN LATERAL (
            SELECT accelerator_model FROM metering.usage_samples s
            WHERE s.accelerator_id = h.accelerator_id LIMIT 1
        ) m ON true
        WHERE h.fatal AND h.event_time >= $1 AND h.event_time < $2
        GROUP BY m.accelerator_model
        """,
        start,
        end,
    )
    fatal = {row["accelerator_model"]: int(row["fatal"]) for row in failures}
    reports = []
    for row in sorted(usage, key=lambda r: r["accelerator_model"]):
        hours = micros_to_seconds(row["micros"]) / 3600
        model = row["accelerator_model"]
        count = fatal.get(model, 0)
        reports.append(
            ModelReport(
                accelerator_model=model,
                accelerator_hours=hours,
                fatal_events=count,
                failures_per_thousand_hours=float(count * 1000 / hours) if hours else 0.0,
                mean_utilization=row["used"] / row["weight"] if row["weight"] else 0.0,
            )
        )
    return reports
