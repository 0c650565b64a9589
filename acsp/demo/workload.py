"""The demo's workload: a slice of the openb trace in compressed time, and who pays for it.

Jobs come from :func:`scheduler.sim.traces.load_openb_pods` (the gpuspec33 pod list, so a third
of the jobs name the accelerator models they accept), and each belongs to the project that
:func:`scheduler.sim.accounts.assign_account` gives its pod name and the seed: 48 projects in
12 institutions. Two changes make the slice playable in minutes, and both apply to the live
run and to the simulator run beside it:

- a gap between two arrivals longer than ``max_gap_s`` is cut to ``max_gap_s`` (the trace has
  idle stretches of days);
- a run time longer than ``max_runtime_s`` is cut to ``max_runtime_s`` (a few pods run for
  months).

Live, every trace second then lasts ``1 / speed`` wall seconds: arrivals are submitted at
``(arrival - first arrival) / speed`` and the agents play run times ``speed`` times faster.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Final

from scheduler.sim.accounts import INSTITUTIONS, PROJECTS
from scheduler.sim.traces import OPENB_PODS, TraceJob, load_openb_pods

TIERS: Final = ("exploratory", "exploratory", "standard", "flagship")
"""Tier of project ``p``: ``TIERS[p mod 4]``, so half the projects are exploratory."""
TIER_BUDGET_PF_DAYS: Final = {
    "exploratory": Decimal(10),
    "standard": Decimal(400),
    "flagship": Decimal(2000),
}
"""Requested (and awarded) budget per tier, within the grant service's default tier limits."""


@dataclass(frozen=True, slots=True)
class ProjectPlan:
    project_id: str
    institution_id: str
    pi_subject: str
    tier: str
    requested_pf_days: Decimal
    reviewer_subject: str
    """Reviewer for reviewed tiers, from the next institution (no conflict of interest)."""
    reviewer_institution_id: str


def project_plans() -> list[ProjectPlan]:
    """Return the 48 projects of :mod:`scheduler.sim.accounts` with their tier and reviewer."""
    plans = []
    for index in range(PROJECTS):
        institution = index % INSTITUTIONS
        reviewer_institution = (institution + 1) % INSTITUTIONS
        tier = TIERS[index % len(TIERS)]
        plans.append(
            ProjectPlan(
                project_id=f"proj-{index:02d}",
                institution_id=f"inst-{institution:02d}",
                pi_subject=f"pi-{index:02d}@inst-{institution:02d}",
                tier=tier,
                requested_pf_days=TIER_BUDGET_PF_DAYS[tier],
                reviewer_subject=f"reviewer@inst-{reviewer_institution:02d}",
                reviewer_institution_id=f"inst-{reviewer_institution:02d}",
            )
        )
    return plans


@dataclass(frozen=True, slots=True)
class Workload:
    jobs: tuple[TraceJob, ...]
    """Jobs with compressed arrivals (trace seconds from the first) and capped run times."""
    speed: float
    max_gap_s: float
    max_runtime_s: float
    skipped: dict[str, int]
    """Trace rows left out by the loader, by reason."""

    @property
    def span_s(self) -> float:
        """Trace seconds from the first arrival to the last."""
        return self.jobs[-1].arrival if self.jobs else 0.0

    def wall_offset_s(self, job: TraceJob) -> float:
        return job.arrival / self.speed


def build_workload(
    jobs: int | None, seed: int, speed: float, max_gap_s: float, max_runtime_s: float
) -> Workload:
    """Load the first ``jobs`` GPU jobs by arrival (all when None) and compress them."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    loaded = load_openb_pods(OPENB_PODS, jobs, seed)
    return Workload(
        compress(loaded.jobs, max_gap_s, max_runtime_s),
        speed,
        max_gap_s,
        max_runtime_s,
        dict(loaded.skipped),
    )


def compress(
    jobs: Sequence[TraceJob], max_gap_s: float, max_runtime_s: float
) -> tuple[TraceJob, ...]:
    """Cut long arrival gaps and run times; the first arrival becomes time 0."""
    result = []
    previous: float | None = None
    clock = 0.0
    for job in jobs:
        if previous is not None:
            clock += min(job.arrival - previous, max_gap_s)
        previous = job.arrival
        runtime = min(job.runtime, max_runtime_s)
        limit = wall_time_limit_s(runtime)
        result.append(replace(job, arrival=clock, runtime=runtime, wall_time_s=limit))
    return tuple(result)


def wall_time_limit_s(runtime_s: float) -> int:
    """Wall-time limit in trace seconds: the run time plus 10 %, so the run ends first.

    Agents play the limit at the same speed as the run time.
    """
    return max(1, math.ceil(runtime_s * 1.1) + 1)


def request_id(run_id: str, job: TraceJob) -> str:
    """Idempotency key of a job's submission in one run: a retry returns the job first created.

    The run id keeps a second run on the same database from getting the first run's jobs back.
    """
    digest = hashlib.sha256(f"{run_id}:{job.name}".encode()).hexdigest()[:16]
    return f"demo-{digest}"
