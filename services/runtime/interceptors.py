"""Server interceptors: request id and access log, tracing, error mapping, deadlines, auth.

:class:`services.runtime.server.Service` installs them in this order (outermost first), so
inner ones run with the request id and span that outer ones set:

1. :class:`RequestLogInterceptor` sets the request id (``x-request-id`` metadata or a new one)
   and logs each finished call at DEBUG with its status and duration.
2. :class:`TracingInterceptor` continues the caller's trace in a SERVER span and records
   ``rpc.server.duration``.
3. :class:`ErrorInterceptor` maps :class:`~services.runtime.errors.ServiceError` to its status
   and any other exception to INTERNAL with a logged error id.
4. :class:`DeadlineInterceptor` publishes the call's deadline to
   :mod:`services.runtime.context` and bounds unary calls that came without one.
5. :class:`AuthInterceptor` authenticates the caller and sets the current principal.

Each is a plain ``grpc.aio.ServerInterceptor`` and works alone as well.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import asyncpg
import grpc
import nats.errors
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from services.runtime import auth, context
from services.runtime.db import RETRYABLE_ERRORS
from services.runtime.errors import (
    DeadlineExceeded,
    Internal,
    ServiceError,
    TransientError,
    Unavailable,
    status_for,
)
from services.runtime.telemetry import Telemetry, context_from_metadata

log = logging.getLogger(__name__)

REQUEST_ID_KEY: Final = "x-request-id"
_REQUEST_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Scope = Callable[[str, grpc.aio.ServicerContext, bool], AbstractAsyncContextManager[None]]


class ScopeInterceptor(grpc.aio.ServerInterceptor):
    """Run every call of every kind inside the async context manager :meth:`scope`."""

    def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        return wrap_handler(handler, method, self.scope)


def wrap_handler(handler: Any, method: str, scope: Scope) -> Any:
    """Return ``handler`` with its behavior run inside ``scope(method, context, streaming)``."""
    if not handler.response_streaming:
        name = "stream_unary" if handler.request_streaming else "unary_unary"
        behavior = getattr(handler, name)

        async def unary_response(request: Any, servicer_context: Any) -> Any:
            async with scope(method, servicer_context, False):
                return await behavior(request, servicer_context)

        return handler._replace(**{name: unary_response})

    name = "stream_stream" if handler.request_streaming else "unary_stream"
    behavior = getattr(handler, name)

    async def stream_response(request: Any, servicer_context: Any) -> AsyncIterator[Any]:
        async with scope(method, servicer_context, True):
            result = behavior(request, servicer_context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                # A handler that writes with ``context.write`` returns a coroutine.
                await result

    return handler._replace(**{name: stream_response})


class RequestLogInterceptor(ScopeInterceptor):
    """Set the request id for the call and log its outcome."""

    @asynccontextmanager
    async def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        request_id = _incoming_request_id(servicer_context) or context.new_request_id()
        token = context.set_request_id(request_id)
        started = time.perf_counter()
        try:
            yield
        finally:
            code = _final_code(servicer_context)
            log.debug(
                "call finished",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "code": code.name,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
            context.reset_request_id(token)


class TracingInterceptor(ScopeInterceptor):
    """Continue the caller's trace in a SERVER span and record call durations."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._tracer = telemetry.tracer
        self._duration = telemetry.meter.create_histogram(
            "rpc.server.duration", unit="ms", description="duration of inbound gRPC calls"
        )

    @asynccontextmanager
    async def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        parent = context_from_metadata(servicer_context.invocation_metadata())
        service_name, _, method_name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": method_name}
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            request_id = context.request_id()
            if request_id:
                span.set_attribute("acsp.request_id", request_id)
            try:
                yield
            finally:
                code = _final_code(servicer_context)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_FAULTS:
                    span.set_status(StatusCode.ERROR, code.name)
                self._duration.record(
                    (time.perf_counter() - started) * 1000,
                    {**attributes, "rpc.grpc.status_code": code.value[0]},
                )


# Codes that mean the server failed, as opposed to a caller mistake; OpenTelemetry's gRPC
# conventions mark only these as span errors on the server side.
_SERVER_FAULTS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class ErrorInterceptor(ScopeInterceptor):
    """Turn exceptions into gRPC statuses; the one place that maps errors to codes."""

    @asynccontextmanager
    async def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        try:
            yield
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            # The handler (or an inner interceptor) already set the status.
            raise
        except Exception as error:  # every other exception becomes a status here
            if isinstance(error, ServiceError):
                service_error: ServiceError = error
                _log_service_error(error, method)
            else:
                service_error = _translate(error, method)
            status = status_for(service_error)
            span = trace.get_current_span()
            span.record_exception(error)
            await servicer_context.abort(status.code, status.message, status.trailing_metadata)


class LogLimiter:
    """Allow at most ``per_second`` log lines per key each second and count the rest.

    Caller errors can arrive in floods, for example from a tool retrying without a token. So
    their log lines are limited per method and status code. The next line that passes carries
    the number suppressed since the previous one.
    """

    def __init__(self, per_second: int = 10) -> None:
        self._per_second = per_second
        self._windows: dict[tuple[str, str], tuple[int, int, int]] = {}

    def allow(self, key: tuple[str, str]) -> tuple[bool, int]:
        """Return whether to log now and how many lines were suppressed before this one."""
        second = int(time.monotonic())
        window, count, suppressed = self._windows.get(key, (second, 0, 0))
        if window != second:
            window, count = second, 0
        if count >= self._per_second:
            self._windows[key] = (window, count, suppressed + 1)
            return False, 0
        self._windows[key] = (window, count + 1, 0)
        return True, suppressed


_caller_error_limiter = LogLimiter()


def _log_service_error(error: ServiceError, method: str) -> None:
    extra: dict[str, object] = {"method": method, "code": error.code.name}
    if isinstance(error, Internal):
        log.error("call failed: %s", error.message, exc_info=error, extra=extra)
    elif isinstance(error, TransientError):
        log.warning("call failed: %s", error.message, extra=extra)
    else:
        allowed, suppressed = _caller_error_limiter.allow((method, error.code.name))
        if not allowed:
            return
        if suppressed:
            extra["suppressed"] = suppressed
        log.info("call rejected: %s", error.message, extra=extra)


def _translate(error: Exception, method: str) -> ServiceError:
    """Map an exception that is not a ServiceError, logging it; the cause stays in the log."""
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream call failed: pass on transient codes, anything else is our fault.
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            log.warning("downstream call timed out: %s", error.details(), extra={"method": method})
            return DeadlineExceeded(f"a downstream call timed out: {error.details()}")
        if code == grpc.StatusCode.UNAVAILABLE:
            log.warning("downstream call failed: %s", error.details(), extra={"method": method})
            return Unavailable(f"a downstream service is unavailable: {error.details()}")
    if isinstance(error, TimeoutError | nats.errors.TimeoutError):
        log.warning("timed out waiting for a dependency", exc_info=error, extra={"method": method})
        return Unavailable("timed out waiting for a dependency; retry with backoff")
    if isinstance(error, _UNREACHABLE_ERRORS):
        log.warning("a dependency is unreachable: %s", error, extra={"method": method})
        return Unavailable("the database or NATS is unreachable; retry with backoff")
    if isinstance(error, RETRYABLE_ERRORS):
        log.warning("transaction conflict was not retried: %s", error, extra={"method": method})
        return Unavailable("the transaction conflicted with a concurrent one; retry it")
    error_id = uuid.uuid4().hex[:16]
    log.error("unexpected error", exc_info=error, extra={"method": method, "error_id": error_id})
    return Internal(f"internal error {error_id}; the service logged it under error_id={error_id}")


# Connection failures of the database and NATS clients, and a database restart or query
# cancellation (SQLSTATE class 57): transient, so the caller may retry.
_UNREACHABLE_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.OperatorInterventionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
)


class DeadlineInterceptor(ScopeInterceptor):
    """Expose the call's deadline to handlers, applying ``default_s`` to unary calls without one.

    Streaming responses without a deadline run unbounded, because watch streams live long.
    Their downstream calls through :mod:`services.runtime.channel` still get the channel's
    default deadline.
    """

    def __init__(self, default_s: float) -> None:
        self._default_s = default_s

    @asynccontextmanager
    async def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        remaining = servicer_context.time_remaining()
        if remaining is None and not streaming:
            remaining = self._default_s
        if remaining is None:
            yield
            return
        token = context.set_deadline(time.monotonic() + remaining)
        try:
            if streaming:
                # grpc itself cancels a stream at its deadline. A timeout here could fire while
                # the generator is suspended at a yield, where it cannot turn into a status.
                yield
            else:
                async with _bounded(method, remaining):
                    yield
        finally:
            context.reset_deadline(token)


@asynccontextmanager
async def _bounded(method: str, limit_s: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(limit_s) as timeout:
            yield
    except TimeoutError:
        if timeout.expired():
            raise DeadlineExceeded(
                f"{method} did not finish within its deadline of {limit_s:.3f} s"
            ) from None
        raise


class AuthInterceptor(ScopeInterceptor):
    """Require an authenticated caller on every method except health and reflection."""

    def __init__(self, authenticator: auth.Authenticator) -> None:
        self._authenticator = authenticator

    @asynccontextmanager
    async def scope(
        self, method: str, servicer_context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        if auth.is_public_method(method):
            yield
            return
        principal = self._authenticator.authenticate(
            servicer_context.invocation_metadata() or (), servicer_context.auth_context()
        )
        trace.get_current_span().set_attribute("acsp.principal", principal.subject)
        token = auth.set_principal(principal)
        try:
            yield
        finally:
            auth.reset_principal(token)


def _incoming_request_id(servicer_context: grpc.aio.ServicerContext) -> str | None:
    for key, value in servicer_context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_PATTERN.match(value):
            return value
    return None


def _final_code(servicer_context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = servicer_context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next(
            (item for item in grpc.StatusCode if item.value[0] == code), grpc.StatusCode.UNKNOWN
        )
    return grpc.StatusCode.OK
