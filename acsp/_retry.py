"""The SDK's retry policy, and the retries of batched calls that a channel cannot make.

gRPC retries idempotent calls itself, by the policy that :mod:`acsp._channel` writes into each
channel's service config from the constants here.

``PlaceHolds``, ``ReleaseHolds``, ``CommitCharges`` and ``SubmitJobs`` carry one ``request_id``
per item. The grant service and the scheduler store each item's id under a unique constraint,
so a repeated item returns what its first application did. Whether such a call is safe to
repeat depends on the request, which a service config cannot inspect, so the SDK's
interceptors retry these calls themselves. They retry only when every item carries a
non-empty request id, with the attempts, backoff and retried codes of the channel's policy,
all within the call's one deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

REQUEST_ID_FIELD: Final = "request_id"
MAX_ATTEMPTS: Final = 5
"""Attempts of one call, the first included."""
INITIAL_BACKOFF_S: Final = 0.1
MAX_BACKOFF_S: Final = 2.0
BACKOFF_MULTIPLIER: Final = 2
RETRYABLE_CODES: Final = (grpc.StatusCode.UNAVAILABLE,)


def batch_items_field(method: MethodDescriptor) -> str | None:
    """Return the repeated field whose items carry the request ids of a batched ``method``.

    Returns None for a method whose request has a ``request_id`` of its own, or no repeated
    message field with one.
    """
    request = method.input_type
    if REQUEST_ID_FIELD in request.fields_by_name:
        return None
    for field in request.fields:
        items = field.message_type
        if field.is_repeated and items is not None and REQUEST_ID_FIELD in items.fields_by_name:
            return str(field.name)
    return None


def batch_methods(services: Iterable[ServiceDescriptor]) -> dict[str, str]:
    """Map the path (``/<service>/<method>``) of every batched method to its items field."""
    methods: dict[str, str] = {}
    for service in services:
        for method in service.methods:
            field = batch_items_field(method)
            if field is not None and not method.server_streaming:
                methods[f"/{service.full_name}/{method.name}"] = field
    return methods


def every_item_has_request_id(request: Any, field: str) -> bool:
    """Return whether ``request`` has items in ``field`` and each has a non-empty request id."""
    if not isinstance(request, Message):
        return False
    items = getattr(request, field)
    return len(items) > 0 and all(getattr(item, REQUEST_ID_FIELD) for item in items)


def backoff_s(retry: int) -> float:
    """Return a random delay in seconds before retry number ``retry`` (1 for the first).

    The delay is uniform between 0 and ``INITIAL_BACKOFF_S * BACKOFF_MULTIPLIER ** (retry -
    1)``, capped at ``MAX_BACKOFF_S``, so that clients failed by one outage spread out.
    """
    ceiling = min(INITIAL_BACKOFF_S * BACKOFF_MULTIPLIER ** (retry - 1), MAX_BACKOFF_S)
    return random.uniform(0, ceiling)


def method_path(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


async def call_with_retries_async(
    continuation: Callable[..., Any],
    details: grpc.aio.ClientCallDetails,
    request: Any,
) -> Any:
    """Run an asyncio unary call, and repeat it on a retryable code until the deadline.

    Returns the last attempt's call, so the caller gets its response or its error.
    """
    timeout = details.timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    retry = 0
    while True:
        attempt = grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0),
            metadata=details.metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
        call = await continuation(attempt, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            retry += 1
            delay = _next_delay(error.code(), retry, deadline)
            if delay is None:
                return call
            await asyncio.sleep(delay)
            continue
        return call


def call_with_retries(continuation: Callable[..., Any], details: Any, request: Any) -> Any:
    """Run a blocking unary call, and repeat it on a retryable code until the deadline.

    ``details`` is a named tuple of call details. Returns the last attempt's outcome.
    """
    # NOTE: the retries run inside the interceptor, so ``stub.Method.future()`` on a batched
    # call blocks until the last attempt ends instead of returning at once.
    deadline = None if details.timeout is None else time.monotonic() + details.timeout
    retry = 0
    while True:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        outcome = continuation(details._replace(timeout=remaining), request)
        error = outcome.exception()
        if error is None:
            return outcome
        retry += 1
        delay = _next_delay(error.code(), retry, deadline)
        if delay is None:
            return outcome
        time.sleep(delay)


def _next_delay(code: grpc.StatusCode, retry: int, deadline: float | None) -> float | None:
    """Return the delay before retry number ``retry``, or None when the call must not repeat.

    A call stops on a code that is not retryable, after ``MAX_ATTEMPTS`` attempts, and when
    the delay would reach past its deadline.
    """
    if code not in RETRYABLE_CODES or retry >= MAX_ATTEMPTS:
        return None
    delay = backoff_s(retry)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


__all__ = [
    "BACKOFF_MULTIPLIER",
    "INITIAL_BACKOFF_S",
    "MAX_ATTEMPTS",
    "MAX_BACKOFF_S",
    "REQUEST_ID_FIELD",
    "RETRYABLE_CODES",
    "batch_methods",
    "call_with_retries",
    "call_with_retries_async",
    "every_item_has_request_id",
    "method_path",
]
