"""Per-request values that interceptors set and handlers read: request id and deadline.

The server's interceptors set both before a handler runs, so a handler (and anything it calls)
can read them without threading them through arguments::

    from services.runtime.context import remaining_s, request_id

    log.info("placing job", extra={"job_id": job_id})  # the log line carries request_id
    await grant_client.Hold(request, timeout=remaining_s())

:func:`remaining_s` is the time left before the incoming deadline, or the service's default
deadline when the caller set none; outbound calls made through
:mod:`services.runtime.channel` use it automatically.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("acsp_request_id", default=None)
_deadline: ContextVar[float | None] = ContextVar("acsp_deadline", default=None)


def new_request_id() -> str:
    """Return a fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def request_id() -> str | None:
    """Return the id of the request being handled, or None outside a request."""
    return _request_id.get()


def set_request_id(value: str | None) -> object:
    """Set the current request id; return a token for :func:`reset_request_id`."""
    return _request_id.set(value)


def reset_request_id(token: object) -> None:
    _request_id.reset(token)  # type: ignore[arg-type]


def deadline() -> float | None:
    """Return the current request's deadline on the ``time.monotonic()`` clock, or None."""
    return _deadline.get()


def set_deadline(monotonic_deadline: float | None) -> object:
    """Set the current deadline (``time.monotonic()`` seconds); return a reset token."""
    return _deadline.set(monotonic_deadline)


def reset_deadline(token: object) -> None:
    _deadline.reset(token)  # type: ignore[arg-type]


def remaining_s(default: float | None = None) -> float | None:
    """Return seconds left before the current deadline (at least 0), else ``default``."""
    current = _deadline.get()
    if current is None:
        return default
    return max(0.0, current - time.monotonic())
