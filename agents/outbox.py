"""Publishing durable messages to JetStream through the spool.

:meth:`Outbox.add` queues a message in a bounded in-memory list. The sender task appends
queued messages to the :class:`~agents.spool.Spool` with one fsync, then publishes from the
head of the spool in batches with many acks in flight. Each message carries its
``Nats-Msg-Id``, so JetStream stores a replayed message once within the stream's duplicate
window. Only the settled start of the spool leaves it, so a NATS outage or an agent crash
loses nothing that reached the spool, and replay keeps the order of appending.

A message is settled when JetStream stored it, or when it moved to the dead letters
(:mod:`agents.dead_letters`). Failures are sorted by :mod:`services.runtime.publish_errors`:
timeouts, disconnections and no reply while NATS restarts are retried for as long as they
last. Rejections for good (over the stream's max_msg_size or the server's max_payload, no
stream for the subject, a subject the agent's NATS user or its leaf node's user on the hub may
not publish to) are counted, at most once per ``rejection_spacing_s``. At ``max_rejections``
the message moves to the dead letters. Meanwhile the messages after it are published, up to
:data:`MAX_WINDOW_BATCHES` batches from the head of the spool, and the outbox does not send the
stored ones again while it waits.

The spool stores the counts each time one grows (one fsync), so a restarted agent goes on
counting, and the spacing applies across restarts. The stored ids live in memory only, so a
restarted agent sends those messages again, whose copies JetStream drops within its duplicate
window.

NOTE: within one batch, if an early message fails while a later one is stored, the later one
is stored first and the earlier one on retry. Consumers that need per-node order use the
sequence numbers inside the messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from agents.dead_letters import DEAD_LETTERS_FILE_NAME, DeadLetter, DeadLetters
from agents.spool import RejectionCount, Spool, SpoolRecord
from services.runtime.ack_slots import publish_async
from services.runtime.dead_events import REJECTION_SPACING_S
from services.runtime.publish_errors import (
    REJECTED_LOCALLY,
    Message,
    Outcome,
    confirm_unacknowledged,
    publish_outcome,
    reject_streamless,
    reject_unpermitted,
    wait_for_acks,
)

logger = logging.getLogger(__name__)

MAX_REJECTIONS: Final = 5
"""Default of ACSP_AGENT_MAX_MESSAGE_REJECTIONS."""
MAX_WINDOW_BATCHES: Final = 16
"""Batches from the head of the spool that one wave covers at most. Messages stored behind an
unsettled head stay in the spool until it settles, so each wave covers them plus one batch of
new ones. A head rejected for good settles after ``max_rejections`` times the spacing (about
20 s by default), which the window lets a busy agent ride out without filling its spool."""
MSG_ID_HEADER: Final = "Nats-Msg-Id"
_SPOOL_ERROR_LOG_S: Final = 60.0
"""Seconds between two log lines about a spool that cannot be written."""

ClientSource = Callable[[], Client | None]
"""A function that returns the agent's NATS client, or None before the first connection."""


@dataclass(slots=True)
class OutboxCounters:
    published: int = 0
    spooled: int = 0
    dropped: int = 0
    """Messages rejected because the spool (or the in-memory queue) was full."""
    publish_failures: int = 0
    rejections: int = 0
    """Rejections for good counted, at most one per message every ``rejection_spacing_s``."""
    dead_lettered: int = 0
    """Messages moved to the dead letters after ``max_rejections`` rejections for good."""
    spool_errors: int = 0
    """Flushes to the spool that failed with a disk error (a full disk); the messages stayed
    queued in memory."""
    spool_damaged_segments: int = 0
    """Spool segments found damaged and repaired, see :mod:`agents.spool_repair`."""
    spool_lost_bytes: int = 0
    """Bytes of those segments that held no intact record, kept in ``.corrupt`` files."""
    spool_damaged_heads: int = 0
    """Spool head files found damaged and moved aside, after which the spool published again
    from its oldest segment."""


@dataclass(slots=True)
class _Rejection:
    count: int
    counted_at: float
    """Monotonic time of the last counted rejection."""
    reason: str


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
        dead_letters: DeadLetters | None = None,
        max_rejections: int = MAX_REJECTIONS,
        rejection_spacing_s: float = REJECTION_SPACING_S,
        confirm_timeout_s: float = 1.0,
    ) -> None:
        """``before_append`` runs before each append to the spool (the agent saves its state).

        ``dead_letters`` defaults to the file ``dead_letters.jsonl`` beside the spool's
        directory, which is the agent's state directory. ``confirm_timeout_s`` bounds the
        requests that learn why unacknowledged messages failed, and the stream lookups.
        """
        if max_rejections < 1:
            raise ValueError(f"max_rejections must be at least 1, not {max_rejections}")
        self._spool = spool
        self._before_append = before_append
        self._batch_size = batch_size
        self._max_queued = max_queued
        self._ack_timeout_s = ack_timeout_s
        self._retry_s = retry_s
        if dead_letters is None:
            dead_letters = DeadLetters(spool.directory.parent / DEAD_LETTERS_FILE_NAME)
        self._dead_letters = dead_letters
        self._max_rejections = max_rejections
        self._rejection_spacing_s = rejection_spacing_s
        self._confirm_timeout_s = confirm_timeout_s
        self._queue: list[SpoolRecord] = []
        self._when_spooled: list[Callable[[], None]] = []
        """Callbacks to run once the messages queued now are in the spool."""
        self._before_spooled: list[Callable[[], None]] = []
        """Callbacks to run right before the messages queued now go into the spool."""
        self._wake = asyncio.Event()
        self.counters = OutboxCounters(
            spool_damaged_segments=spool.damaged_segments,
            spool_lost_bytes=spool.lost_bytes,
            spool_damaged_heads=spool.damaged_heads,
        )
        self._last_drop_log = 0
        self._last_spool_error_log: float | None = None
        """Monotonic time of the last logged spool error, or None while the spool works."""
        self._closed = False
        self._client: Client | None = None
        self._jetstream: JetStreamContext | None = None
        # Both hold ids of records in the spool's first MAX_WINDOW_BATCHES batches only.
        self._stored: set[str] = set()
        """Ids of messages JetStream stored behind a message that is not settled yet."""
        self._rejections = self._load_rejections()
        self._logged_full_for = ""
        """Id of the message last logged as held back by a full dead-letter file."""

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

    def call_when_spooled(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every message queued so far is in the spool.

        It runs at once when nothing is queued. A message the full spool rejected counts as
        spooled here: it is lost either way, and the loss is counted in ``dropped``.
        """
        if not self._queue:
            callback()
            return
        self._when_spooled.append(callback)
        self._wake.set()

    def call_before_spool(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` right before the messages queued so far go into the spool.

        It runs before ``before_append``, so the state it changes is saved before the append.
        It runs at once when nothing is queued.
        """
        if not self._queue:
            callback()
            return
        self._before_spooled.append(callback)

    def flush_to_spool(self) -> None:
        """Append everything queued to the spool (one fsync)."""
        if not self._queue:
            return
        before, self._before_spooled = self._before_spooled, []
        for callback in before:
            callback()
        if self._before_append is not None:
            self._before_append()
        queued, self._queue = self._queue, []
        callbacks, self._when_spooled = self._when_spooled, []
        try:
            accepted = self._spool.append(queued)
        except OSError:
            # None of the batch is in the spool, so it stays queued for the next flush.
            self._queue[:0] = queued
            self._when_spooled[:0] = callbacks
            raise
        self.counters.spooled += accepted
        if accepted < len(queued):
            self._count_drops(len(queued) - accepted, "the spool is full")
        for callback in callbacks:
            callback()

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

    async def run(self, client: ClientSource) -> None:
        """Spool and publish until cancelled or closed, while ``client()`` is connected."""
        while not self._closed:
            self._flush_or_log()
            current = client()
            if self._spool.pending_records == 0 or current is None or not current.is_connected:
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._retry_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            if await self._publish_batch(current) == 0:
                await asyncio.sleep(self._retry_s)

    def _flush_or_log(self) -> None:
        """Flush to the spool; on a disk error keep the messages queued and log it, rate-limited.

        The messages already in the spool are still published meanwhile, and the queue's bound
        (``max_queued``) drops and counts new messages if the error lasts.
        """
        try:
            self.flush_to_spool()
        except OSError as error:
            self.counters.spool_errors += 1
            now = time.monotonic()
            last = self._last_spool_error_log
            if last is None or now - last >= _SPOOL_ERROR_LOG_S:
                self._last_spool_error_log = now
                logger.error(
                    "writing to the spool in %s failed (%d times so far), %d messages wait in "
                    "memory; free disk space there: %s",
                    self._spool.directory,
                    self.counters.spool_errors,
                    len(self._queue),
                    error,
                )
            return
        if self._last_spool_error_log is not None:
            self._last_spool_error_log = None
            logger.info("writing to the spool in %s works again", self._spool.directory)

    async def drain(self, client: Client, timeout_s: float) -> None:
        """Publish what is queued and spooled, for at most ``timeout_s`` (at shutdown)."""
        self.flush_to_spool()
        try:
            async with asyncio.timeout(timeout_s):
                while self._spool.pending_records:
                    if await self._publish_batch(client) == 0:
                        await asyncio.sleep(self._retry_s)
        except TimeoutError:
            logger.warning(
                "%d messages not published in %g s; they stay in the spool",
                self._spool.pending_records,
                timeout_s,
            )

    async def _publish_batch(self, client: Client) -> int:
        """Publish the head of the spool; return how many messages left it."""
        batch = self._spool.peek(self._window())
        # Reading may have repaired a segment damaged since the spool opened.
        self.counters.spool_damaged_segments = self._spool.damaged_segments
        self.counters.spool_lost_bytes = self._spool.lost_bytes
        messages = [(record.subject, record.payload, record.msg_id) for record in batch]
        outcomes, failure = await self._publish_wave(client, messages)
        self._count_rejections(messages, outcomes)
        settled = self._settle(messages, outcomes)
        if settled < len(batch):
            self.counters.publish_failures += 1
            head = outcomes[settled]
            logger.info(
                "publishing paused after %d of %d messages: %s; %d wait in the spool",
                settled,
                len(batch),
                head if isinstance(head, str) else repr(failure or "no acknowledgement in time"),
                self._spool.pending_records,
            )
        return settled

    def _window(self) -> int:
        """Return how many records from the head of the spool the next wave covers."""
        known = len(self._stored) + len(self._rejections)
        return min(self._batch_size + known, self._batch_size * MAX_WINDOW_BATCHES)

    def _jetstream_for(self, client: Client) -> JetStreamContext:
        # One context per client, because it owns the subscription that receives the acks.
        if self._jetstream is None or self._client is not client:
            self._client, self._jetstream = client, client.jetstream()
        return self._jetstream

    async def _publish_wave(
        self, client: Client, messages: Sequence[Message]
    ) -> tuple[list[Outcome], BaseException | None]:
        """Publish ``messages`` with their acks in flight at once; return each one's outcome.

        Skips the messages already stored or in the dead letters. Also returns the error that
        stopped the sending, if any.
        """
        js = self._jetstream_for(client)
        answers: list[Outcome | None] = [False] * len(messages)
        futures: dict[int, asyncio.Future[Any]] = {}
        unacknowledged: list[int] = []
        failure: BaseException | None = None
        sent_at = time.monotonic()
        try:
            # One deadline for the whole batch, so no message needs a timer of its own.
            async with asyncio.timeout(self._ack_timeout_s):
                for index, message in enumerate(messages):
                    msg_id = message[2]
                    if msg_id in self._stored:
                        answers[index] = True
                    elif msg_id in self._dead_letters:
                        continue  # _settle drops it from the spool without publishing it
                    elif msg_id in self._rejections:
                        # JetStream's error would leave publish_async's ack pending until the
                        # deadline, so a plain request learns the outcome instead.
                        unacknowledged.append(index)
                    else:
                        futures[index] = await self._send(js, message)
                # The deadline above bounds this too, unless a library swallows its
                # cancellation, so the wait carries its own bound as well.
                await wait_for_acks(js, futures, messages, self._ack_timeout_s, sent_at)
        except (NatsError, TimeoutError, OSError) as error:
            failure = error
        finally:
            for future in futures.values():
                future.cancel()  # a no-op for the settled ones
        for index, future in futures.items():
            if future.cancelled():
                unacknowledged.append(index)
            else:
                answers[index] = publish_outcome(future.exception(), messages[index])
        if failure is None or isinstance(failure, TimeoutError):
            await confirm_unacknowledged(
                js, sorted(unacknowledged), messages, answers, self._confirm_timeout_s
            )
        reject_unpermitted(js, answers, messages, [*futures, *unacknowledged], sent_at)
        outcomes = await reject_streamless(js, answers, messages, self._confirm_timeout_s)
        return outcomes, failure

    async def _send(self, js: JetStreamContext, message: Message) -> asyncio.Future[Any]:
        subject, payload, msg_id = message
        try:
            return await publish_async(js, subject, payload, {MSG_ID_HEADER: msg_id})
        except REJECTED_LOCALLY as error:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_exception(error)
            return done

    def _count_rejections(self, messages: Sequence[Message], outcomes: Sequence[Outcome]) -> None:
        now = time.monotonic()
        counted = False
        for message, outcome in zip(messages, outcomes, strict=True):
            if not isinstance(outcome, str):
                continue
            msg_id = message[2]
            rejection = self._rejections.get(msg_id)
            if rejection is None:
                rejection = self._rejections[msg_id] = _Rejection(0, now, outcome)
            elif now - rejection.counted_at < self._rejection_spacing_s:
                rejection.reason = outcome
                continue
            rejection.count += 1
            rejection.counted_at = now
            rejection.reason = outcome
            self.counters.rejections += 1
            counted = True
            if rejection.count < self._max_rejections:
                logger.warning(
                    "message %s on %s rejected for good (%d of %d before it moves to %s): %s",
                    msg_id,
                    message[0],
                    rejection.count,
                    self._max_rejections,
                    self._dead_letters.path,
                    outcome,
                    extra={"message_id": msg_id},
                )
        if counted:
            self._save_rejections(now)

    def _load_rejections(self) -> dict[str, _Rejection]:
        """Return the stored counts of the messages at the head of the spool.

        Counts of messages that left the spool after the file was last written are dropped.
        """
        stored = self._spool.load_rejections()
        if not stored:
            return {}
        window = self._batch_size * MAX_WINDOW_BATCHES
        pending = {record.msg_id for record in self._spool.peek(window)}
        now, wall_now = time.monotonic(), time.time()
        rejections = {}
        for msg_id, count in stored.items():
            if msg_id not in pending:
                continue
            # Monotonic clocks restart with the machine, so the file keeps wall-clock times. A
            # clock set back makes the last count look recent, which only delays the next one.
            elapsed = max(0.0, wall_now - count.counted_at)
            rejections[msg_id] = _Rejection(count.count, now - elapsed, count.reason)
        if rejections:
            logger.info(
                "loaded the rejection counts of %d spooled messages from %s",
                len(rejections),
                self._spool.directory,
            )
        return rejections

    def _save_rejections(self, now: float) -> None:
        wall_now = time.time()
        counts = {
            msg_id: RejectionCount(r.count, wall_now - (now - r.counted_at), r.reason)
            for msg_id, r in self._rejections.items()
            if r.count > 0
        }
        try:
            self._spool.save_rejections(counts)
        except OSError as error:
            # The counts stay in memory, so only a restart before the next save loses them.
            logger.warning(
                "failed to store the rejection counts in %s: %s", self._spool.directory, error
            )

    def _settle(self, messages: Sequence[Message], outcomes: Sequence[Outcome]) -> int:
        """Remove the settled start of the batch from the spool; return its length.

        Writes the dead letters first (one fsync), so a crash before the spool's commit loses
        nothing.
        """
        settled = 0
        dead: list[tuple[int, DeadLetter]] = []
        for index, (message, outcome) in enumerate(zip(messages, outcomes, strict=True)):
            subject, payload, msg_id = message
            rejection = self._rejections.get(msg_id)
            if outcome is True:
                pass
            elif msg_id in self._dead_letters:
                logger.info(
                    "message %s is in %s already; removed from the spool",
                    msg_id,
                    self._dead_letters.path,
                )
            elif rejection is not None and rejection.count >= self._max_rejections:
                letter = DeadLetter(
                    msg_id, subject, payload, rejection.reason, rejection.count, datetime.now(UTC)
                )
                dead.append((index, letter))
            else:
                break
            settled = index + 1
        written = self._dead_letters.append([letter for _, letter in dead])
        if written < len(dead):
            settled, blocked = dead[written]
            if blocked.message_id != self._logged_full_for:
                self._logged_full_for = blocked.message_id
                logger.error(
                    "dead-letter file %s is full; message %s and the ones after it stay in the "
                    "spool until the file is moved away",
                    self._dead_letters.path,
                    blocked.message_id,
                )
        for _, letter in dead[:written]:
            self._report_dead_letter(letter)
        self._spool.commit(settled)
        for message, outcome in zip(messages[:settled], outcomes[:settled], strict=True):
            self._stored.discard(message[2])
            self._rejections.pop(message[2], None)
            if outcome is True:
                self.counters.published += 1
        for message, outcome in zip(messages[settled:], outcomes[settled:], strict=True):
            if outcome is True:
                self._stored.add(message[2])
        return settled

    def _report_dead_letter(self, letter: DeadLetter) -> None:
        self.counters.dead_lettered += 1
        logger.error(
            "message %s on %s moved to %s after %d rejections: %s",
            letter.message_id,
            letter.subject,
            self._dead_letters.path,
            letter.rejections,
            letter.reason,
            extra={"message_id": letter.message_id},
        )
