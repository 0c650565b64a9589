"""Replay a trace against a fleet through the engine in virtual time.

Events at one time are applied first (job ends, preemption deadlines, then arrivals), then the
engine runs one pass at that time and its decisions schedule the next events. A preempted job
restarts from scratch because the traces carry no checkpoints.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum

from scheduler.engine import (
    MILLIS_PER_ACCELERATOR,
    Engine,
    JobEnded,
    JobOutcome,
    JobSpec,
    NodeSpec,
    Place,
    Preempt,
    ReasonCode,
    Requeue,
    ScheduleResult,
)
from scheduler.sim.traces import TraceJob

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 3600.0
"""Default virtual seconds between fragmentation and utilization samples."""

_CAPACITY_WAITS = frozenset(
    {
        ReasonCode.NO_CAPACITY,
        ReasonCode.TOPOLOGY,
        ReasonCode.FAIR_SHARE,
        ReasonCode.PRIORITY,
        ReasonCode.RESERVATION,
    }
)


class _Kind(IntEnum):
    END = 0
    STOP = 1
    ARRIVAL = 2


@dataclass(slots=True)
class JobRun:
    """Outcome of one trace job in a replay."""

    trace: TraceJob
    first_start: float | None = None
    end: float | None = None
    attempt: int = 0
    started_at: float | None = None
    pool_millis: dict[str, int] = field(default_factory=dict)
    """``provider/region/model`` -> millis of the current attempt."""
    preemptions: int = 0
    requeues: int = 0


@dataclass(slots=True)
class Sample:
    time: float
    used_by_model: dict[str, int]
    """Millis in use per model."""
    stranded_fraction: float | None
    """Free capacity no waiting job fits into, over total capacity; ``None`` when none waits."""


@dataclass(slots=True)
class ReplayResult:
    runs: dict[str, JobRun]
    samples: list[Sample]
    accelerator_seconds: dict[str, Decimal]
    """Per ``provider/region/model``: accelerator-seconds delivered."""
    capacity: dict[str, int]
    """Per ``provider/region/model``: accelerators."""
    start: float
    end: float
    passes: int
    wall_clock_s: float
    never_started: list[str]


class Replay:
    """One replay of ``jobs`` on ``nodes`` through ``engine``."""

    def __init__(
        self,
        engine: Engine,
        nodes: Sequence[NodeSpec],
        jobs: Sequence[TraceJob],
        sample_interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self.sample_interval_s = sample_interval_s
        engine.add_nodes(nodes)
        self.capacity: dict[str, int] = {}
        self.node_pool: dict[str, str] = {}
        for spec in nodes:
            pool = f"{spec.provider}/{spec.region}/{spec.model}"
            self.capacity[pool] = self.capacity.get(pool, 0) + len(spec.accelerator_ids)
            self.node_pool[spec.node_id] = pool
        self.runs = {job.name: JobRun(job) for job in jobs}
        self.events: list[tuple[float, int, int, str, int]] = []
        self.sequence = 0
        for job in jobs:
            self._push(job.arrival, _Kind.ARRIVAL, job.name, 0)
        self.seconds: dict[str, Decimal] = {pool: Decimal(0) for pool in self.capacity}
        self.samples: list[Sample] = []
        self.passes = 0

    def _push(self, at: float, kind: _Kind, name: str, attempt: int) -> None:
        heapq.heappush(self.events, (at, int(kind), self.sequence, name, attempt))
        self.sequence += 1

    def run(self) -> ReplayResult:
        started = time.perf_counter()
        first = self.events[0][0] if self.events else 0.0
        now = first
        next_sample = first
        while self.events:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, kind, _, name, attempt = heapq.heappop(self.events)
                self._handle(_Kind(kind), name, attempt, now)
            result = self.engine.schedule(now)
            self.passes += 1
            self._apply(result)
            if now >= next_sample:
                self.samples.append(self._sample(now, result))
                next_sample = now + self.sample_interval_s
        never = sorted(name for name, run in self.runs.items() if run.first_start is None)
        return ReplayResult(
            runs=self.runs,
            samples=self.samples,
            accelerator_seconds=self.seconds,
            capacity=self.capacity,
            start=first,
            end=now,
            passes=self.passes,
            wall_clock_s=time.perf_counter() - started,
            never_started=never,
        )

    def _handle(self, kind: _Kind, name: str, attempt: int, now: float) -> None:
        run = self.runs[name]
        if kind is _Kind.ARRIVAL:
            self.engine.submit(job_spec(run.trace))
            return
        if attempt != run.attempt or run.started_at is None:
            return  # The attempt this event was for was preempted or requeued since.
        self._stop(run, now)
        if kind is _Kind.END:
            run.end = now
            self.engine.apply(JobEnded(name, JobOutcome.COMPLETED), now=now)
        else:
            run.preemptions += 1
            self.engine.apply(JobEnded(name, JobOutcome.PREEMPTED), now=now)

    def _stop(self, run: JobRun, now: float) -> None:
        assert run.started_at is not None
        elapsed = Decimal(repr(now - run.started_at))
        for pool, millis in run.pool_millis.items():
            self.seconds[pool] += elapsed * millis / MILLIS_PER_ACCELERATOR
        run.started_at = None
        run.pool_millis = {}

    def _apply(self, result: ScheduleResult) -> None:
        now = result.now
        for decision in result.decisions:
            if isinstance(decision, Place):
                run = self.runs[decision.job_id]
                run.attempt += 1
                run.started_at = now
                if run.first_start is None:
                    run.first_start = now
                for task in decision.tasks:
                    pool = self.node_pool[task.node_id]
                    millis = task.millis * len(task.accelerator_ids)
                    run.pool_millis[pool] = run.pool_millis.get(pool, 0) + millis
                self._push(now + run.trace.runtime, _Kind.END, decision.job_id, run.attempt)
            elif isinstance(decision, Preempt):
                run = self.runs[decision.job_id]
                self._push(max(now, decision.deadline), _Kind.STOP, decision.job_id, run.attempt)
            elif isinstance(decision, Requeue):
                run = self.runs[decision.job_id]
                if run.started_at is not None:
                    self._stop(run, now)
                run.requeues += 1
                run.attempt += 1

    def _sample(self, now: float, result: ScheduleResult) -> Sample:
        used: dict[str, int] = {}
        for pool in self.engine.fleet.pools.values():
            used[pool.model] = used.get(pool.model, 0) + pool.used_millis
        return Sample(now, used, self._stranded(result))

    def _stranded(self, result: ScheduleResult) -> float | None:
        """Return free capacity that no waiting job fits into by size, over all capacity."""
        demands = [
            self.engine.jobs[w.job_id].spec
            for w in result.waiting
            if w.reason in _CAPACITY_WAITS and w.job_id in self.engine.jobs
        ]
        if not demands:
            return None
        smallest_share = min(
            (d.millis_per_task for d in demands if d.fractional), default=MILLIS_PER_ACCELERATOR
        )
        smallest_whole = min(d.accelerators_per_task for d in demands)
        stranded = 0
        total = 0
        for node in self.engine.fleet.nodes:
            total += len(node.used) * MILLIS_PER_ACCELERATOR
            if not node.schedulable:
                continue
            for used in node.used:
                if (
                    0 < used < MILLIS_PER_ACCELERATOR
                    and MILLIS_PER_ACCELERATOR - used < smallest_share
                ):
                    stranded += MILLIS_PER_ACCELERATOR - used
            if 0 < node.free_whole < smallest_whole:
                stranded += node.free_whole * MILLIS_PER_ACCELERATOR
        return stranded / total if total else None


def job_spec(job: TraceJob) -> JobSpec:
    """Convert a trace job to the engine's job spec."""
    return JobSpec(
        job_id=job.name,
        project=job.account.project,
        institution=job.account.institution,
        program=job.account.program,
        submit_time=job.arrival,
        priority=job.priority,
        task_count=job.task_count,
        millis_per_task=job.millis_per_task,
        models=job.models,
        wall_time_s=job.wall_time_s,
    )
