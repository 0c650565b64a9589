"""Retry a JetStream API call while a freshly started cluster cannot serve it yet.

Creating a stream with three replicas needs an election for the new stream's group, which on a
loaded machine can take longer than one request's timeout. Creating a stream or bucket twice with
the same configuration succeeds, so a request that timed out after the server acted is safe to
send again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

T = TypeVar("T")

RETRY_INTERVAL_S = 0.5


async def until_answered(call: Callable[[], Awaitable[T]], timeout_s: float = 90.0) -> T:
    """Return ``call()``'s result, calling it again on a timeout or a 503 until ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(RETRY_INTERVAL_S)
