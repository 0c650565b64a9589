"""gRPC channels for the SDK: TLS with the mesh's CA, the caller's token, deadlines, retries.

Every call gets a deadline: the per-call ``timeout=`` if given, else the client's default.
Calls are retried on UNAVAILABLE by gRPC itself (a retry policy in the channel's service config)
only when they are idempotent: reads, and mutating calls whose request carries a
``request_id``. The SDK fills an empty ``request_id`` with a fresh UUID before the first try,
so that every retry of that call carries the same id and the server applies it once.

Batched calls (``PlaceHolds``, ``ReleaseHolds``, ``CommitCharges``, ``SubmitJobs``) carry a
request id on each item instead. The SDK retries one with the same policy only when every
item has a non-empty request id, and leaves empty ones empty (see :mod:`acsp._retry`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from acsp._retry import (
    BACKOFF_MULTIPLIER,
    INITIAL_BACKOFF_S,
    MAX_ATTEMPTS,
    MAX_BACKOFF_S,
    REQUEST_ID_FIELD,
    RETRYABLE_CODES,
    batch_methods,
    call_with_retries,
    call_with_retries_async,
    every_item_has_request_id,
    method_path,
)

DEFAULT_TIMEOUT_S: Final = 10.0
"""Deadline of a call that sets none, in seconds."""
MAX_TIMEOUT_S: Final = 1e9
"""Largest deadline of a call, in seconds (about 31.7 years).

With grpcio 1.85, a call whose deadline lies after 2262-04-11, where nanoseconds since the
Unix epoch overflow a signed 64-bit integer, fails at once with DEADLINE_EXCEEDED. A deadline
of 1e9 s from now stays before that date until the year 2230."""
RECONNECT_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
"""Channel options that try a lost server again within a second, so a call that waits for
the channel finds a restarted service soon after it is back. gRPC's defaults wait up to
120 s between tries."""
READ_PREFIXES: Final = ("Get", "List", "Watch", "Query", "Check", "Export")
"""Method name prefixes of read calls, which change nothing and so are safe to retry."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Caller credentials: the CA to trust, a bearer token and an optional client certificate."""

    ca_cert_pem: bytes | None = None
    """PEM of the CA that signed the servers; None makes a plaintext channel (tests, debugging)."""
    token: str | None = None
    """Signed token sent as ``authorization: Bearer <token>`` on every call."""
    client_cert_pem: bytes | None = None
    """PEM client certificate, required by servers that run mutual TLS."""
    client_key_pem: bytes | None = None
    """PEM private key of ``client_cert_pem``."""

    @classmethod
    def from_files(
        cls,
        *,
        ca_cert: Path | None,
        token: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> Credentials:
        return cls(
            ca_cert_pem=ca_cert.read_bytes() if ca_cert is not None else None,
            token=token,
            client_cert_pem=client_cert.read_bytes() if client_cert is not None else None,
            client_key_pem=client_key.read_bytes() if client_key is not None else None,
        )

    def __repr__(self) -> str:
        # Never show the token, since reprs end up in logs and tracebacks.
        token = "set" if self.token else None
        return (
            f"Credentials(tls={self.ca_cert_pem is not None}, token={token}, "
            f"client_cert={self.client_cert_pem is not None})"
        )


def is_idempotent(method: MethodDescriptor) -> bool:
    """Return True if repeating ``method`` is safe: a read, or a request with a request id."""
    if method.name.startswith(READ_PREFIXES):
        return True
    return REQUEST_ID_FIELD in method.input_type.fields_by_name


def retry_service_config(
    services: Iterable[ServiceDescriptor], wait_for_ready: bool = False
) -> str:
    """Return a gRPC service config (JSON) that retries the idempotent methods on UNAVAILABLE.

    With ``wait_for_ready`` every call waits, within its deadline, for the channel to connect
    instead of failing at once while the server is unreachable (a service restarting).
    """
    names = [
        {"service": service.full_name, "method": method.name}
        for service in services
        for method in service.methods
        if is_idempotent(method)
    ]
    config: dict[str, Any] = {"methodConfig": []}
    if wait_for_ready:
        # The empty name matches every method that no more specific entry names.
        config["methodConfig"].append({"name": [{}], "waitForReady": True})
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "waitForReady": wait_for_ready,
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": f"{INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{MAX_BACKOFF_S}s",
                    "backoffMultiplier": BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": [code.name for code in RETRYABLE_CODES],
                },
            }
        )
    return json.dumps(config)


def channel_options(
    services: Sequence[ServiceDescriptor], wait_for_ready: bool = False
) -> list[tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(services, wait_for_ready)),
        # Short keepalive so that a client notices a restarted local service quickly.
        ("grpc.keepalive_time_ms", 30_000),
        *RECONNECT_OPTIONS,
    ]


def _channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_cert_pem,
        private_key=credentials.client_key_pem,
        certificate_chain=credentials.client_cert_pem,
    )


def _with_request_id(request: Any) -> Any:
    """Return a copy of ``request`` whose empty ``request_id`` is set to a fresh UUID.

    Returns ``request`` itself when it has no such field or the field is already set.
    """
    if not isinstance(request, Message):
        return request
    descriptor = request.DESCRIPTOR
    if REQUEST_ID_FIELD not in descriptor.fields_by_name:
        return request
    if getattr(request, REQUEST_ID_FIELD):
        return request
    filled = type(request)()
    filled.CopyFrom(request)
    setattr(filled, REQUEST_ID_FIELD, str(uuid.uuid4()))
    return filled


def _merged_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None, token: str | None
) -> list[tuple[str, str | bytes]]:
    merged = list(metadata or ())
    if token and not any(key == "authorization" for key, _ in merged):
        merged.append(("authorization", f"Bearer {token}"))
    return merged


# --- asyncio ----------------------------------------------------------------------------------


class _AsyncCallDefaults:
    """Add the token, the default deadline and a request id to an asyncio call's details."""

    def __init__(
        self, token: str | None, timeout_s: float, batches: Mapping[str, str] | None = None
    ) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._batches = dict(batches or {})
        """Items field of each batched method, by method path."""

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout if details.timeout is not None else self._timeout_s,
            metadata=grpc.aio.Metadata(*_merged_metadata(details.metadata, self._token)),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


# grpc.aio files each interceptor under the first call kind it implements, so each kind needs
# an interceptor object of its own.
class _AsyncUnaryUnaryDefaults(_AsyncCallDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details = self._details(client_call_details)
        request = _with_request_id(request)
        field = self._batches.get(method_path(details.method))
        if field is not None and every_item_has_request_id(request, field):
            return await call_with_retries_async(continuation, details, request)
        return await continuation(details, request)


class _AsyncUnaryStreamDefaults(_AsyncCallDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), _with_request_id(request))


def check_timeout(timeout_s: float) -> None:
    """Raise ValueError unless ``timeout_s`` is above zero and at most :data:`MAX_TIMEOUT_S`."""
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout_s {timeout_s!r} is invalid; give a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_S:.0f}"
        )


def open_async_channel(
    target: str,
    credentials: Credentials,
    *,
    services: Sequence[ServiceDescriptor],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    wait_for_ready: bool = True,
) -> grpc.aio.Channel:
    """Open an asyncio channel to ``target`` (``host:port``) for the given services.

    With ``wait_for_ready`` (the default) a call waits, within its deadline, for an unreachable
    server to come back instead of failing at once.
    """
    check_timeout(timeout_s)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        _AsyncUnaryUnaryDefaults(credentials.token, timeout_s, batch_methods(services)),
        _AsyncUnaryStreamDefaults(credentials.token, timeout_s),
    ]
    options = channel_options(services, wait_for_ready)
    if credentials.ca_cert_pem is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, _channel_credentials(credentials), options=options, interceptors=interceptors
    )


# --- blocking ---------------------------------------------------------------------------------


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncCallDefaults(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Add the token, the default deadline and a request id to every blocking call, and retry
    batched calls whose items all carry request ids."""

    def __init__(
        self, token: str | None, timeout_s: float, batches: Mapping[str, str] | None = None
    ) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._batches = dict(batches or {})
        """Items field of each batched method, by method path."""

    def _details(self, details: Any) -> grpc.ClientCallDetails:
        timeout = details.timeout if details.timeout is not None else self._timeout_s
        return _CallDetails(  # type: ignore[return-value]
            method=details.method,
            timeout=timeout,
            metadata=_merged_metadata(details.metadata, self._token),
            credentials=details.credentials,
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details = self._details(client_call_details)
        request = _with_request_id(request)
        field = self._batches.get(method_path(details.method))
        if field is not None and every_item_has_request_id(request, field):
            return call_with_retries(continuation, details, request)
        return continuation(details, request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), _with_request_id(request))


def open_channel(
    target: str,
    credentials: Credentials,
    *,
    services: Sequence[ServiceDescriptor],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    wait_for_ready: bool = True,
) -> grpc.Channel:
    """Open a blocking channel to ``target`` (``host:port``) for the given services.

    ``wait_for_ready`` is as for :func:`open_async_channel`.
    """
    check_timeout(timeout_s)
    options = channel_options(services, wait_for_ready)
    if credentials.ca_cert_pem is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, _channel_credentials(credentials), options=options)
    defaults = _SyncCallDefaults(credentials.token, timeout_s, batch_methods(services))
    return grpc.intercept_channel(channel, defaults)
