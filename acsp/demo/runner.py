"""Run the whole demo: start the mesh, set it up, replay, wait, collect, check, report."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from acsp.client import AsyncClient
from acsp.demo import collect, compare, markdown, report
from acsp.demo.checks import run_checks
from acsp.demo.fleet import FleetPlan, build_fleet_plan
from acsp.demo.live import LiveRun, Replayer
from acsp.demo.setup import (
    AwardedGrant,
    FleetSetup,
    award_grants,
    recall_capacity,
    register_fleet,
)
from acsp.demo.workload import Workload, build_workload, project_plans
from acsp.mesh import LocalMesh, MeshConfig, ProcessSpec
from acsp.mesh.supervisor import AGENTS_NAME, SERVICE_MODULES

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Settings of one demo run."""

    out: Path
    jobs: int | None = 2000
    """First jobs of the trace by arrival; None replays all of them."""
    seed: int = 0
    speed: float = 8000.0
    """Trace seconds per wall second, for arrivals and played run times alike."""
    max_gap_s: float = 3600.0
    """Maximum arrival gap kept, trace seconds."""
    max_runtime_s: float = 2 * 86_400.0
    """Maximum run time kept, trace seconds."""
    max_nodes: int = 30
    """Nodes kept of each real fleet file (a stride sample).

    With 30, jobs of the 2,000-job slice queue at the trace's busy moments and the run ends
    within 5 minutes on 2 cores. The whole fleets would leave nearly every accelerator idle.
    """
    simulated_nodes: int = 8
    """MI300X nodes of the simulated third provider."""
    kill_metering_at_s: float | None = None
    """Wall seconds into the replay at which metering is killed for ``metering_down_s``."""
    metering_down_s: float = 20.0
    recall_at_s: float = 10.0
    """Wall seconds into the replay from which the demo looks for a busy pool to recall."""
    recall_search_s: float = 60.0
    """Wall seconds the demo looks for a pool where the recall preempts running jobs."""
    recall_s: float = 30.0
    drain_timeout_s: float = 120.0
    """Wall seconds allowed after the last submission for running jobs to end."""
    settle_timeout_s: float = 90.0
    """Wall seconds allowed for every usage sample to be ingested and charged."""
    usage_s: float = 5.0
    """Seconds between the agents' usage reports."""
    database_url: str | None = None
    nats_url: str | None = None


def mesh_processes(config: DemoConfig, fleet: FleetPlan, data_dir: Path) -> tuple[ProcessSpec, ...]:
    """Return the three services and one agent process that serves every region of ``fleet``."""
    specs = [
        ProcessSpec(name, [sys.executable, "-m", module])
        for name, module in SERVICE_MODULES.items()
    ]
    fleet_files = fleet.write_fleet_files(data_dir / "fleet")
    argv = [sys.executable, "-m", "agents", "--backend", "simulated"]
    argv += ["--state-dir", str(data_dir / AGENTS_NAME), "--speed", f"{config.speed:g}"]
    argv += ["--heartbeat-s", "2", "--usage-s", f"{config.usage_s:g}"]
    for path, region in zip(fleet_files, fleet.regions, strict=True):
        argv += ["--fleet", f"{path}:{region.provider}:{region.region}"]
    specs.append(ProcessSpec(AGENTS_NAME, argv, serves_grpc=False))
    return tuple(specs)


def demo_mesh_config(config: DemoConfig, fleet: FleetPlan, data_dir: Path) -> MeshConfig:
    """Return the settings of the demo's local mesh in ``data_dir``."""
    return MeshConfig(
        data_dir=data_dir,
        agents=0,
        database_url=config.database_url,
        nats_url=config.nats_url,
        processes=mesh_processes(config, fleet, data_dir),
        start_timeout_s=120.0,
        env={
            "ACSP_SCHEDULER_TICK_S": "0.25",
            # Charge an ended attempt 5 s after its end instead of 30 s: the clock is compressed.
            "ACSP_METERING_LATENESS_S": "5",
            "ACSP_LOG_LEVEL": "INFO",
        },
        stop_orphans=False,
        # A restart would skew the measured run, so the demo stops at a process's first exit.
        max_restarts=0,
    )


async def run_demo(config: DemoConfig, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo and write its report; return the report document."""
    started = time.monotonic()
    fleet = build_fleet_plan(config.max_nodes, config.simulated_nodes)
    workload = build_workload(
        config.jobs, config.seed, config.speed, config.max_gap_s, config.max_runtime_s
    )
    # The simulator runs first: it takes seconds, and the live run is compared with it.
    simulated = compare.simulate_slice(fleet, workload)
    out.write(
        f"simulated the slice in {simulated.result.wall_clock_s:.1f} s: "
        f"{simulated.summary['completed']} of {len(workload.jobs)} jobs completed\n"
    )
    config.out.mkdir(parents=True, exist_ok=True)
    data_dir = (config.out / "mesh").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)
    mesh_config = demo_mesh_config(config, fleet, data_dir)
    out.write(
        f"acsp demo: {len(workload.jobs)} jobs, {len(fleet.nodes())} nodes in "
        f"{len(fleet.regions)} regions of {len(fleet.providers)} providers, speed "
        f"{config.speed:g}x; output in {config.out}\n"
    )
    async with LocalMesh(mesh_config) as mesh:
        out.write(f"mesh up after {time.monotonic() - started:.1f} s\n")
        live = await _while_mesh_runs(mesh, _live_run(mesh, config, fleet, workload, out))
        logs = mesh.info.data_dir / "logs"
    document = report.build(
        config,
        fleet,
        workload,
        live.grants,
        live.fleet_setup,
        live.run,
        live.figures,
        live.settled,
        simulated,
    )
    document["metering_restarts"] = live.restarts
    document["inputs"]["kill_metering_at_s"] = config.kill_metering_at_s
    document["checks"] = run_checks(document)
    document["wall_clock_s"] = round(time.monotonic() - started, 1)
    document["logs"] = str(logs)
    report.write(document, live.run, live.figures, live.grants, workload, simulated, config.out)
    out.write(markdown.summary_lines(document))
    return document


class MeshChildExited(RuntimeError):
    """A process of the mesh died during the demo; the message names it and shows its log."""


@dataclass(slots=True)
class _LiveOutcome:
    fleet_setup: FleetSetup
    grants: list[AwardedGrant]
    run: LiveRun
    settled: collect.Settlement
    figures: collect.LiveFigures
    restarts: list[dict[str, float]]


async def _while_mesh_runs(
    mesh: LocalMesh, work: Coroutine[Any, Any, _LiveOutcome]
) -> _LiveOutcome:
    """Run ``work``, but raise MeshChildExited as soon as a process of the mesh dies.

    A metering process killed on purpose (``--kill-metering-at``) does not count.
    """
    body = asyncio.ensure_future(work)
    failure = asyncio.ensure_future(mesh.wait_failure())
    try:
        await asyncio.wait({body, failure}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (body, failure):
            if not task.done():
                task.cancel()
        await asyncio.gather(body, failure, return_exceptions=True)
    if failure.done() and not failure.cancelled() and failure.exception() is None:
        raise MeshChildExited(f"a process of the mesh died during the demo: {failure.result()}")
    return body.result()


async def _live_run(
    mesh: LocalMesh, config: DemoConfig, fleet: FleetPlan, workload: Workload, out: TextIO
) -> _LiveOutcome:
    """Set up providers and grants, replay the workload, wait until it settled, collect."""
    started = time.monotonic()
    office_token = mesh.token("program_office", "office@program", ttl_s=7200)
    async with AsyncClient.from_mesh(mesh.info, token=office_token, timeout_s=30) as client:
        fleet_setup = await register_fleet(client, fleet, config.seed, mesh.token)
        grants = await award_grants(client, project_plans(), config.seed, mesh.token)
        out.write(
            f"{len(grants)} grants awarded ({sum(g.reviewed for g in grants)} after review) "
            f"in {time.monotonic() - started:.1f} s\n"
        )
        grant_by_project = {g.project_id: g.grant_id for g in grants}
        run_id = f"{config.seed}-{uuid.uuid4().hex[:8]}"
        replayer = Replayer(
            client,
            workload,
            run_id,
            grant_by_project,
            _project_tokens(mesh, grant_by_project),
            office_token,
            out,
        )

        async def sample_balances() -> None:
            balances = await collect.grant_balances(client, grant_by_project.values())
            replayer.run.balances.append((time.time() - replayer.run.started_at, balances))

        stop_watch = asyncio.Event()
        restarts: list[dict[str, float]] = []
        async with asyncio.TaskGroup() as group:
            group.create_task(replayer.submit_all(), name="submit")
            group.create_task(replayer.watch(stop_watch, sample_balances), name="watch")
            group.create_task(_recall_later(client, fleet_setup, fleet, config, mesh))
            if config.kill_metering_at_s is not None:
                group.create_task(_kill_metering_later(mesh, config, out, restarts))
            group.create_task(_finish(replayer, config, stop_watch, out), name="finish")
        await sample_balances()
        agents_dir = mesh.info.data_dir / AGENTS_NAME
        settled = await collect.wait_settled(
            client, agents_dir, list(grant_by_project.values()), config.settle_timeout_s
        )
        figures = await collect.collect(client, fleet, grants, replayer.run, agents_dir)
    return _LiveOutcome(fleet_setup, grants, replayer.run, settled, figures, restarts)


def _project_tokens(mesh: LocalMesh, grant_by_project: dict[str, str]) -> dict[str, str]:
    """Mint a token for the PI of each project, who submits the project's jobs."""
    plans = {plan.project_id: plan for plan in project_plans()}
    return {
        project: mesh.token(
            "pi", plans[project].pi_subject, institution=plans[project].institution_id, ttl_s=7200
        )
        for project in grant_by_project
    }


async def _finish(replayer: Replayer, config: DemoConfig, stop: asyncio.Event, out: TextIO) -> None:
    try:
        await replayer.submitted.wait()
        drained = await replayer.wait_drained(config.drain_timeout_s)
        if not drained:
            out.write(
                f"jobs still held accelerators {config.drain_timeout_s:g} s after the last "
                "submission\n"
            )
    finally:
        stop.set()


async def _recall_later(
    client: AsyncClient,
    outcome: FleetSetup,
    fleet: FleetPlan,
    config: DemoConfig,
    mesh: LocalMesh,
) -> None:
    await asyncio.sleep(config.recall_at_s)
    await recall_capacity(
        client,
        outcome,
        fleet,
        config.seed,
        mesh.token,
        config.recall_s,
        config.recall_search_s,
    )


async def _kill_metering_later(
    mesh: LocalMesh, config: DemoConfig, out: TextIO, restarts: list[dict[str, float]]
) -> None:
    """SIGKILL metering at ``kill_metering_at_s``, restart it after ``metering_down_s``."""
    assert config.kill_metering_at_s is not None
    await asyncio.sleep(config.kill_metering_at_s)
    out.write(f"killing metering (SIGKILL) for {config.metering_down_s:g} s\n")
    started = time.monotonic()
    await mesh.kill_and_restart("metering", config.metering_down_s)
    serving_after = time.monotonic() - started
    out.write(f"metering is SERVING again {serving_after:.1f} s after the kill\n")
    restarts.append(
        {
            "killed_at_s": config.kill_metering_at_s,
            "down_s": config.metering_down_s,
            "serving_after_s": round(serving_after, 1),
        }
    )
