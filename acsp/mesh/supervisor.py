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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from acsp._channel import Credentials
from acsp.mesh import credentials as mesh_credentials
from acsp.mesh import passwords
from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import (
    ChildProcess,
    become_subreaper,
    reap_exited_orphans,
    stop_orphans,
)
from acsp.mesh.config import (
    AGENTS_NAME,
    DATABASE_URL_ENV,
    NATS_URL_ENV,
    SERVICE_MODULES,
    MeshConfig,
    ProcessSpec,
    default_processes,
)
from acsp.mesh.data_dir_lock import LOCK_FILE_NAME, DataDirLock, DataDirLockedError
from acsp.mesh.endpoints import (
    MESH_FILE_NAME,
    SERVICE_NAMES,
    MeshInfo,
    MeshNotFoundError,
    load_mesh,
)
from acsp.mesh.health import wait_serving
from acsp.mesh.restarts import exit_reason, restart_delay
from acsp.mesh.servers import EmbeddedServers
from acsp.mesh.stop import supervisor_running

logger = logging.getLogger(__name__)

ORPHAN_REAP_INTERVAL_S: Final = 1.0
"""Seconds between checks for exited orphans, which stay zombies until the next check."""
EXITS_KEY: Final = "exits"
"""Key of the mesh file that maps each child that is down to the reason, for ``acsp status``."""


class MeshStartError(RuntimeError):
    """The mesh failed to start; the message names the process and shows its last log lines."""


@dataclass(frozen=True, slots=True)
class ChildExit:
    """A child of the mesh that exited while the mesh was running."""

    name: str
    returncode: int
    description: str
    """Exit status and log path, as one sentence."""
    log_tail: str
    """Its last log lines."""

    def __str__(self) -> str:
        return f"{self.description}\n--- last lines of its log ---\n{self.log_tail}"


class LocalMesh:
    """Supervisor of a local mesh, used as an async context manager that starts and stops it."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self._servers = EmbeddedServers(self.data_dir, self.data_dir / "logs")
        self._children: list[ChildProcess] = []
        self._pki: mesh_credentials.MeshCredentials | None = None
        self._info: MeshInfo | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[ChildExit] | None = None
        self._stopping = False
        self._restarting: set[str] = set()
        self._exits: dict[str, str] = {}
        """The reason each child that exited on its own is not running yet, by child name."""
        # Held while a child starts again and while the mesh stops its children, so that a
        # restart cannot start a process that the stop has already passed over.
        self._start_lock = asyncio.Lock()
        self._data_dir_lock: DataDirLock | None = None

    # --- public surface -------------------------------------------------------------------

    @property
    def info(self) -> MeshInfo:
        """Endpoints and credential paths; available once :meth:`start` returned."""
        if self._info is None:
            raise RuntimeError("the mesh is not running: use `async with LocalMesh(...)`")
        return self._info

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of every child the mesh started and that still runs."""
        result = {}
        for child in self._all_children():
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
        if self._failure is None:
            raise RuntimeError("the mesh is not running")
        return await asyncio.shield(self._failure)

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
        self._restarting.add(name)
        try:
            await child.kill()
            logger.warning("killed %s; restarting it in %.1f s", name, down_s)
            await asyncio.sleep(down_s)
            # Under the lock that stop() holds, so a process started here cannot outlive it.
            async with self._start_lock:
                if self._stopping:
                    raise MeshStartError(
                        f"cannot start {name} again after the kill: the mesh is stopping"
                    )
                await child.start()
                self._watchers.append(loop.create_task(self._watch(child), name=f"watch {name}"))
                # `acsp status` reports a child without an endpoint by the pid in the mesh file.
                self._write_mesh_file()
        finally:
            self._restarting.discard(name)
        endpoints = self.info.endpoints
        if name in endpoints:
            deadline = loop.time() + self.config.start_timeout_s
            await self._wait_services(
                {name: endpoints[name]}, self.client_credentials(None), deadline
            )

    # --- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until every service reports SERVING.

        Raises MeshStartError (after stopping whatever started) if any part fails or the
        services are not SERVING within ``start_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        self._failure = loop.create_future()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Claimed before anything starts, so a refusal stops and logs nothing: a "stopped"
        # line would read as if the other mesh had been stopped.
        self._lock_data_dir()
        try:
            self._claim_data_dir()
        except BaseException:
            self._release_data_dir()
            raise
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
        specs = self.config.resolved_processes()
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
        for spec in specs:
            child = ChildProcess(
                spec.name,
                spec.argv,
                log_path=self._log_path(spec.name),
                env=self._child_env(spec, database_url, nats_url, endpoints),
                cwd=Path.cwd(),
            )
            self._children.append(child)
            await child.start()

        credentials = Credentials.from_files(
            ca_cert=self._pki.ca_cert,
            client_cert=self._pki.client_cert,
            client_key=self._pki.client_key,
        )
        await self._wait_services(endpoints, credentials, deadline)
        await self._check_fleet_alive()

        postgres, nats = self._servers.postgres, self._servers.nats
        self._info = MeshInfo(
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
        self._info.write()
        for child in self._all_children():
            self._watchers.append(loop.create_task(self._watch(child), name=f"watch {child.name}"))
        if reaping:
            self._watchers.append(loop.create_task(self._reap_orphans(), name="reap orphans"))
        logger.info("local mesh is up in %s: %s", self.data_dir, endpoints)

    def _lock_data_dir(self) -> None:
        """Take the data directory's lock, or raise MeshStartError naming the mesh that has it."""
        try:
            self._data_dir_lock = DataDirLock.acquire(self.data_dir)
        except DataDirLockedError as exc:
            raise MeshStartError(
                f"another mesh (supervisor pid {exc.pid}) runs with data directory "
                f"{self.data_dir}: stop it with acsp down --data-dir {self.data_dir}, or pass "
                "another --data-dir"
            ) from None
        except OSError as exc:
            raise MeshStartError(
                f"cannot lock data directory {self.data_dir}: {exc}. Remove "
                f"{self.data_dir / LOCK_FILE_NAME} if it is not a plain file, or pass another "
                "--data-dir"
            ) from None

    def _release_data_dir(self) -> None:
        if self._data_dir_lock is not None:
            self._data_dir_lock.release()
            self._data_dir_lock = None

    def _claim_data_dir(self) -> None:
        """Remove a mesh file left by a dead supervisor; raise if its supervisor still runs."""
        try:
            previous = load_mesh(self.data_dir)
        except MeshNotFoundError:
            return
        except ValueError:
            previous = None
        if previous is not None and previous.supervisor_pid != os.getpid():
            # The same check as acsp down's, so that a pid reused by another program after the
            # supervisor died does not keep the data directory claimed.
            if supervisor_running(previous):
                raise MeshStartError(
                    f"another mesh (supervisor pid {previous.supervisor_pid}) runs with data "
                    f"directory {self.data_dir}: stop it with acsp down --data-dir "
                    f"{self.data_dir}, or pass another --data-dir"
                )
        (self.data_dir / MESH_FILE_NAME).unlink(missing_ok=True)

    def _child_env(
        self, spec: ProcessSpec, database_url: str, nats_url: str, endpoints: Mapping[str, str]
    ) -> dict[str, str]:
        assert self._pki is not None
        env = dict(os.environ)
        # Let in-flight calls finish well before the supervisor's SIGKILL deadline.
        env.setdefault("ACSP_SHUTDOWN_GRACE_S", f"{self.config.stop_grace_s / 2:g}")
        env.update(self.config.env)
        env.update(
            {
                "ACSP_DATABASE_URL": database_url,
                "ACSP_NATS_URL": nats_url,
                "ACSP_DATA_DIR": str(self.data_dir),
                "ACSP_TOKEN_PUBLIC_KEY": str(self._pki.token_public_key),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self._servers.child_env(env)
        # ACSP_GRANT_ADDRESS and so on: the host:port at which each service calls the others.
        for name, endpoint in endpoints.items():
            env[f"ACSP_{name.upper()}_ADDRESS"] = endpoint
        # Processes that call services (the scheduler calls the grant service, say) use the
        # client certificate unless they are services with a certificate of their own.
        identity = self._pki.identities.get(spec.name, self._pki.client_identity)
        env.update(
            {
                "ACSP_TLS_CA": str(identity.ca),
                "ACSP_TLS_CERT": str(identity.cert),
                "ACSP_TLS_KEY": str(identity.key),
            }
        )
        if spec.serves_grpc:
            env["ACSP_GRPC_LISTEN"] = endpoints[spec.name]
            ready_file = self.data_dir / "run" / f"{spec.name}.addr"
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.unlink(missing_ok=True)
            env["ACSP_READY_FILE"] = str(ready_file)
        env.update(spec.env)
        if not spec.uses_database:
            env.pop("ACSP_DATABASE_URL", None)
        return env

    async def _wait_services(
        self, endpoints: Mapping[str, str], credentials: Credentials, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        children = {child.name: child for child in self._children}

        async def wait_one(name: str) -> None:
            child = children[name]
            try:
                await wait_serving(
                    name,
                    endpoints[name],
                    credentials,
                    timeout_s=max(deadline - loop.time(), 0.1),
                    still_running=lambda: child.returncode is None,
                )
            except RuntimeError:
                raise MeshStartError(
                    f"{child.describe_exit()}\n--- last lines of its log ---\n{child.tail()}"
                ) from None
            except TimeoutError as exc:
                raise MeshStartError(
                    f"{exc}\nlog: {child.log_path}\n--- last lines of its log ---\n{child.tail()}"
                ) from None
            logger.info("%s is SERVING at %s", name, endpoints[name])

        waits = [loop.create_task(wait_one(name), name=f"wait for {name}") for name in endpoints]
        if not waits:
            return
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                # Raise the first failure as itself, not wrapped in an ExceptionGroup, so the
                # caller sees which process failed.
                task.result()
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _check_fleet_alive(self) -> None:
        """Fail the start if a process without a health endpoint already died."""
        for child in self._children:
            if child.returncode is not None:
                raise MeshStartError(
                    f"{child.describe_exit()}\n--- last lines of its log ---\n{child.tail()}"
                )

    async def _watch(self, child: ChildProcess) -> None:
        """Start ``child`` again each time it exits on its own, until it exits too often."""
        loop = asyncio.get_running_loop()
        window_s = self.config.restart_window_s
        restarts: deque[float] = deque()
        while True:
            returncode = await child.wait()
            if child.name in self._restarting:
                return
            if self._stopping or self._failure is None or self._failure.done():
                return
            now = loop.time()
            while restarts and now - restarts[0] > window_s:
                restarts.popleft()
            restartable = child in self._children or self._servers.is_server(child)
            if not restartable or len(restarts) >= self.config.max_restarts:
                self._fail(child, returncode, len(restarts))
                return
            delay_s = restart_delay(
                self.config.restart_delay_s, self.config.max_restart_delay_s, len(restarts)
            )
            restarts.append(now)
            plan = (
                f"restarting it in {delay_s:.1f} s (restart {len(restarts)} of at most "
                f"{self.config.max_restarts} within {window_s:g} s)"
            )
            logger.warning("%s; %s", child.describe_exit(), plan)
            self._exits[child.name] = f"{exit_reason(child)}; {plan}"
            self._write_mesh_file()
            await asyncio.sleep(delay_s)
            if not await self._restart(child):
                return

    async def _reap_orphans(self) -> None:
        """Reap the adopted orphans that exit while the mesh runs, so that none stays a zombie.

        Runs under the start lock, so that a child being started, whose pid the mesh does not
        know yet, is never taken for an orphan.
        """
        while not self._stopping:
            await asyncio.sleep(ORPHAN_REAP_INTERVAL_S)
            async with self._start_lock:
                if self._stopping:
                    return
                known = {child.pid for child in self._all_children() if child.pid is not None}
                for pid, code in reap_exited_orphans(known):
                    logger.info(
                        "reaped pid %s, a process left behind by the mesh, exit code %s",
                        pid,
                        code,
                    )

    async def _restart(self, child: ChildProcess) -> bool:
        """Start ``child`` again and wait until it serves.

        Returns False when the caller should stop watching: the mesh stops, or
        :meth:`kill_and_restart` has started the child itself.

        It returns True for a restarted child that exits again or does not report SERVING
        within ``start_timeout_s`` too, with the child stopped, so the caller counts its exit
        as one more restart.
        """
        async with self._start_lock:
            # A running child was started by kill_and_restart meanwhile, whose own watcher
            # now follows it.
            if self._stopping or child.name in self._restarting or child.returncode is None:
                return False
            try:
                await self._servers.prepare_restart(child)
                await child.start()
            except OSError as exc:
                logger.error("failed to start %s again: %s", child.name, exc)
                self._fail(child, child.returncode or 1, 0)
                return False
            # `acsp status` reports the fleet's state by the pid in the mesh file.
            self._write_mesh_file()
        if self._servers.is_server(child):
            if await self._servers.wait_ready_again(child, self.config.start_timeout_s):
                self._clear_exit(child.name)
            return True
        endpoint = self.info.endpoints.get(child.name)
        if endpoint is None:
            logger.info("%s is running again (pid %s)", child.name, child.pid)
            self._clear_exit(child.name)
            return True
        try:
            await wait_serving(
                child.name,
                endpoint,
                self.client_credentials(None),
                timeout_s=self.config.start_timeout_s,
                still_running=lambda: child.returncode is None,
            )
        except RuntimeError:
            return True
        except TimeoutError as exc:
            logger.warning("%s; killing it to start it again", exc)
            await child.kill()
            return True
        logger.info("%s is SERVING again at %s (pid %s)", child.name, endpoint, child.pid)
        self._clear_exit(child.name)
        return True

    def _clear_exit(self, name: str) -> None:
        """Forget why ``name`` was down, now that it runs again, and write the mesh file."""
        if self._exits.pop(name, None) is not None:
            self._write_mesh_file()

    def _fail(self, child: ChildProcess, returncode: int, restarts: int) -> None:
        """End the wait of :meth:`wait_failure` with the exit of ``child``."""
        assert self._failure is not None
        description = child.describe_exit()
        limit = ""
        if restarts:
            limit = (
                f"It was restarted {restarts} times within {self.config.restart_window_s:g} "
                "s, the maximum, so the mesh stops"
            )
            description += f". {limit}"
        failure = ChildExit(child.name, returncode, description, child.tail())
        logger.error("%s", failure)
        self._exits[child.name] = f"{exit_reason(child)}. {limit or 'The mesh stops'}"
        self._write_mesh_file()
        self._failure.set_result(failure)

    def _write_mesh_file(self) -> None:
        """Write the mesh file again with the current process ids and the reasons of exits."""
        if self._info is None:
            return
        # A child that is down keeps its last pid, so that `acsp status` lists it as stopped.
        written = self._info.extra.get("pids", {})
        pids = {name: pid for name, pid in written.items() if name in self._exits}
        pids.update(self.pids)
        extra = {**self._info.extra, "pids": pids, EXITS_KEY: dict(self._exits)}
        if not self._exits:
            del extra[EXITS_KEY]
        self._info = dataclasses.replace(self._info, extra=extra)
        self._info.write()

    # --- stop -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop everything the mesh started: the fleet, then services, then NATS and PostgreSQL.

        Each process gets ``stop_grace_s`` after its stop signal, then SIGKILL. Safe to call
        twice. Cancellation during stop is deferred until every child is gone, so that no
        process outlives the mesh.
        """
        self._stopping = True
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
            known = {child.pid for child in self._all_children() if child.pid is not None}
            await stop_orphans(known, grace)
        await self._servers.stop(grace)
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
        if self._info is not None:
            with contextlib.suppress(FileNotFoundError):
                mesh_file = self.data_dir / MESH_FILE_NAME
                # Remove only our own file: another mesh may have taken the directory since.
                if f'"supervisor_pid": {os.getpid()}' in mesh_file.read_text():
                    mesh_file.unlink()
        if self._failure is not None and not self._failure.done():
            self._failure.cancel()
        # Last, once no process of this mesh runs.
        self._release_data_dir()
        logger.info("local mesh in %s stopped", self.data_dir)

    # --- helpers --------------------------------------------------------------------------

    def _all_children(self) -> list[ChildProcess]:
        return [*self._servers.processes, *self._children]

    def _log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"


__all__ = [
    "AGENTS_NAME",
    "DATABASE_URL_ENV",
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
