"""JetStream publishing with many acknowledgements in flight and a bounded wait."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from .commands import command_subject
from .store import DispatchRecord, OutboxEvent

logger = logging.getLogger(__name__)


class Publisher:
    """Publish commands and job events; the caller learns which ones JetStream stored."""

    def __init__(self, js: JetStreamContext, timeout_s: float = 5.0) -> None:
        self._js = js
        self._timeout = timeout_s

    async def publish_commands(
        self, records: Sequence[DispatchRecord]
    ) -> list[tuple[str, int, int, str]]:
        """Publish ``records``; return the keys JetStream acknowledged.

        Each message carries ``Nats-Msg-Id = job/attempt/task/kind``, so a command
        republished after a restart within the stream's duplicate window is dropped.
        """
        sends = [
            (record.key, command_subject(record), record.payload, "/".join(map(str, record.key)))
            for record in records
        ]
        acked = await self._publish([(s[1], s[2], s[3]) for s in sends])
        return [send[0] for send, ok in zip(sends, acked, strict=True) if ok]

    async def publish_all(
        self, records: Sequence[DispatchRecord], events: Sequence[OutboxEvent]
    ) -> tuple[list[tuple[str, int, int, str]], list[str]]:
        """Publish commands and job events with all their acks in flight at once.

        Returns the command keys and the event ids that JetStream acknowledged.
        """
        messages = [(command_subject(r), r.payload, "/".join(map(str, r.key))) for r in records]
        messages.extend((e.subject, e.payload, e.msg_id) for e in events)
        acked = await self._publish(messages)
        keys = [r.key for r, ok in zip(records, acked[: len(records)], strict=True) if ok]
        event_ids = [e.msg_id for e, ok in zip(events, acked[len(records) :], strict=True) if ok]
        return keys, event_ids

    async def publish_events(self, events: Sequence[OutboxEvent]) -> list[str]:
        """Publish job events; return the ids JetStream acknowledged."""
        acked = await self._publish([(e.subject, e.payload, e.msg_id) for e in events])
        return [e.msg_id for e, ok in zip(events, acked, strict=True) if ok]

    async def _publish(self, messages: Sequence[tuple[str, bytes, str]]) -> list[bool]:
        if not messages:
            return []
        futures: list[asyncio.Future[Any]] = []
        try:
            # One deadline bounds every wait for a free slot. nats-py 2.16 passes a wait_stall
            # to asyncio.wait_for, which costs a task and a timer per message.
            async with asyncio.timeout(self._timeout):
                for subject, payload, msg_id in messages:
                    future = await self._js.publish_async(
                        subject, payload, wait_stall=None, headers={"Nats-Msg-Id": msg_id}
                    )
                    futures.append(future)
        except (NatsError, TimeoutError) as exc:
            logger.warning(
                "publishing stalled after %d of %d messages: %s", len(futures), len(messages), exc
            )
        done, pending = await asyncio.wait(futures, timeout=self._timeout) if futures else ((), ())
        for future in pending:
            future.cancel()
        results: list[bool] = []
        failures = 0
        for future in futures:
            ok = future in done and not future.cancelled() and future.exception() is None
            failures += not ok
            results.append(ok)
        results.extend([False] * (len(messages) - len(futures)))
        if failures or len(futures) < len(messages):
            logger.warning(
                "%d of %d messages not acknowledged; they are retried",
                len(messages) - sum(results),
                len(messages),
            )
        return results
