"""JetStream publishing with many acknowledgements in flight and a bounded wait.

Which failures are retried and which are rejected for good follows
:mod:`services.runtime.publish_errors`, the rules every acsp publisher shares.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from services.runtime.ack_slots import publish_async
from services.runtime.publish_errors import (
    REJECTED_LOCALLY,
    Message,
    Outcome,
    confirm_unacknowledged,
    log_outcomes,
    publish_outcome,
    reject_streamless,
    reject_unpermitted,
    rejection_reason,
    wait_for_acks,
)

from .commands import command_subject
from .store import DispatchRecord, OutboxEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Outcome of one wave of commands and job events, as JetStream decided it."""

    command_keys: list[tuple[str, int, int, str]] = field(default_factory=list)
    """Keys of the commands JetStream stored."""
    event_ids: list[str] = field(default_factory=list)
    """Ids of the job events JetStream stored."""
    rejected_commands: list[tuple[DispatchRecord, str]] = field(default_factory=list)
    """Commands that can never be published, each with the reason."""
    rejected_events: list[tuple[OutboxEvent, str]] = field(default_factory=list)
    """Job events that JetStream rejected for good this time, each with the reason."""


class Publisher:
    """Publish commands and job events; the caller learns which ones JetStream stored.

    A message that can never be published, such as one over the server's max_payload or the
    stream's max_msg_size, is reported as rejected with the reason, and the other messages of
    its wave go on. A job event that no stream replies to is rejected too when JetStream's API
    finds no stream for its subject, and so is one that gets no reply while the server reports
    that the scheduler's NATS user may not publish to its subject. Timeouts, and a JetStream
    that does not reply at all, leave messages to be retried.
    """

    def __init__(
        self, js: JetStreamContext, timeout_s: float = 5.0, confirm_timeout_s: float = 1.0
    ) -> None:
        self._js = js
        self._timeout = timeout_s
        self._confirm_timeout = confirm_timeout_s
        """Deadline of the requests that check unacknowledged messages and streams. A check
        that misses it only leaves its message to the next retry."""

    async def publish_all(
        self, records: Sequence[DispatchRecord], events: Sequence[OutboxEvent]
    ) -> PublishResult:
        """Publish commands and job events with all their acks in flight at once."""
        messages = [(command_subject(r), r.payload, "/".join(map(str, r.key))) for r in records]
        messages.extend((e.subject, e.payload, e.msg_id) for e in events)
        sent_at = time.monotonic()
        answers = await self._publish(messages, sent_at)
        # Commands that no stream replied to, or whose subject the scheduler's NATS user may
        # not publish to, are retried, and their job fails at its start timeout.
        command_outcomes = [False if a is None else a for a in answers[: len(records)]]
        reject_unpermitted(self._js, answers, messages, range(len(records), len(messages)), sent_at)
        event_outcomes = await reject_streamless(
            self._js, answers[len(records) :], messages[len(records) :], self._confirm_timeout
        )
        log_outcomes([*command_outcomes, *event_outcomes])
        result = PublishResult()
        for record, outcome in zip(records, command_outcomes, strict=True):
            if outcome is True:
                result.command_keys.append(record.key)
            elif isinstance(outcome, str):
                result.rejected_commands.append((record, outcome))
        for event, outcome in zip(events, event_outcomes, strict=True):
            if outcome is True:
                result.event_ids.append(event.msg_id)
            elif isinstance(outcome, str):
                result.rejected_events.append((event, outcome))
        return result

    async def _publish(self, messages: Sequence[Message], sent_at: float) -> list[Outcome | None]:
        """Return each message's outcome, or None where no stream replied to it.

        ``sent_at`` is the monotonic time before the first message was sent.
        """
        if not messages:
            return []
        outcomes: list[Outcome | None] = [False] * len(messages)
        futures: dict[int, asyncio.Future[Any]] = {}
        sent = 0
        try:
            # One deadline bounds every wait for a free slot. nats-py 2.16 passes a wait_stall
            # to asyncio.wait_for, which costs a task and a timer per message.
            async with asyncio.timeout(self._timeout):
                for index, (subject, payload, msg_id) in enumerate(messages):
                    sent = index + 1
                    try:
                        futures[index] = await publish_async(
                            self._js, subject, payload, {"Nats-Msg-Id": msg_id}
                        )
                    except REJECTED_LOCALLY as exc:
                        outcomes[index] = rejection_reason(exc, messages[index])
        except (NatsError, TimeoutError) as exc:
            logger.warning(
                "publishing stalled after %d of %d messages: %s", sent, len(messages), exc
            )
        await wait_for_acks(self._js, futures, messages, self._timeout, sent_at)
        for future in futures.values():
            future.cancel()  # a no-op for the settled ones
        unacknowledged: list[int] = []
        for index, future in futures.items():
            if future.cancelled() or not future.done():
                unacknowledged.append(index)
            else:
                outcomes[index] = publish_outcome(future.exception(), messages[index])
        await confirm_unacknowledged(
            self._js, unacknowledged, messages, outcomes, self._confirm_timeout
        )
        return outcomes
