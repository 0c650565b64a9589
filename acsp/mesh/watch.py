"""The watch over a running mesh: each child that exits on its own is started again.

A service, the fleet, the embedded PostgreSQL or the embedded NATS that exits while the mesh
runs is started again with the same command line, environment and port, after a delay that
doubles with each restart up to ``max_restart_delay_s``. A restarted service counts as back
once it reports SERVING, and a server once it serves its clients again. While a child is down,
the mesh file gives the reason. Once a child has been restarted ``max_restarts`` times within
``restart_window_s``, its next exit resolves :attr:`ChildWatch.failure` with a
:class:`~acsp.mesh.failures.ChildExit`, and the mesh stops.

The watch also reaps the orphans that a mesh adopts as a child subreaper while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

from acsp._channel import Credentials
from acsp.mesh._process import ChildProcess, reap_exited_orphans
from acsp.mesh.config import MeshConfig
from acsp.mesh.failures import ChildExit
from acsp.mesh.health import wait_serving
from acsp.mesh.restarts import exit_reason, restart_delay
from acsp.mesh.servers import EmbeddedServers
from acsp.mesh.status import MeshStatus

logger = logging.getLogger(__name__)

ORPHAN_REAP_INTERVAL_S: Final = 1.0
"""Seconds between checks for exited orphans, which stay zombies until the next check."""


class ChildWatch:
    """Restarts the children of a running mesh and reports the one that exits too often.

    Each watched child has a task of its own, which this object owns. ``start_lock`` is held
    while a child starts again and while the mesh stops its children, so that a restart cannot
    start a process that the stop has already passed over.
    """

    def __init__(
        self,
        config: MeshConfig,
        servers: EmbeddedServers,
        children: list[ChildProcess],
        status: MeshStatus,
        start_lock: asyncio.Lock,
        credentials: Callable[[], Credentials],
    ) -> None:
        self.config = config
        self.servers = servers
        self.children = children
        """The children that the mesh started from its process specs, in start order."""
        self.status = status
        self.start_lock = start_lock
        self._credentials = credentials
        """Callable that returns the credentials of the health checks of a restarted service."""
        self.failure: asyncio.Future[ChildExit] | None = None
        """Future of the exit of the child that exited too often, created by :meth:`begin`."""
        self.stopping = False
        """Flag set once the mesh stops, after which no child is started again."""
        self._restarting: set[str] = set()
        """Names of the children that :meth:`restarting` hands to the caller."""
        self._tasks: list[asyncio.Task[None]] = []

    def begin(self) -> None:
        """Create :attr:`failure`, on the running loop."""
        self.failure = asyncio.get_running_loop().create_future()

    def all_children(self) -> list[ChildProcess]:
        """Return the embedded servers' processes and the children, in start order."""
        return [*self.servers.processes, *self.children]

    def watch(self, child: ChildProcess) -> None:
        """Start a task that restarts ``child`` each time it exits on its own."""
        task = asyncio.get_running_loop().create_task(
            self._watch(child), name=f"watch {child.name}"
        )
        self._tasks.append(task)

    def reap_orphans(self) -> None:
        """Start a task that reaps the orphans that exit while the mesh runs."""
        task = asyncio.get_running_loop().create_task(self._reap_orphans(), name="reap orphans")
        self._tasks.append(task)

    @contextlib.contextmanager
    def restarting(self, name: str) -> Iterator[None]:
        """Leave the exits of ``name`` to the caller, who starts it again, while in the block."""
        self._restarting.add(name)
        try:
            yield
        finally:
            self._restarting.discard(name)

    async def close(self) -> None:
        """Cancel every task of the watch, and the wait for :attr:`failure`."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.failure is not None and not self.failure.done():
            self.failure.cancel()

    async def _watch(self, child: ChildProcess) -> None:
        """Start ``child`` again each time it exits on its own, until it exits too often."""
        loop = asyncio.get_running_loop()
        window_s = self.config.restart_window_s
        restarts: deque[float] = deque()
        while True:
            returncode = await child.wait()
            if child.name in self._restarting:
                return
            if self.stopping or self.failure is None or self.failure.done():
                return
            now = loop.time()
            while restarts and now - restarts[0] > window_s:
                restarts.popleft()
            restartable = child in self.children or self.servers.is_server(child)
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
            self.status.record_exit(child.name, f"{exit_reason(child)}; {plan}")
            await asyncio.sleep(delay_s)
            if not await self._restart(child):
                return

    async def _reap_orphans(self) -> None:
        """Reap the adopted orphans that exit while the mesh runs, so that none stays a zombie.

        Runs under the start lock, so that a child being started, whose pid the mesh does not
        know yet, is never taken for an orphan.
        """
        while not self.stopping:
            await asyncio.sleep(ORPHAN_REAP_INTERVAL_S)
            async with self.start_lock:
                if self.stopping:
                    return
                known = {child.pid for child in self.all_children() if child.pid is not None}
                for pid, code in reap_exited_orphans(known):
                    logger.info(
                        "reaped pid %s, a process left behind by the mesh, exit code %s",
                        pid,
                        code,
                    )

    async def _restart(self, child: ChildProcess) -> bool:
        """Start ``child`` again and wait until it serves.

        Returns False when the caller should stop watching: the mesh stops, or
        :meth:`acsp.mesh.supervisor.LocalMesh.kill_and_restart` has started the child itself.

        It returns True for a restarted child that exits again or does not report SERVING
        within ``start_timeout_s`` too, with the child stopped, so the caller counts its exit
        as one more restart.
        """
        async with self.start_lock:
            # A running child was started by kill_and_restart meanwhile, whose own watcher
            # now follows it.
            if self.stopping or child.name in self._restarting or child.returncode is None:
                return False
            try:
                await self.servers.prepare_restart(child)
                await child.start()
            except OSError as exc:
                logger.error("failed to start %s again: %s", child.name, exc)
                self._fail(child, child.returncode or 1, 0)
                return False
            # `acsp status` reports the fleet's state by the pid in the mesh file.
            self.status.write()
        if self.servers.is_server(child):
            if await self.servers.wait_ready_again(child, self.config.start_timeout_s):
                self.status.clear_exit(child.name)
            return True
        assert self.status.info is not None
        endpoint = self.status.info.endpoints.get(child.name)
        if endpoint is None:
            logger.info("%s is running again (pid %s)", child.name, child.pid)
            self.status.clear_exit(child.name)
            return True
        try:
            await wait_serving(
                child.name,
                endpoint,
                self._credentials(),
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
        self.status.clear_exit(child.name)
        return True

    def _fail(self, child: ChildProcess, returncode: int, restarts: int) -> None:
        """Resolve :attr:`failure` with the exit of ``child``."""
        assert self.failure is not None
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
        self.status.record_exit(child.name, f"{exit_reason(child)}. {limit or 'The mesh stops'}")
        self.failure.set_result(failure)
