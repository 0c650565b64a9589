"""JetStream publishing with many acknowledgements in flight and a bounded wait."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from .commands import command_subject
from .store import DispatchRecord, OutboxEvent

logger = logging.getLogger(__name__)

_REJECTED_LOCALLY: Final = (MaxPayloadError, BadSubjectError, BadHeaderError)
"""Errors nats-py raises before sending, which the same message raises on every retry."""
JS_MESSAGE_TOO_LARGE: Final = 10054
"""JetStream's error code for a message over the stream's ``max_msg_size``."""

Outcome = bool | str
"""True when JetStream stored the message, False to retry it, or why it can never be sent."""


class Publisher:
    """Publish commands and job events; the caller learns which ones JetStream stored.

    A message that can never be published, such as one over the server's max_payload, is
    reported as rejected with the reason, and the other messages of its wave go on.
    """

    def __init__(self, js: JetStreamContext, timeout_s: float = 5.0) -> None:
        self._js = js
        self._timeout = timeout_s

    async def publish_all(
        self, records: Sequence[DispatchRecord], events: Sequence[OutboxEvent]
    ) -> tuple[list[tuple[str, int, int, str]], list[str], list[tuple[DispatchRecord, str]]]:
        """Publish commands and job events with all their acks in flight at once.

        Returns the command keys and the event ids that JetStream acknowledged, and the
        commands that can never be published, each with the reason.
        """
        messages = [(command_subject(r), r.payload, "/".join(map(str, r.key))) for r in records]
        messages.extend((e.subject, e.payload, e.msg_id) for e in events)
        outcomes = await self._publish(messages)
        keys: list[tuple[str, int, int, str]] = []
        rejected: list[tuple[DispatchRecord, str]] = []
        for record, outcome in zip(records, outcomes[: len(records)], strict=True):
            if outcome is True:
                keys.append(record.key)
            elif isinstance(outcome, str):
                rejected.append((record, outcome))
        # NOTE: a rejected job event stays in the outbox and is retried, because events are
        # small and bounded by the submission checks, so a rejection means a bug to fix.
        event_ids = [
            e.msg_id for e, ok in zip(events, outcomes[len(records) :], strict=True) if ok is True
        ]
        return keys, event_ids, rejected

    async def _publish(self, messages: Sequence[tuple[str, bytes, str]]) -> list[Outcome]:
        if not messages:
            return []
        outcomes: list[Outcome] = [False] * len(messages)
        futures: dict[int, asyncio.Future[Any]] = {}
        sent = 0
        try:
            # One deadline bounds every wait for a free slot. nats-py 2.16 passes a wait_stall
            # to asyncio.wait_for, which costs a task and a timer per message.
            async with asyncio.timeout(self._timeout):
                for index, (subject, payload, msg_id) in enumerate(messages):
                    sent = index + 1
                    try:
                        futures[index] = await self._js.publish_async(
                            subject, payload, wait_stall=None, headers={"Nats-Msg-Id": msg_id}
                        )
                    except _REJECTED_LOCALLY as exc:
                        outcomes[index] = _rejection(exc, subject, payload, msg_id)
        except (NatsError, TimeoutError) as exc:
            logger.warning(
                "publishing stalled after %d of %d messages: %s", sent, len(messages), exc
            )
        if futures:
            _, pending = await asyncio.wait(futures.values(), timeout=self._timeout)
            for future in pending:
                future.cancel()
        for index, future in futures.items():
            if future.cancelled() or not future.done():
                continue
            error = future.exception()
            if error is None:
                outcomes[index] = True
            elif isinstance(error, APIError) and error.err_code == JS_MESSAGE_TOO_LARGE:
                subject, payload, msg_id = messages[index]
                outcomes[index] = _rejection(error, subject, payload, msg_id)
        rejected = [o for o in outcomes if isinstance(o, str)]
        retried = outcomes.count(False)
        if rejected:
            logger.error(
                "%d of %d messages can never be published and are dropped: %s",
                len(rejected),
                len(messages),
                rejected[0],
            )
        if retried:
            logger.warning(
                "%d of %d messages not acknowledged; they are retried", retried, len(messages)
            )
        return outcomes


def _rejection(error: Exception, subject: str, payload: bytes, msg_id: str) -> str:
    return f"{error} for message {msg_id} of {len(payload)} bytes on {subject}"
