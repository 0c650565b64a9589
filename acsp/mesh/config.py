"""The settings of a local mesh and the processes it runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from acsp.mesh.fleet_tasks import FleetTasks, plan_fleet_tasks, prepare_fleet_tasks

DATABASE_URL_ENV: Final = "ACSP_DATABASE_URL"
NATS_URL_ENV: Final = "ACSP_NATS_URL"

SERVICE_MODULES: Final = {
    "grant": "services.grant",
    "scheduler": "scheduler.service",
    "metering": "services.metering",
}
"""The module that ``python -m`` runs for each service."""
AGENTS_NAME: Final = "agents"


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process of the mesh: how to start it and whether it serves gRPC."""

    name: str
    """Name in logs, messages and the mesh file."""
    argv: Sequence[str]
    """Command line; the first item is the executable."""
    serves_grpc: bool = True
    """True for services, which get a port, TLS files, and are health-checked."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for this process only."""
    uses_database: bool = True
    """False leaves ACSP_DATABASE_URL, which contains the embedded PostgreSQL's password, out
    of the environment of this process."""


def default_processes(
    agents: int, data_dir: Path, environ: Mapping[str, str] | None = None
) -> tuple[ProcessSpec, ...]:
    """Return the grant, scheduler and metering services and, if ``agents`` > 0, the fleet.

    ``environ`` is the environment that the processes inherit (default: this process's),
    which may set the fleet's task user (see :mod:`acsp.mesh.fleet_tasks`). With a fleet, it
    also prepares what the fleet's tasks need, with :func:`prepare_fleet_tasks`: as root it
    creates the task user that the fleet's environment names and the fleet's state folder.
    Raises MeshStartError when they cannot be made.
    """
    specs = [
        ProcessSpec(name, [sys.executable, "-m", module])
        for name, module in SERVICE_MODULES.items()
    ]
    if agents > 0:
        tasks = plan_fleet_tasks(data_dir, os.environ if environ is None else environ)
        # Prepared where it is planned, so that no caller gets a fleet whose task user or
        # state folder does not exist.
        prepare_fleet_tasks(tasks)
        fleet_argv = [sys.executable, "-m", "agents", "--backend", "simulated"]
        fleet_argv += ["--nodes", str(agents), "--state-dir", str(tasks.state_dir)]
        # The mesh stops as a whole, so the fleet stops its tasks and reports their usage up
        # to that moment, instead of leaving them to be killed as orphans unreported.
        fleet_env = {"ACSP_AGENT_STOP_TASKS_ON_EXIT": "true", **tasks.env}
        # Agents talk to NATS alone, and a task that runs as the fleet's user could read the
        # fleet's environment, so the fleet gets no database URL.
        fleet = ProcessSpec(
            AGENTS_NAME, fleet_argv, serves_grpc=False, env=fleet_env, uses_database=False
        )
        specs.append(fleet)
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Settings of a local mesh."""

    data_dir: Path
    """Folder for the mesh file, TLS files, token key, logs and the embedded servers' data."""
    agents: int = 4
    """Number of simulated nodes in the fleet process; 0 starts no fleet."""
    database_url: str | None = None
    """PostgreSQL to use; None starts an embedded one."""
    nats_url: str | None = None
    """NATS (with JetStream) to use; None starts an embedded one."""
    processes: tuple[ProcessSpec, ...] | None = None
    """Processes to run; None means :func:`default_processes` for ``agents``."""
    start_timeout_s: float = 60.0
    """Seconds for everything to start and report SERVING."""
    stop_grace_s: float = 10.0
    """Seconds each process gets to exit after its stop signal before SIGKILL."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for every child process."""
    max_restarts: int = 5
    """Restarts of one child within ``restart_window_s`` before its next exit stops the mesh.

    0 stops the mesh at the first exit of any child.
    """
    restart_window_s: float = 60.0
    """Seconds over which restarts of a child count towards ``max_restarts``."""
    restart_delay_s: float = 0.5
    """Seconds before the first restart of a child; each restart in the window doubles it."""
    max_restart_delay_s: float = 30.0
    """Seconds that the delay before a restart never exceeds, however many restarts came before."""
    stop_orphans: bool = False
    """Adopt the processes that children leave behind (the fleet's tasks), reap those that
    exit while the mesh runs, and stop the rest at stop.

    Makes this process a Linux child subreaper, which lasts for its lifetime, so ``acsp up``
    sets it and in-process users (tests, notebooks) normally do not.
    """

    @classmethod
    def from_env(
        cls, data_dir: Path, *, agents: int = 4, environ: Mapping[str, str] | None = None
    ) -> MeshConfig:
        """Build a config that uses ACSP_DATABASE_URL and ACSP_NATS_URL when they are set."""
        env = os.environ if environ is None else environ
        return cls(
            data_dir=data_dir,
            agents=agents,
            database_url=env.get(DATABASE_URL_ENV, "").strip() or None,
            nats_url=env.get(NATS_URL_ENV, "").strip() or None,
        )

    def resolved_processes(self) -> tuple[ProcessSpec, ...]:
        """Return ``processes``, or else :func:`default_processes`, which prepares the fleet's
        tasks."""
        if self.processes is not None:
            return self.processes
        return default_processes(self.agents, self.data_dir.resolve(), self.inherited_env())

    def inherited_env(self) -> dict[str, str]:
        """Return the environment that every child inherits before its own settings."""
        return {**os.environ, **self.env}

    def fleet_tasks(self) -> FleetTasks | None:
        """Return the task user and state folder of the default fleet, or None without one."""
        if self.processes is not None or self.agents <= 0:
            return None
        return plan_fleet_tasks(self.data_dir, self.inherited_env())
