"""The live replay: submit trace jobs through the SDK on a compressed clock and watch the mesh."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TextIO

import grpc

from acsp.client import AsyncClient
from acsp.demo.workload import Workload, request_id
from acsp.v1 import common_pb2, metering_pb2, scheduler_pb2
from scheduler.engine import PriorityClass
from scheduler.sim.traces import TraceJob

logger = logging.getLogger(__name__)

PRIORITY_TO_PROTO = {
    PriorityClass.INTERACTIVE: common_pb2.PRIORITY_CLASS_INTERACTIVE,
    PriorityClass.STANDARD: common_pb2.PRIORITY_CLASS_STANDARD,
    PriorityClass.PREEMPTIBLE: common_pb2.PRIORITY_CLASS_PREEMPTIBLE,
}
ACTIVE_STATES = ("starting", "running", "stopping")
"""Queue-summary state names of jobs that occupy accelerators."""
DONE_STATES = ("completed", "failed", "cancelled", "timed_out")
SUBMIT_BATCH = 200
"""Maximum number of jobs in one SubmitJobs call."""


@dataclass(frozen=True, slots=True)
class ProgressSample:
    """One look at the mesh during the replay."""

    elapsed_s: float
    """Wall seconds since the first submission."""
    submitted: int
    jobs_by_state: dict[str, int]
    used_millis_by_region: dict[str, int]
    total_millis_by_region: dict[str, int]
    charged_pf_days: Decimal | None
    """Sum of charges so far; None while metering is unreachable (it may be restarting)."""
    samples_ingested: int | None


@dataclass(frozen=True, slots=True)
class BalanceSample:
    """One grant's balance at one moment, PF-days."""

    available: Decimal
    held: Decimal
    charged: Decimal
    """Net of refunds."""


@dataclass(slots=True)
class LiveRun:
    """The jobs a replay submitted and the progress samples it took."""

    job_ids: dict[str, str] = field(default_factory=dict)
    """Trace job name -> scheduler job id."""
    rejected: dict[str, str] = field(default_factory=dict)
    """Trace job name -> why the submission failed."""
    progress: list[ProgressSample] = field(default_factory=list)
    balances: list[tuple[float, dict[str, BalanceSample]]] = field(default_factory=list)
    """(elapsed wall seconds, balance per grant id), sampled during the replay."""
    started_at: float = 0.0
    """time.time() of the first submission."""
    submitted_by: float = 0.0
    """Wall seconds the submissions took."""
    drained_by: float = 0.0
    """Wall seconds until no job held accelerators any more."""


def job_spec(job: TraceJob, grant_id: str) -> scheduler_pb2.JobSpec:
    return scheduler_pb2.JobSpec(
        name=job.name,
        project_id=job.account.project,
        grant_id=grant_id,
        task_count=job.task_count,
        accelerator_millis_per_task=job.millis_per_task,
        accelerators=scheduler_pb2.AcceleratorConstraint(models=sorted(job.models)),
        priority_class=PRIORITY_TO_PROTO[job.priority],
        wall_time_seconds=int(job.wall_time_s),
        command=["true"],
        simulated_run_seconds=job.runtime,
    )


class Replayer:
    """Submits a workload on its compressed clock and samples progress while it runs."""

    def __init__(
        self,
        client: AsyncClient,
        workload: Workload,
        run_id: str,
        grants: Mapping[str, str],
        project_tokens: Mapping[str, str],
        office_token: str,
        out: TextIO,
        progress_every_s: float = 5.0,
    ) -> None:
        self._client = client
        self._workload = workload
        self._run_id = run_id
        self._grants = grants
        self._tokens = project_tokens
        self._office = (("authorization", f"Bearer {office_token}"),)
        self._out = out
        self._progress_every_s = progress_every_s
        self.run = LiveRun()
        self.submitted = asyncio.Event()
        """Set once every job of the workload was submitted (or rejected)."""

    async def submit_all(self) -> None:
        """Submit every job at its wall offset from the first one."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.run.started_at = time.time()
        pending = list(self._workload.jobs)
        position = 0
        while position < len(pending):
            now = loop.time() - start
            due = []
            while (
                position < len(pending) and self._workload.wall_offset_s(pending[position]) <= now
            ):
                due.append(pending[position])
                position += 1
            if due:
                await self._submit(due)
            if position < len(pending):
                next_at = self._workload.wall_offset_s(pending[position])
                await asyncio.sleep(min(max(next_at - (loop.time() - start), 0.0), 0.5))
        self.run.submitted_by = loop.time() - start
        self.submitted.set()

    async def _submit(self, jobs: list[TraceJob]) -> None:
        by_project: dict[str, list[TraceJob]] = {}
        for job in jobs:
            by_project.setdefault(job.account.project, []).append(job)
        for project, group in by_project.items():
            for offset in range(0, len(group), SUBMIT_BATCH):
                await self._submit_batch(project, group[offset : offset + SUBMIT_BATCH])

    async def _submit_batch(self, project: str, jobs: list[TraceJob]) -> None:
        request = scheduler_pb2.SubmitJobsRequest(
            jobs=[
                scheduler_pb2.SubmitJobRequest(
                    request_id=request_id(self._run_id, job),
                    spec=job_spec(job, self._grants[project]),
                )
                for job in jobs
            ]
        )
        metadata = (("authorization", f"Bearer {self._tokens[project]}"),)
        try:
            response = await self._client.scheduler.SubmitJobs(
                request, metadata=metadata, timeout=30
            )
        except grpc.aio.AioRpcError as error:
            for job in jobs:
                self.run.rejected[job.name] = f"{error.code().name}: {error.details()}"
            logger.warning("%d jobs of %s rejected: %s", len(jobs), project, error.details())
            return
        for job, result in zip(jobs, response.results, strict=True):
            self.run.job_ids[job.name] = result.job.job_id

    async def sample(self) -> ProgressSample:
        summary = await self._client.scheduler.GetQueueSummary(
            scheduler_pb2.GetQueueSummaryRequest(), metadata=self._office, timeout=10
        )
        charged: Decimal | None = None
        ingested: int | None = None
        try:
            status = await self._client.metering.GetIngestStatus(
                metering_pb2.GetIngestStatusRequest(), metadata=self._office, timeout=5
            )
            charged = Decimal(status.charged_pf_days.value or "0")
            ingested = status.samples_ingested
        except grpc.aio.AioRpcError as error:
            logger.info("ingest status call failed: %s", error.code().name)
        sample = ProgressSample(
            elapsed_s=time.time() - self.run.started_at,
            submitted=len(self.run.job_ids),
            jobs_by_state=dict(summary.jobs_by_state),
            used_millis_by_region=dict(summary.used_millis_by_region),
            total_millis_by_region=dict(summary.total_millis_by_region),
            charged_pf_days=charged,
            samples_ingested=ingested,
        )
        self.run.progress.append(sample)
        return sample

    async def watch(self, stop: asyncio.Event, balances: Callable[[], object]) -> None:
        """Sample progress every second and print a line every ``progress_every_s``."""
        last_line = 0.0
        while not stop.is_set():
            try:
                sample = await self.sample()
            except grpc.aio.AioRpcError as error:
                logger.warning("progress sample failed: %s", error.code().name)
            else:
                if sample.elapsed_s - last_line >= self._progress_every_s:
                    last_line = sample.elapsed_s
                    self._out.write(format_progress(sample) + "\n")
                    self._out.flush()
                    await balances()  # type: ignore[misc]
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    async def wait_drained(self, timeout_s: float, quiet_s: float = 3.0) -> bool:
        """Wait until no job occupies accelerators for ``quiet_s``; return False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since: float | None = None
        while loop.time() < deadline:
            sample = self.run.progress[-1] if self.run.progress else await self.sample()
            active = sum(sample.jobs_by_state.get(s, 0) for s in ACTIVE_STATES)
            seen = sum(sample.jobs_by_state.values())
            if active == 0 and seen >= len(self.run.job_ids):
                quiet_since = quiet_since or loop.time()
                if loop.time() - quiet_since >= quiet_s:
                    self.run.drained_by = time.time() - self.run.started_at
                    return True
            else:
                quiet_since = None
            await asyncio.sleep(1.0)
        self.run.drained_by = time.time() - self.run.started_at
        return False


def format_progress(sample: ProgressSample) -> str:
    states = sample.jobs_by_state
    done = sum(states.get(s, 0) for s in DONE_STATES)
    running = sum(states.get(s, 0) for s in ACTIVE_STATES)
    regions = []
    for region in sorted(sample.total_millis_by_region):
        total = sample.total_millis_by_region[region]
        used = sample.used_millis_by_region.get(region, 0)
        regions.append(f"{region} {100 * used / total:4.1f}%" if total else f"{region} -")
    charged = "?" if sample.charged_pf_days is None else f"{sample.charged_pf_days:.6f}"
    return (
        f"[{sample.elapsed_s:6.1f} s] submitted {sample.submitted:5d}  pending "
        f"{states.get('pending', 0):4d}  running {running:4d}  done {done:5d}  "
        f"charged {charged} PF-days  | " + "  ".join(regions)
    )
