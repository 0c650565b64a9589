"""The local mesh supervisor: PostgreSQL, NATS, the three services and the simulated fleet.

Use it from Python (tests, ``acsp demo``, notebooks)::

    async with LocalMesh(MeshConfig(data_dir=Path("/tmp/mesh"), agents=4)) as mesh:
        token = mesh.token(role="pi", subject="alice@uni.example")
        async with AsyncClient.from_mesh(mesh.info, token=token) as client:
            ...

or as ``acsp up``, which runs it until Ctrl-C or SIGTERM. It starts every process in its own
session, waits until each service reports SERVING via grpc.health.v1, writes the mesh file
(:mod:`acsp.mesh.endpoints`), and stops what it started in two phases (stop signal, wait,
SIGKILL) in reverse order. A service, the fleet, the embedded PostgreSQL or the embedded NATS
that exits while the mesh runs is started again with the same command line, environment and
port, after a delay that doubles with each restart up to ``max_restart_delay_s``. PostgreSQL
keeps its data directory and password, and NATS its JetStream store, so their clients
reconnect to the same URL. While a child is down, the mesh file gives the reason, which
``acsp status`` shows. Once one has been restarted ``max_restarts`` times within
``restart_window_s``, its next exit ends the wait of :meth:`LocalMesh.wait_failure`, which
returns which one died and why.

The parts live in their own modules: :mod:`acsp.mesh.launch` (the children's environment and
the wait until they serve), :mod:`acsp.mesh.watch` (restarts), :mod:`acsp.mesh.status` (the
data directory's lock and the mesh file) and :mod:`acsp.mesh.config` (settings and processes).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from acsp._channel import Credentials
from acsp.mesh import credentials as mesh_credentials
from acsp.mesh import passwords
from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import ChildProcess, become_subreaper, stop_orphans
from acsp.mesh.config import (
    AGENTS_NAME,
    DATABASE_URL_ENV,
    NATS_URL_ENV,
    SERVICE_MODULES,
    MeshConfig,
    ProcessSpec,
    default_processes,
)
from acsp.mesh.data_dir_lock import DataDirLock
from acsp.mesh.endpoints import SERVICE_NAMES, MeshInfo
from acsp.mesh.failures import ChildExit, MeshStartError
from acsp.mesh.launch import MeshEnvironment, check_running, wait_services
from acsp.mesh.servers import EmbeddedServers
from acsp.mesh.status import EXITS_KEY, MeshStatus, claim_data_dir
from acsp.mesh.watch import ChildWatch

logger = logging.getLogger(__name__)


class LocalMesh:
    """Supervisor of a local mesh, used as an async context manager that starts and stops it."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self._servers = EmbeddedServers(self.data_dir, self.data_dir / "logs")
        self._children: list[ChildProcess] = []
        self._pki: mesh_credentials.MeshCredentials | None = None
        self._status = MeshStatus(self.data_dir, lambda: self.pids)
        # Held while a child starts again and while the mesh stops its children, so that a
        # restart cannot start a process that the stop has already passed over.
        self._start_lock = asyncio.Lock()
        self._watch = ChildWatch(
            config,
            self._servers,
            self._children,
            self._status,
            self._start_lock,
            lambda: self.client_credentials(None),
        )
        self._data_dir_lock: DataDirLock | None = None

    # --- public surface -------------------------------------------------------------------

    @property
    def info(self) -> MeshInfo:
        """Endpoints and credential paths; available once :meth:`start` returned."""
        if self._status.info is None:
            raise RuntimeError("the mesh is not running: use `async with LocalMesh(...)`")
        return self._status.info

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of every child the mesh started and that still runs."""
        result = {}
        for child in self._watch.all_children():
            if child.pid is not None and child.returncode is None:
                result[child.name] = child.pid
        return result

    def token(
        self,
        role: str | Sequence[str],
        subject: str,
        *,
        institution: str | None = None,
        provider: str | None = None,
        ttl_s: float = 3600.0,
    ) -> str:
        """Mint a bearer token for ``subject`` with ``role``, signed by the mesh's key."""
        if self._pki is None:
            raise RuntimeError("the mesh is not running: use `async with LocalMesh(...)`")
        return self._pki.mint_token(
            role=role, subject=subject, institution=institution, provider=provider, ttl_s=ttl_s
        )

    def client_credentials(self, token: str | None) -> Credentials:
        info = self.info
        return Credentials.from_files(
            ca_cert=info.ca_cert,
            token=token,
            client_cert=info.client_cert,
            client_key=info.client_key,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_failure(self) -> ChildExit:
        """Wait until a child exits on its own and return which one and why."""
        if self._watch.failure is None:
            raise RuntimeError("the mesh is not running")
        return await asyncio.shield(self._watch.failure)

    async def kill_and_restart(self, name: str, down_s: float) -> None:
        """SIGKILL the child ``name``, keep it down ``down_s`` seconds, start it again.

        A restarted service gets the same port and environment, and the call returns once it
        reports SERVING again (within ``start_timeout_s``). Used to show that a crash loses
        nothing. Raises ``KeyError`` for an unknown name and MeshStartError if it fails to
        come back or the mesh stops before it starts again.
        """
        children = {child.name: child for child in self._children}
        child = children[name]
        loop = asyncio.get_running_loop()
        with self._watch.restarting(name):
            await child.kill()
            logger.warning("killed %s; restarting it in %.1f s", name, down_s)
            await asyncio.sleep(down_s)
            # Under the lock that stop() holds, so a process started here cannot outlive it.
            async with self._start_lock:
                if self._watch.stopping:
                    raise MeshStartError(
                        f"cannot start {name} again after the kill: the mesh is stopping"
                    )
                await child.start()
                self._watch.watch(child)
                # `acsp status` reports a child without an endpoint by the pid in the mesh file.
                self._status.write()
        endpoints = self.info.endpoints
        if name in endpoints:
            deadline = loop.time() + self.config.start_timeout_s
            await wait_services(
                self._children, {name: endpoints[name]}, self.client_credentials(None), deadline
            )

    # --- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until every service reports SERVING.

        Raises MeshStartError (after stopping whatever started) if any part fails or the
        services are not SERVING within ``start_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        self._watch.begin()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Claimed before anything starts, so a refusal stops and logs nothing: a "stopped"
        # line would read as if the other mesh had been stopped.
        self._data_dir_lock = claim_data_dir(self.data_dir)
        try:
            await self._start(deadline)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        reaping = self.config.stop_orphans and become_subreaper()
        if self.config.stop_orphans and not reaping:
            logger.warning(
                "cannot become a child subreaper: tasks left by the fleet may outlive it"
            )
        # In a worker thread, because preparing the fleet's tasks may run useradd or copy the
        # fleet's state to another file system.
        specs = await asyncio.to_thread(self.config.resolved_processes)
        grpc_names = [spec.name for spec in specs if spec.serves_grpc]
        self._pki = await asyncio.to_thread(
            mesh_credentials.prepare, self.data_dir, services=grpc_names
        )

        try:
            database_url, nats_url = await self._servers.start(
                self.config.database_url, self.config.nats_url, deadline - loop.time()
            )
        except Exception as exc:
            raise MeshStartError(f"the mesh's servers failed to start: {exc}") from exc
        # Ports are picked before the services start so that each can be given the others'
        # addresses. NOTE: another process may take a picked port first; the service then exits
        # with "cannot bind" and the start fails instead of retrying on another port.
        ports = {name: free_port() for name in grpc_names}
        endpoints = {name: f"{LOOPBACK}:{port}" for name, port in ports.items()}
        environment = MeshEnvironment(
            self.config, self.data_dir, self._pki, self._servers, database_url, nats_url, endpoints
        )
        for spec in specs:
            child = ChildProcess(
                spec.name,
                spec.argv,
                log_path=self._log_path(spec.name),
                env=environment.for_process(spec),
                cwd=Path.cwd(),
            )
            self._children.append(child)
            await child.start()

        credentials = Credentials.from_files(
            ca_cert=self._pki.ca_cert,
            client_cert=self._pki.client_cert,
            client_key=self._pki.client_key,
        )
        await wait_services(self._children, endpoints, credentials, deadline)
        check_running(self._children)

        postgres, nats = self._servers.postgres, self._servers.nats
        self._status.publish(
            MeshInfo(
                data_dir=self.data_dir,
                endpoints=endpoints,
                ca_cert=self._pki.ca_cert,
                token_key=self._pki.token_private_key,
                database_url=database_url,
                nats_url=nats_url,
                supervisor_pid=os.getpid(),
                client_cert=self._pki.client_cert,
                client_key=self._pki.client_key,
                nats_user=passwords.NATS_USER if nats is not None else None,
                nats_password_file=nats.password.path if nats is not None else None,
                database_password_file=postgres.password.path if postgres is not None else None,
                extra={"pids": self.pids, "logs": str(self.data_dir / "logs")},
            )
        )
        for child in self._watch.all_children():
            self._watch.watch(child)
        if reaping:
            self._watch.reap_orphans()
        logger.info("local mesh is up in %s: %s", self.data_dir, endpoints)

    # --- stop -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop everything the mesh started: the fleet, then services, then NATS and PostgreSQL.

        Each process gets ``stop_grace_s`` after its stop signal, then SIGKILL. Safe to call
        twice. Cancellation during stop is deferred until every child is gone, so that no
        process outlives the mesh.
        """
        self._watch.stopping = True
        stopping = asyncio.ensure_future(self._stop_all())
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            await stopping
            raise

    async def _stop_all(self) -> None:
        grace = self.config.stop_grace_s
        fleet = [child for child in self._children if child.name == AGENTS_NAME]
        services = [child for child in self._children if child.name != AGENTS_NAME]
        async with self._start_lock:
            await asyncio.gather(*(child.stop(grace) for child in fleet))
            await asyncio.gather(*(child.stop(grace) for child in services))
        if self.config.stop_orphans:
            known = {child.pid for child in self._watch.all_children() if child.pid is not None}
            await stop_orphans(known, grace)
        await self._servers.stop(grace)
        await self._watch.close()
        self._status.remove()
        # Last, once no process of this mesh runs.
        if self._data_dir_lock is not None:
            self._data_dir_lock.release()
            self._data_dir_lock = None
        logger.info("local mesh in %s stopped", self.data_dir)

    def _log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"


__all__ = [
    "AGENTS_NAME",
    "DATABASE_URL_ENV",
    "EXITS_KEY",
    "NATS_URL_ENV",
    "SERVICE_MODULES",
    "SERVICE_NAMES",
    "ChildExit",
    "LocalMesh",
    "MeshConfig",
    "MeshStartError",
    "ProcessSpec",
    "default_processes",
]
