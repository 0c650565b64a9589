"""JetStream's ``publish_async`` without losing an ack slot each time it raises.

In nats-py 2.16, ``JetStreamContext.publish_async`` takes one of ``publish_async_max_pending``
slots (4,000 by default) and registers the future of the ack before it hands the message to the
connection. If the connection raises (over the server's max_payload, an invalid subject or
header, a closed or draining connection, a full reconnect buffer), that future is never
resolved, and only its resolution releases the slot. A publisher that meets such errors runs
out of slots, and then every ``publish_async`` waits for one forever, or until its
``wait_stall``.

:func:`publish_async` checks the payload size before taking a slot, and otherwise cancels the
future that the failed call left behind, which releases its slot.
``tests/runtime/test_ack_slots.py`` fails if a nats-py release stops leaking the slot or
renames the private state this reads.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import TooManyStalledMsgsError


async def publish_async(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, Any]
) -> asyncio.Future[PubAck]:
    """Call ``js.publish_async`` without ``wait_stall``, releasing the slot of a failed call.

    Raises MaxPayloadError without taking a slot for a payload over the server's max_payload,
    and otherwise what ``publish_async`` raises. The caller bounds the wait for a free slot.
    """
    # nats-py compares the payload alone, without the headers, to the server's max_payload.
    if len(payload) > js._nc.max_payload:
        raise MaxPayloadError
    newest_before = _newest_token(js)
    try:
        return await js.publish_async(subject, payload, wait_stall=None, headers=headers)
    except TooManyStalledMsgsError:
        raise  # raised while waiting for a slot, before any future was registered
    except BaseException:
        _cancel_orphan(js, newest_before)
        raise


def _newest_token(js: JetStreamContext) -> str | None:
    # Futures are registered in a dict, so the newest is last in insertion order.
    return next(reversed(js._publish_async_futures), None)


def _cancel_orphan(js: JetStreamContext, newest_before: str | None) -> None:
    """Cancel the future registered by the call that raised, which releases its slot.

    The connection raises without yielding to the event loop between the registration and the
    error, except during a forced flush. So the newest future is the failed call's, unless
    another task called ``publish_async`` on the same context during that flush. Cancelling
    that task's future instead makes it retry a message that may have been stored, which its
    ``Nats-Msg-Id`` deduplicates.
    """
    newest = _newest_token(js)
    if newest is None or newest == newest_before:
        return  # the call raised before it registered a future
    future = js._publish_async_futures[newest]
    if not future.done():
        future.cancel()  # its done callback releases the slot
