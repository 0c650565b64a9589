"""A local mesh for blocking code (notebooks, scripts): its supervisor runs in a thread.

::

    with BackgroundMesh(MeshConfig(data_dir=Path("/tmp/mesh"))) as mesh:
        with Client.from_mesh(mesh.info, token=mesh.token("pi", "alice")) as client:
            ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Final, Self

from acsp.mesh.endpoints import MeshInfo
from acsp.mesh.supervisor import LocalMesh, MeshConfig

STOP_MARGIN_S: Final = 15.0
"""Seconds allowed for a stop beyond the processes' grace periods (SIGKILL and reaping)."""


class BackgroundMesh:
    """Runs a :class:`LocalMesh` on an event loop of its own in a daemon thread."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="acsp-local-mesh", daemon=True)
        self._mesh: LocalMesh | None = None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, None], action: str, timeout_s: float) -> None:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the local mesh did not {action} within {timeout_s:.0f} s"
            ) from None

    def start(self) -> None:
        """Start the mesh and block until every service reports SERVING."""
        self._thread.start()
        self._mesh = LocalMesh(self.config)
        try:
            # The supervisor enforces start_timeout_s itself; the margin covers its cleanup.
            self._run(self._mesh.start(), "start", self.config.start_timeout_s + STOP_MARGIN_S)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        """Stop every process of the mesh and the thread; safe to call twice."""
        if self._mesh is None or self._loop.is_closed():
            return
        try:
            stop_timeout_s = 4 * self.config.stop_grace_s + STOP_MARGIN_S
            self._run(self._mesh.stop(), "stop", stop_timeout_s)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_MARGIN_S)

    @property
    def info(self) -> MeshInfo:
        if self._mesh is None:
            raise RuntimeError("the mesh is not running: use `with BackgroundMesh(...)`")
        return self._mesh.info

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
        if self._mesh is None:
            raise RuntimeError("the mesh is not running: use `with BackgroundMesh(...)`")
        return self._mesh.token(
            role, subject, institution=institution, provider=provider, ttl_s=ttl_s
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
