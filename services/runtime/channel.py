"""Client channels for service-to-service calls: mutual TLS, deadlines, trace context.

A service calls another through a channel from :func:`service_channel`::

    channel = service_channel(runtime.settings, "grant.acsp.svc:7001")
    grant = grant_pb2_grpc.GrantServiceStub(channel)
    reply = await grant.PlaceHold(request)        # bounded by the incoming call's deadline

Every call through it:

* presents this service's certificate (``ACSP_TLS_*``) when TLS is on, so the callee
  authenticates it as a ``service`` principal. :func:`open_channel` can add a bearer token;
* gets a timeout: the one the caller passed, cut to the time left before the incoming
  request's deadline, or ``ACSP_DEFAULT_DEADLINE_S`` outside a request;
* carries the current trace context (``traceparent``) and request id (``x-request-id``), and
  runs in a CLIENT span.

Close channels with ``await channel.close()`` at shutdown (an ``on_stop`` hook).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from acsp._channel import RECONNECT_OPTIONS
from services.runtime import context
from services.runtime.interceptors import REQUEST_ID_KEY
from services.runtime.settings import Settings
from services.runtime.telemetry import inject_metadata
from services.runtime.tls import load_channel_credentials


class _CallPreparer:
    """Shared logic of the client interceptors: timeout, metadata and span."""

    def __init__(self, default_deadline_s: float, token: str | None) -> None:
        self._default_deadline_s = default_deadline_s
        self._token = token
        self._tracer = trace.get_tracer(__name__)

    def prepare(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout
        remaining = context.remaining_s()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        elif timeout is None:
            timeout = self._default_deadline_s
        metadata: list[tuple[str, str | bytes]] = list(details.metadata or ())
        keys = {key for key, _ in metadata}
        request_id = context.request_id()
        if request_id is not None and REQUEST_ID_KEY not in keys:
            metadata.append((REQUEST_ID_KEY, request_id))
        if self._token is not None and "authorization" not in keys:
            metadata.append(("authorization", f"Bearer {self._token}"))
        metadata = inject_metadata(metadata)
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=timeout,
            metadata=grpc.aio.Metadata(*metadata),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    def span(self, details: grpc.aio.ClientCallDetails) -> Any:
        method = _method_name(details)
        service_name, _, method_name = method.lstrip("/").partition("/")
        return self._tracer.start_as_current_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service_name,
                "rpc.method": method_name,
            },
        )


class _UnaryUnary(_CallPreparer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        with self.span(details) as span:
            call = await continuation(self.prepare(details), request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            return call


class _UnaryStream(_CallPreparer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        with self.span(details):
            return await continuation(self.prepare(details), request)


class _StreamUnary(_CallPreparer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        with self.span(details) as span:
            call = await continuation(self.prepare(details), request_iterator)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            return call


class _StreamStream(_CallPreparer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        with self.span(details):
            return await continuation(self.prepare(details), request_iterator)


def client_interceptors(
    default_deadline_s: float, token: str | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """Return interceptors that add deadlines, trace context, request id and ``token``."""
    return [
        _UnaryUnary(default_deadline_s, token),
        _UnaryStream(default_deadline_s, token),
        _StreamUnary(default_deadline_s, token),
        _StreamStream(default_deadline_s, token),
    ]


SERVICE_CHANNEL_OPTIONS: Final = (
    ("grpc.service_config", json.dumps({"methodConfig": [{"name": [{}], "waitForReady": True}]})),
    *RECONNECT_OPTIONS,
)
"""Options of channels between services: every call waits for the channel to connect."""


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    default_deadline_s: float = 30.0,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """Open a channel to ``target`` (``host:port``); TLS when ``credentials`` are given."""
    interceptors = client_interceptors(default_deadline_s, token)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def service_channel(
    settings: Settings, target: str, *, token: str | None = None
) -> grpc.aio.Channel:
    """Open a channel to another acsp service with this service's TLS identity.

    Its calls wait, within their deadlines, for a restarting service to come back instead of
    failing at once while it is unreachable.
    """
    credentials = load_channel_credentials(settings) if settings.tls_enabled else None
    return open_channel(
        target,
        credentials=credentials,
        token=token,
        default_deadline_s=settings.default_deadline_s,
        options=SERVICE_CHANNEL_OPTIONS,
    )


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)
