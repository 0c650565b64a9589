"""JetStream publishing with many acks in flight, and pull consumers that ack after commit.

::

    publisher = Publisher(js)                               # bounded acks in flight
    acks = [await publisher.publish(subject, data, msg_id=sample_id) for ...]
    await publisher.wait(acks)                              # raises on the first failed ack
    outcomes = await publisher.publish_batch(messages)      # stored, retry or rejection reason

    consumer = PullConsumer(js, USAGE_STREAM, "metering", handle_batch)
    runtime.spawn(consumer.run(runtime.stopping), name="usage-consumer")

An outbox publishes with :meth:`Publisher.publish_batch`. It separates the messages that
JetStream rejects for good (see :mod:`services.runtime.publish_errors`) from those to retry,
so one bad message does not hold back the others.

A :class:`PullConsumer` calls ``handle_batch(messages)``, which commits its database
transaction and returns, and only then acks the messages. While the handler works, each
message gets an in-progress ack so JetStream does not redeliver it. When the handler raises,
the batch is redelivered after a delay (``nak``). Raise :class:`Reject` for payloads that can
never be processed, so their messages are terminated instead. Publishes and consumed batches
carry the trace context in message headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, PubAck
from nats.js.client import JetStreamContext
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanKind

from services.runtime.errors import Unavailable
from services.runtime.publish_errors import (
    Message,
    Outcome,
    log_outcomes,
    publish_outcome,
    reject_streamless,
    reject_unpermitted,
    wait_for_acks,
)
from services.runtime.telemetry import context_from_headers, inject_headers

log = logging.getLogger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
ACK_WAIT_MARGIN_S: Final = 1.0
"""Seconds a batch waits past the ack timeout, for the publishes that time out to end."""

_meter = metrics.get_meter(__name__)
_publish_stalls = _meter.create_counter(
    "acsp.nats.publish_stalls", description="publishes rejected because too many acks were pending"
)
_publish_failures = _meter.create_counter(
    "acsp.nats.publish_failures", description="JetStream publishes that got no ack in time"
)
_settled = _meter.create_counter(
    "acsp.nats.consumer_settled", description="consumed messages by outcome: ack, nak or term"
)


# Publishing.


class Publisher:
    """Publish to JetStream with up to ``max_pending`` acks in flight, each bounded in time.

    :meth:`publish` returns once the message is handed to the client; the returned task
    resolves to the ``PubAck`` or raises Unavailable. When ``max_pending`` acks are
    outstanding, :meth:`publish` waits for a slot, up to ``stall_timeout_s``.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_pending: int = 1024,
        ack_timeout_s: float = 5.0,
        stall_timeout_s: float = 5.0,
        lookup_timeout_s: float = 1.0,
    ) -> None:
        self._js = js
        self._slots = asyncio.Semaphore(max_pending)
        self._ack_timeout_s = ack_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._lookup_timeout_s = lookup_timeout_s
        """Deadline of the stream lookup for a subject that no stream replied on. A lookup
        that misses it leaves the subject's messages to retry."""
        self._pending: set[asyncio.Task[PubAck]] = set()
        self._tracer = trace.get_tracer(__name__)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
    ) -> asyncio.Task[PubAck]:
        """Send one message; ``msg_id`` lets JetStream drop a duplicate within its window."""
        try:
            async with asyncio.timeout(self._stall_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            _publish_stalls.add(1)
            raise Unavailable(
                f"{len(self._pending)} JetStream acks outstanding for {self._stall_timeout_s} s; "
                "NATS is slow or unreachable"
            ) from None
        with self._tracer.start_as_current_span(
            f"publish {subject}", kind=SpanKind.PRODUCER, attributes={"messaging.system": "nats"}
        ):
            message_headers = inject_headers(headers)
        if msg_id is not None:
            message_headers[MSG_ID_HEADER] = msg_id
        task = asyncio.create_task(self._send(subject, payload, message_headers))
        self._pending.add(task)
        task.add_done_callback(self._finished)
        return task

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        try:
            return await self._js.publish(
                subject, payload, timeout=self._ack_timeout_s, headers=headers
            )
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as error:
            # No stream captures the subject, or JetStream is down or slow: either way the
            # message is not stored and the caller must keep it to retry.
            _publish_failures.add(1)
            raise Unavailable(f"JetStream did not ack a message on {subject}: {error}") from error

    def _finished(self, task: asyncio.Task[PubAck]) -> None:
        self._pending.discard(task)
        self._slots.release()
        if not task.cancelled():
            # A batch may stop awaiting a task early, and asyncio would log the failure of a
            # task that no caller awaits as never retrieved.
            task.exception()

    @property
    def pending(self) -> int:
        """Number of messages whose ack has not arrived yet."""
        return len(self._pending)

    async def wait(self, acks: Iterable[asyncio.Task[PubAck]]) -> list[PubAck]:
        """Wait for ``acks``; raise the first failure after all of them have settled."""
        results = await asyncio.gather(*acks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, PubAck)]

    async def publish_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        """Publish ``messages`` with their acks in flight at once, and return their outcomes.

        An outcome is True when JetStream stored the message, or False when it should be
        retried (no ack in time, NATS unreachable, too many acks pending). Otherwise it is the
        reason JetStream, nats-py or the server's permissions rejected the message for good.
        One rejected message does not stop the others.
        """
        tasks: dict[int, asyncio.Task[PubAck]] = {}
        sent_at = time.monotonic()
        try:
            for index, (subject, payload, msg_id) in enumerate(messages):
                tasks[index] = await self.publish(subject, payload, msg_id=msg_id)
        except Unavailable as error:
            log.warning(
                "stopped after %d of %d messages, so the rest are retried: %s",
                len(tasks),
                len(messages),
                error,
            )
        answers: list[Outcome | None] = [False] * len(messages)
        # Each task ends by its ack timeout, and the margin lets that timeout report itself. The
        # wait ends sooner once only messages on denied subjects are left, because they get no
        # reply. Their tasks end at their own timeout and free their slots then.
        await wait_for_acks(
            self._js, tasks, messages, self._ack_timeout_s + ACK_WAIT_MARGIN_S, sent_at
        )
        for index, task in tasks.items():
            if not task.done():
                continue
            exception = task.exception()
            if exception is None:
                answers[index] = True
                continue
            if not isinstance(exception, nats.errors.Error | TimeoutError | Unavailable):
                raise exception
            # _send turns a missing reply into Unavailable, raised from the client's error.
            failure = exception.__cause__ if isinstance(exception, Unavailable) else None
            answers[index] = publish_outcome(failure or exception, messages[index])
        reject_unpermitted(self._js, answers, messages, tasks, sent_at)
        outcomes = await reject_streamless(self._js, answers, messages, self._lookup_timeout_s)
        log_outcomes(outcomes)
        return outcomes

    async def flush(self) -> None:
        """Wait until every outstanding ack has settled (each is bounded by its ack timeout)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


# Consuming.


class Reject(Exception):
    """Raised by a consumer handler for messages that can never be processed; they are termed."""


BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class PullConsumer:
    """A durable pull consumer that acks each batch only after its handler returned."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        handler: BatchHandler,
        *,
        subject_filter: str | None = None,
        batch: int = 100,
        fetch_timeout_s: float = 2.0,
        ack_wait_s: float = 30.0,
        max_deliver: int = -1,
        retry_delay_s: float = 5.0,
    ) -> None:
        self._js = js
        self.stream = stream
        self.durable = durable
        self._handler = handler
        self._subject_filter = subject_filter
        self._batch = batch
        self._fetch_timeout_s = fetch_timeout_s
        self._ack_wait_s = ack_wait_s
        self._max_deliver = max_deliver
        self._retry_delay_s = retry_delay_s
        self._tracer = trace.get_tracer(__name__)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """Create the durable consumer or update its settings, then bind to it."""
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_wait=self._ack_wait_s,
            max_deliver=self._max_deliver,
            filter_subject=self._subject_filter,
            max_ack_pending=max(1000, self._batch * 4),
        )
        try:
            await self._js.add_consumer(self.stream, config)
        except nats.js.errors.APIError as error:
            # Some fields (deliver policy, filter on old servers) cannot change in place; the
            # consumer keeps its old settings until an operator deletes it.
            log.warning(
                "consumer settings not updated: %s",
                error,
                extra={"stream": self.stream, "durable": self.durable},
            )
        return await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle batches until ``stop`` is set; cancellation leaves messages unacked."""
        subscription = await self._subscribe()
        log.info("consumer started", extra={"stream": self.stream, "durable": self.durable})
        try:
            while not stop.is_set():
                try:
                    messages = await subscription.fetch(self._batch, timeout=self._fetch_timeout_s)
                # nats-py 2.16 raises the builtin TimeoutError when no message arrived in time;
                # nats.errors.TimeoutError is a subclass of it, so this catches both.
                except TimeoutError:
                    continue
                await self._handle(messages)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
            log.info("consumer stopped", extra={"stream": self.stream, "durable": self.durable})

    async def _handle(self, messages: list[Msg]) -> None:
        links = [
            Link(trace.get_current_span(context_from_headers(message.headers)).get_span_context())
            for message in messages
        ]
        with self._tracer.start_as_current_span(
            f"consume {self.stream}/{self.durable}",
            kind=SpanKind.CONSUMER,
            links=[link for link in links if link.context.is_valid],
            attributes={"messaging.system": "nats", "messaging.batch.message_count": len(messages)},
        ):
            try:
                async with self._in_progress(messages):
                    await self._handler(messages)
            except Reject as rejection:
                log.error(
                    "rejected batch; terminating its messages: %s",
                    rejection,
                    extra={"stream": self.stream, "count": len(messages)},
                )
                await asyncio.shield(_settle(messages, "term"))
                return
            except Exception:
                log.exception(
                    "batch handler failed; messages will be redelivered",
                    extra={"stream": self.stream, "count": len(messages)},
                )
                await asyncio.shield(_settle(messages, "nak", self._retry_delay_s))
                return
            # The handler committed: acking must happen even if we are cancelled now.
            await asyncio.shield(_settle(messages, "ack"))

    @contextlib.asynccontextmanager
    async def _in_progress(self, messages: list[Msg]) -> AsyncIterator[None]:
        interval = max(0.1, self._ack_wait_s / 3)

        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(interval)
                for message in messages:
                    try:
                        await message.in_progress()
                    except nats.errors.Error as error:
                        log.warning("in-progress ack failed: %s", error)

        task = asyncio.create_task(keep_alive(), name=f"in-progress {self.durable}")
        try:
            yield
        finally:
            task.cancel()
            # asyncio.wait does not raise the task's CancelledError, only ours.
            await asyncio.wait([task])


async def _settle(messages: list[Msg], action: str, delay: float | None = None) -> None:
    _settled.add(len(messages), {"action": action})
    for message in messages:
        try:
            if action == "ack":
                await message.ack()
            elif action == "nak":
                await message.nak(delay=delay)
            else:
                await message.term()
        except nats.errors.Error as error:
            # An ack lost here means a redelivery, which the handler's idempotency absorbs.
            log.warning("could not %s a message: %s", action, error)
