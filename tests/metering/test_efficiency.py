"""Efficiency reports on real utilization: a slice of the Alibaba GenAI duty-cycle trace."""

from __future__ import annotations

import csv
import functools
import statistics
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pytest

from acsp.subjects import usage_subject
from services.metering.efficiency import job_efficiency, model_report
from services.metering.ingest import UsageIngest
from services.runtime.db import Database
from tests.metering.helpers import T0, admit, report, running_ingest, sample, wait_until

TRACE = Path(__file__).parent / "data" / "genai_duty_cycle_slice.csv"


def load_trace() -> dict[str, list[float]]:
    """Return each container's duty cycle as utilization 0..1, in time order."""
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with TRACE.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["container_ip"]].append((float(row["timestamp_anon"]), float(row["value"])))
    return {key: [min(v / 100, 1.0) for _, v in sorted(pairs)] for key, pairs in rows.items()}


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_trace_jobs_flagged_by_idle_stretch(nats_url: str, db: Database) -> None:
    # Each trace row becomes a one-minute sample of one job (one container); the trace's own
    # spacing (about 171 s) is replaced by back-to-back minutes.
    trace = load_trace()
    async with running_ingest(nats_url, db) as (js, ingest):
        for number, (container, values) in enumerate(sorted(trace.items())):
            items = [
                sample(
                    f"node-1/{container}/{i}",
                    f"job-{container[:8]}",
                    T0 + timedelta(minutes=i),
                    utilization=value,
                    accelerator_id=f"GPU-{number}",
                )
                for i, value in enumerate(values)
            ]
            await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, len(trace)))
    for container in trace:
        await admit(db, f"job-{container[:8]}")

    async with db.acquire() as conn:
        rows = await job_efficiency(
            conn, project_id="proj-1", after=None, limit=10, threshold=0.1, sustained_s=1800
        )
        flagged = await conn.fetchval("SELECT count(*) FROM metering.waste_flags")
        models = await model_report(conn, T0, T0 + timedelta(days=1))

    by_job = {row.job_id: row for row in rows}
    assert len(by_job) == 3
    for container, values in trace.items():
        row = by_job[f"job-{container[:8]}"]
        assert row.mean_utilization == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert row.median_utilization == pytest.approx(statistics.median(values), abs=1e-6)
        longest = _longest_run_below(values, 0.1)
        assert row.low_utilization_seconds == longest * 60
        assert row.flagged_waste == (longest * 60 >= 1800)
    assert sorted(row.flagged_waste for row in rows) == [False, True, True]
    assert flagged == 2
    assert [m.accelerator_model for m in models] == ["A100-SXM4-80GB"]
    assert models[0].accelerator_hours == 3 * 6


def _longest_run_below(values: list[float], threshold: float) -> int:
    longest = current = 0
    for value in values:
        current = current + 1 if value < threshold else 0
        longest = max(longest, current)
    return longest
