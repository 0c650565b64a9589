"""The gRPC server bootstrap every acsp service runs on.

A service's ``__main__`` builds a :class:`Service` and hands it to :func:`run_service`::

    def register(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
        grant_pb2_grpc.add_GrantServiceServicer_to_server(GrantServicer(runtime), server)
        return [grant_pb2.DESCRIPTOR.services_by_name["GrantService"].full_name]

    def main() -> None:
        run_service("grant", lambda: Service(
            "grant", GrantSettings.from_env(), register,
            schema="grant", migrations="services.grant.migrations",
            streams=[StreamConfig(name=EVENT_STREAM, subjects=list(EVENT_SUBJECTS))],
            on_start=[start_expiry_loop], on_stop=[flush_outbox],
        ))

Start, in order:

1. apply migrations and open the database pool, when ``schema`` is given;
2. connect to NATS and declare streams and buckets, when ``ACSP_NATS_URL`` is set (required
   with ``needs_nats=True`` or any stream or bucket);
3. register the servicers, ``grpc.health.v1`` and reflection, and bind ``ACSP_GRPC_LISTEN``;
   bind ``ACSP_HEALTH_LISTEN`` too when set, a plaintext port with health Check alone
   (see :mod:`.health_port`);
4. run the ``on_start`` hooks, start serving and mark health SERVING;
5. log the bound addresses and write them (``host:port``) to ``ACSP_READY_FILE`` and
   ``ACSP_HEALTH_READY_FILE``.

Stop, on SIGTERM/SIGINT or :meth:`Service.stop`: mark health NOT_SERVING, stop accepting calls
and let in-flight ones finish within ``ACSP_SHUTDOWN_GRACE_S``, run the ``on_stop`` hooks,
close the health port, cancel background tasks, then drain NATS and close the pool. The
health port answers NOT_SERVING until the hooks are done. Background tasks started with
:meth:`Runtime.spawn` belong to one TaskGroup; if one fails, the service stops and
:func:`run_service` exits with status 1.

Hooks are bounded too: an ``on_start`` hook that runs past START_HOOK_TIMEOUT_S fails the
start, and each ``on_stop`` hook gets the grace period (at least MIN_STOP_HOOK_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext

from services.runtime import interceptors
from services.runtime.auth import Authenticator, TokenVerifier
from services.runtime.db import Database
from services.runtime.errors import StartupError
from services.runtime.health_port import build_health_server
from services.runtime.heap import settle_heap
from services.runtime.logs import configure_logging
from services.runtime.migrations import apply_migrations
from services.runtime.nats import close_nats, connect_nats, ensure_key_value, ensure_stream
from services.runtime.nul_check import NulCharacterInterceptor
from services.runtime.settings import ListenAddress, Settings, SettingsError
from services.runtime.telemetry import Telemetry, setup_telemetry
from services.runtime.tls import load_server_credentials

log = logging.getLogger(__name__)

STARTUP_FAILURE_EXIT: int = 2
RUNTIME_FAILURE_EXIT: int = 1
START_HOOK_TIMEOUT_S: float = 60.0
MIN_STOP_HOOK_TIMEOUT_S: float = 1.0


@dataclass
class Runtime:
    """Shared state of a running service, handed to its servicers and hooks."""

    name: str
    settings: Settings
    telemetry: Telemetry
    db: Database | None = None
    """The pool, when the service was given a schema."""
    nats: Client | None = None
    js: JetStreamContext | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when shutdown begins; background loops should finish their step and return."""
    address: str | None = None
    """``host:port`` the server is bound to, once it is."""
    health_address: str | None = None
    """``host:port`` of the plaintext health port, once bound; None without ACSP_HEALTH_LISTEN."""
    _task_group: asyncio.TaskGroup | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _health: health.aio.HealthServicer | None = None
    _service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING on grpc.health.v1 for every service of this process.

        For a replica that cannot take calls for a while (a scheduler follower, say). It has no
        effect once shutdown has begun, where health stays NOT_SERVING.
        """
        if self._health is None:
            raise RuntimeError("Runtime.set_serving is only valid once the server is built")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service_name in ["", *self._service_names]:
            await self._health.set(service_name, status)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` in the service's TaskGroup; it is cancelled at shutdown.

        Only valid from ``on_start`` hooks onwards. An exception in it stops the service.
        """
        if self._task_group is None:
            coroutine.close()
            raise RuntimeError("Runtime.spawn is only valid once the service is starting")
        task = self._task_group.create_task(coroutine, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


Register = Callable[[grpc.aio.Server, Runtime], Iterable[str]]
"""Adds servicers to the server and returns their full service names."""
Hook = Callable[[Runtime], Awaitable[None]]


class Service:
    """One gRPC service process: its resources, server and lifecycle."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        register: Register,
        *,
        schema: str | None = None,
        migrations: str | None = None,
        needs_nats: bool = False,
        streams: Sequence[StreamConfig] = (),
        buckets: Sequence[KeyValueConfig] = (),
        on_start: Sequence[Hook] = (),
        on_stop: Sequence[Hook] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self._register = register
        self._schema = schema
        self._migrations = migrations
        self._needs_nats = needs_nats or bool(streams) or bool(buckets)
        self._streams = streams
        self._buckets = buckets
        self._on_start = on_start
        self._on_stop = on_stop
        self._stop_requested = asyncio.Event()
        self._grace_s = settings.shutdown_grace_s
        self.ready = asyncio.Event()
        """Set once the server accepts calls."""
        self.runtime: Runtime | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service_names: list[str] = []
        self._drained = False

    @property
    def address(self) -> str:
        """The bound ``host:port``; only valid once :attr:`ready` is set."""
        assert self.runtime is not None and self.runtime.address is not None
        return self.runtime.address

    def stop(self, grace_s: float | None = None) -> None:
        """Ask the service to shut down; ``grace_s`` overrides ACSP_SHUTDOWN_GRACE_S."""
        if grace_s is not None:
            self._grace_s = grace_s
        self._stop_requested.set()

    async def run(self, handle_signals: bool = False) -> None:
        """Start, serve until :meth:`stop` or a signal, then shut down; raise StartupError."""
        telemetry = setup_telemetry(self.name, self.settings)
        runtime = Runtime(self.name, self.settings, telemetry)
        self.runtime = runtime
        if handle_signals:
            self._install_signal_handlers()
        try:
            await self._open_resources(runtime)
            self._server = self._build_server(runtime)
            async with asyncio.TaskGroup() as task_group:
                runtime._task_group = task_group
                await self._start_serving(runtime)
                await self._stop_requested.wait()
                await self._drain(runtime)
        finally:
            await self._drain(runtime)
            await self._close_resources(runtime)
            if handle_signals:
                self._remove_signal_handlers()

    async def _open_resources(self, runtime: Runtime) -> None:
        settings = self.settings
        if self._schema is not None:
            database_url: str = settings.require("database_url")
            if self._migrations is not None:
                applied = await apply_migrations(database_url, self._schema, self._migrations)
                log.info("migrations done", extra={"schema": self._schema, "applied": len(applied)})
            runtime.db = await Database.connect(settings, self._schema, self.name)
        if self._needs_nats or settings.nats_url is not None:
            runtime.nats = await connect_nats(settings, self.name)
            runtime.js = runtime.nats.jetstream()
            for stream in self._streams:
                await ensure_stream(runtime.js, stream)
            for bucket in self._buckets:
                await ensure_key_value(runtime.js, bucket)

    def _build_server(self, runtime: Runtime) -> grpc.aio.Server:
        settings = self.settings
        verifier = _load_verifier(settings)
        if verifier is None and not settings.tls_enabled:
            log.warning(
                "neither ACSP_TOKEN_PUBLIC_KEY nor ACSP_TLS_* is set: every call except health "
                "and reflection will be rejected as unauthenticated"
            )

        server = grpc.aio.server(
            interceptors=[
                interceptors.RequestLogInterceptor(),
                interceptors.TracingInterceptor(runtime.telemetry),
                interceptors.ErrorInterceptor(),
                interceptors.DeadlineInterceptor(settings.default_deadline_s),
                interceptors.AuthInterceptor(Authenticator(verifier)),
                NulCharacterInterceptor(),
            ],
            # Without this, a second process could bind the same port and split the traffic.
            options=[("grpc.so_reuseport", 0)],
            # Calls beyond this are rejected at once instead of queueing without bound.
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )

        self._service_names = list(self._register(server, runtime))
        self._health = health.aio.HealthServicer()
        runtime._health = self._health
        runtime._service_names = self._service_names
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)

        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )

        runtime.address = self._bind(server)
        if settings.health_listen is not None:
            self._health_server, runtime.health_address = build_health_server(
                self._health, settings.health_listen
            )
        return server

    def _bind(self, server: grpc.aio.Server) -> str:
        listen = self.settings.grpc_listen
        try:
            if self.settings.tls_enabled:
                port = server.add_secure_port(str(listen), load_server_credentials(self.settings))
            else:
                port = server.add_insecure_port(str(listen))
        except RuntimeError as error:
            raise SettingsError(
                "ACSP_GRPC_LISTEN",
                f"cannot bind {listen}: {error}",
                "choose a free port (0 picks one) on an address of this host",
            ) from None
        if port == 0:
            raise SettingsError(
                "ACSP_GRPC_LISTEN",
                f"cannot bind {listen}",
                "choose a free port (0 picks one) on an address of this host",
            )
        return str(ListenAddress(listen.host, port))

    async def _start_serving(self, runtime: Runtime) -> None:
        assert self._server is not None and self._health is not None
        for hook in self._on_start:
            try:
                async with asyncio.timeout(START_HOOK_TIMEOUT_S):
                    await hook(runtime)
            except TimeoutError:
                raise StartupError(
                    f"on_start hook {_hook_name(hook)}",
                    f"did not finish within {START_HOOK_TIMEOUT_S:g} s",
                    "check what it waits for; run long work in Runtime.spawn instead",
                ) from None
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        await runtime.set_serving(True)
        extra: dict[str, Any] = {
            "address": runtime.address,
            "tls": self.settings.tls_enabled,
            "pid": os.getpid(),
        }
        if runtime.health_address is not None:
            extra["health_address"] = runtime.health_address
        log.info("serving", extra=extra)
        if self.settings.ready_file is not None:
            _write_atomically(self.settings.ready_file, f"{runtime.address}\n")
        if self.settings.health_ready_file is not None:
            _write_atomically(self.settings.health_ready_file, f"{runtime.health_address}\n")
        self.ready.set()

    async def _drain(self, runtime: Runtime) -> None:
        if self._drained:
            return
        self._drained = True
        runtime.stopping.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("stopping: finishing in-flight calls", extra={"grace_s": self._grace_s})
            await self._server.stop(self._grace_s)
        # Each stop hook gets its own grace period, so one stuck hook cannot hold the process.
        stop_hook_timeout_s = max(self._grace_s, MIN_STOP_HOOK_TIMEOUT_S)
        for hook in reversed(self._on_stop):
            try:
                async with asyncio.timeout(stop_hook_timeout_s):
                    await hook(runtime)
            except TimeoutError:
                log.error(
                    "on_stop hook did not finish in %s s; continuing shutdown",
                    stop_hook_timeout_s,
                    extra={"hook": _hook_name(hook)},
                )
            except Exception:
                log.exception("on_stop hook failed", extra={"hook": _hook_name(hook)})
        if self._health_server is not None:
            # Probes saw NOT_SERVING until here; no call on this port is worth waiting for.
            await self._health_server.stop(None)
        for task in list(runtime._tasks):
            task.cancel()

    async def _close_resources(self, runtime: Runtime) -> None:
        if runtime.nats is not None:
            await close_nats(runtime.nats)
        if runtime.db is not None:
            await runtime.db.close()
        runtime.telemetry.shutdown()
        if self.ready.is_set():
            if self.settings.ready_file is not None:
                self.settings.ready_file.unlink(missing_ok=True)
            if self.settings.health_ready_file is not None:
                self.settings.health_ready_file.unlink(missing_ok=True)
            log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested.is_set():
            log.warning(
                "received %s again; still waiting up to %s s for calls", name, self._grace_s
            )
            return
        log.info("received %s; shutting down", name)
        self._stop_requested.set()


def run_service(name: str, build: Callable[[], Service]) -> NoReturn:
    """Run the service ``build()`` returns in this process and exit with its status.

    Settings and startup errors print one line to stderr and exit with status 2;
    a failure while serving exits with status 1; a clean shutdown exits with 0.
    """
    level = os.environ.get("ACSP_LOG_LEVEL", "INFO").upper()
    configure_logging(name, level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
    try:
        service = build()
        configure_logging(name, service.settings.log_level, log_format=service.settings.log_format)
        settle_heap()
        asyncio.run(service.run(handle_signals=True))
    except Exception as error:
        startup = _startup_error(error)
        if startup is not None:
            print(f"acsp-{name}: cannot start: {startup}", file=sys.stderr, flush=True)
            sys.exit(STARTUP_FAILURE_EXIT)
        log.critical("service failed", exc_info=error)
        sys.exit(RUNTIME_FAILURE_EXIT)
    sys.exit(0)


def _startup_error(error: BaseException) -> StartupError | None:
    # A StartupError raised in an on_start hook reaches us inside the TaskGroup's group.
    if isinstance(error, StartupError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


def _hook_name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


def _load_verifier(settings: Settings) -> TokenVerifier | None:
    if settings.token_public_key is None:
        return None
    try:
        return TokenVerifier.from_file(settings.token_public_key)
    except ValueError as error:
        raise SettingsError(
            "ACSP_TOKEN_PUBLIC_KEY",
            f"{settings.token_public_key} is unusable: {error}",
            "point it to a PEM Ed25519 public key such as <data dir>/token/signing.pub",
        ) from None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
