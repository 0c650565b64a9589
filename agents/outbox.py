"""Publishing durable messages to JetStream through the spool.

:meth:`Outbox.add` queues a message in a bounded in-memory list. The sender task appends
queued messages to the :class:`~agents.spool.Spool` with one fsync, then publishes from the
head of the spool in batches with many acks in flight. Each message carries its
``Nats-Msg-Id``, so JetStream stores a replayed message once within the stream's duplicate
window. Only
acknowledged messages leave the spool, so a NATS outage or an agent crash loses nothing that
reached the spool, and replay keeps the order of appending.

NOTE: within one batch, if an early message fails while a later one is stored, the later one
is stored first and the earlier one on retry. Consumers that need per-node order use the
sequence numbers inside the messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError

from agents.spool import Spool, SpoolRecord

logger = logging.getLogger(__name__)

PublishFunction = Callable[[str, bytes, dict[str, str]], Awaitable["asyncio.Future[Any]"]]
"""A function that sends one message to JetStream and returns the future of its acknowledgement."""


@dataclass(slots=True)
class OutboxCounters:
    published: int = 0
    spooled: int = 0
    dropped: int = 0
    """Messages rejected because the spool (or the in-memory queue) was full."""
    publish_failures: int = 0


class Outbox:
    """The spool and the task that drains it into JetStream."""

    def __init__(
        self,
        spool: Spool,
        batch_size: int = 256,
        max_queued: int = 200_000,
        ack_timeout_s: float = 5.0,
        retry_s: float = 1.0,
        before_append: Callable[[], None] | None = None,
    ) -> None:
        """``before_append`` runs before each append to the spool (the agent saves its state)."""
        self._spool = spool
        self._before_append = before_append
        self._batch_size = batch_size
        self._max_queued = max_queued
        self._ack_timeout_s = ack_timeout_s
        self._retry_s = retry_s
        self._queue: list[SpoolRecord] = []
        self._wake = asyncio.Event()
        self.counters = OutboxCounters()
        self._last_drop_log = 0
        self._closed = False

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged: queued in memory plus waiting in the spool."""
        return len(self._queue) + self._spool.pending_records

    def add(self, subject: str, msg_id: str, payload: bytes) -> None:
        """Queue one message; the sender spools and publishes it."""
        if len(self._queue) >= self._max_queued:
            self._count_drops(1, "the in-memory queue is full")
            return
        self._queue.append(SpoolRecord(subject, msg_id, payload))
        self._wake.set()

    def flush_to_spool(self) -> None:
        """Append everything queued to the spool (one fsync)."""
        if not self._queue:
            return
        if self._before_append is not None:
            self._before_append()
        queued, self._queue = self._queue, []
        accepted = self._spool.append(queued)
        self.counters.spooled += accepted
        if accepted < len(queued):
            self._count_drops(len(queued) - accepted, "the spool is full")

    def _count_drops(self, count: int, why: str) -> None:
        self.counters.dropped += count
        # One warning per 1,000 drops at most, so a long outage does not flood the log.
        if self.counters.dropped - self._last_drop_log >= 1000 or self._last_drop_log == 0:
            self._last_drop_log = self.counters.dropped
            logger.warning(
                "dropped %d messages because %s (%d dropped in total, newest are dropped)",
                count,
                why,
                self.counters.dropped,
            )

    def close(self) -> None:
        """Make :meth:`run` return after its current step."""
        self._closed = True
        self._wake.set()

    async def run(self, publish: PublishFunction, connected: Callable[[], bool]) -> None:
        """Spool and publish until cancelled or closed."""
        while not self._closed:
            self.flush_to_spool()
            if self._spool.pending_records == 0 or not connected():
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._retry_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            sent = await self._publish_batch(publish)
            if sent == 0:
                await asyncio.sleep(self._retry_s)

    async def drain(self, publish: PublishFunction, timeout_s: float) -> None:
        """Publish what is queued and spooled, for at most ``timeout_s`` (at shutdown)."""
        self.flush_to_spool()
        try:
            async with asyncio.timeout(timeout_s):
                while self._spool.pending_records:
                    if await self._publish_batch(publish) == 0:
                        await asyncio.sleep(self._retry_s)
        except TimeoutError:
            logger.warning(
                "%d messages not published in %g s; they stay in the spool",
                self._spool.pending_records,
                timeout_s,
            )

    async def _publish_batch(self, publish: PublishFunction) -> int:
        batch = self._spool.peek(self._batch_size)
        acks: list[asyncio.Future[Any]] = []
        failure: BaseException | None = None
        try:
            # One deadline for the whole batch, so no message needs a timer of its own.
            async with asyncio.timeout(self._ack_timeout_s):
                for record in batch:
                    headers = {"Nats-Msg-Id": record.msg_id}
                    acks.append(await publish(record.subject, record.payload, headers))
                if acks:
                    # The deadline above bounds this too, unless a library swallows its
                    # cancellation, so the wait carries its own bound as well.
                    await asyncio.wait(acks, timeout=self._ack_timeout_s)
        except (NatsError, TimeoutError, OSError) as error:
            failure = error
        finally:
            for ack in acks:
                ack.cancel()  # a no-op for the acknowledged ones
        acknowledged = 0
        for ack in acks:
            problem = None if ack.cancelled() else ack.exception()
            if ack.cancelled() or problem is not None:
                if problem is not None and not isinstance(
                    problem, NatsError | TimeoutError | OSError
                ):
                    raise problem
                failure = failure or problem or TimeoutError("no acknowledgement in time")
                break
            acknowledged += 1
        self._spool.commit(acknowledged)
        self.counters.published += acknowledged
        if acknowledged < len(batch):
            self.counters.publish_failures += 1
            logger.info(
                "publishing paused after %d of %d messages: %r; %d wait in the spool",
                acknowledged,
                len(batch),
                failure,
                self._spool.pending_records,
            )
        return acknowledged
