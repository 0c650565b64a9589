"""Sort failed JetStream publishes into those to retry and those rejected for good.

Every publisher of acsp uses these rules, so a message that can never be stored is reported
with its reason instead of being retried forever, while a NATS outage only delays messages:

- stored: JetStream acknowledged the message.
- rejected for good: nats-py raised before sending it (over the server's max_payload, an
  invalid subject or header). Or JetStream replied with an error in
  :data:`PERMANENT_JS_ERRORS` (over the stream's max_msg_size). Or no stream replied, and
  JetStream's API finds no stream for the subject, or finds one with a leader, so a server on
  the way drops the subject (see :mod:`services.runtime.denied_subjects`). Or no reply came,
  and the server reported a permissions violation for the message's subject after the
  message was sent (see :class:`PublishViolations`).
- retried: everything else, such as timeouts, disconnections, and no reply while NATS
  restarts, when JetStream's API does not reply either.

In nats-py 2.16 the handler of ``publish_async`` replies raises JetStream's error instead of
setting it on the future, which stays pending. So a message over the stream's max_msg_size
looks like a lost ack, and :func:`confirm_unacknowledged` learns its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final

from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from services.runtime.denied_subjects import DENIED_SUBJECTS, dropped_reason, dropped_streams

logger = logging.getLogger(__name__)

REJECTED_LOCALLY: Final = (MaxPayloadError, BadSubjectError, BadHeaderError)
"""Errors nats-py raises before sending, which the same message raises on every retry."""
JS_MESSAGE_TOO_LARGE: Final = 10054
"""JetStream's error code for a message over the stream's ``max_msg_size``."""
PERMANENT_JS_ERRORS: Final = frozenset({JS_MESSAGE_TOO_LARGE})
"""JetStream error codes that the same message gets on every retry. Unavailability, and the
maximum messages or bytes of a stream that discards new messages, can clear, so a publish
that fails with them is retried."""
MAX_CONFIRMATIONS: Final = 32
"""Unacknowledged messages that one call of :func:`confirm_unacknowledged` checks at most. The
rest are retried unchecked, so a NATS outage costs a bounded number of extra requests."""

MAX_VIOLATION_SUBJECTS: Final = 1024
"""Subjects a :class:`PublishViolations` keeps at most. The least recently reported go first."""
PUBLISH_VIOLATION: Final = re.compile(r'permissions violation for publish to "(.+)"', re.IGNORECASE)
"""The server's error for a publish that the user may not make, as nats-py reports it."""
NOT_PERMITTED: Final = (
    "permissions violation for publish (the server denies the subject to the connection's NATS "
    "user: grant that user, for an agent its provider's user, publish permission for it)"
)

Outcome = bool | str
"""True when JetStream stored the message, False to retry it, or why it can never be sent."""
Message = tuple[str, bytes, str]
"""Subject, payload and ``Nats-Msg-Id`` of one message."""


def publish_outcome(error: BaseException | None, message: Message) -> Outcome | None:
    """Return the outcome of a publish that ended with ``error`` (None: stored).

    Returns None when no stream replied, which :func:`reject_streamless` decides.
    """
    if error is None:
        return True
    if isinstance(error, NoStreamResponseError):
        return None
    if isinstance(error, REJECTED_LOCALLY):
        return rejection_reason(error, message)
    if isinstance(error, APIError) and error.err_code in PERMANENT_JS_ERRORS:
        return rejection_reason(error, message)
    return False


class PublishViolations:
    """Subjects on which the server reported a publish permissions violation, and when.

    The server does not reply to a publish that the connection's user may not make. It sends
    ``-ERR 'Permissions Violation for Publish to "<subject>"'`` instead, which nats-py 2.16
    passes to the connection's error callback, lowercased. So subjects are kept lowercased,
    and two subjects that differ only in case share one entry.
    :class:`services.runtime.nats.TlsCheckingClient` feeds one from its error callback.

    Only the server that the client is connected to reports a violation to it. A leaf node
    whose user on the hub may not publish a subject reports nothing, and the publish gets no
    responders instead, which :func:`reject_streamless` sorts out.

    NOTE: a server on the way that accepts a message and then drops it without a report leaves
    the publisher only a timeout, so that message is still retried forever.
    """

    def __init__(self, max_subjects: int = MAX_VIOLATION_SUBJECTS) -> None:
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, not {max_subjects}")
        self._max_subjects = max_subjects
        self._reported_at: dict[str, float] = {}
        """Monotonic time of the latest violation, by lowercased subject, oldest first."""
        self._waiters: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._reported_at)

    def record(self, error: BaseException) -> bool:
        """Record ``error`` if it is a publish permissions violation, and return whether it was."""
        match = PUBLISH_VIOLATION.search(str(error))
        if match is None:
            return False
        subject = match.group(1).lower()
        self._reported_at.pop(subject, None)
        self._reported_at[subject] = time.monotonic()
        if len(self._reported_at) > self._max_subjects:
            del self._reported_at[next(iter(self._reported_at))]
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def next_report(self) -> asyncio.Future[None]:
        """Return a future that completes when the next violation is recorded.

        Cancel it when it is no longer needed, which removes it. Call from the connection's
        event loop.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        return waiter

    def reported_since(self, subject: str, since: float) -> bool:
        """Return whether a violation for ``subject`` arrived at or after monotonic ``since``."""
        reported_at = self._reported_at.get(subject.lower())
        return reported_at is not None and reported_at >= since


def publish_violations(js: JetStreamContext) -> PublishViolations | None:
    """Return the violations recorded for the connection of ``js``, or None if it keeps none.

    Only a :class:`services.runtime.nats.TlsCheckingClient` keeps them. nats-py 2.16 keeps the
    connection in the private ``_nc``.
    """
    violations = getattr(getattr(js, "_nc", None), "publish_violations", None)
    return violations if isinstance(violations, PublishViolations) else None


async def wait_for_acks(
    js: JetStreamContext,
    futures: Mapping[int, asyncio.Future[Any]],
    messages: Sequence[Message],
    timeout_s: float,
    sent_at: float,
) -> None:
    """Wait up to ``timeout_s`` for the acknowledgements in ``futures``, by message index.

    Returns early once every message still waiting is on a subject with a permissions
    violation reported at or after monotonic ``sent_at``: the server never replies to those,
    so waiting longer only delays what comes after. The caller reads the futures' states.
    A report names its subject lowercased, so while messages on two subjects that differ only
    in case both wait, the report may be about either, and both keep waiting.
    """
    violations = publish_violations(js)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        pending = {index: future for index, future in futures.items() if not future.done()}
        denied: set[int] = set()
        uncertain: set[int] = set()
        if violations:
            denied, uncertain = _reported_indexes(violations, pending, messages, sent_at)
        waiting = [future for index, future in pending.items() if index not in denied]
        if not waiting or remaining <= 0:
            return
        if violations is None:
            await asyncio.wait(waiting, timeout=remaining)
            return
        # Woken by the last acknowledgement, by one that settles which case variant a report
        # was about, or by a report: each may leave fewer to wait for.
        settling = {pending[index] for index in uncertain}
        await _wait_for_all_or_report(waiting, settling, violations, remaining)


def _reported_indexes(
    violations: PublishViolations,
    pending: Mapping[int, asyncio.Future[Any]],
    messages: Sequence[Message],
    sent_at: float,
) -> tuple[set[int], set[int]]:
    """Return the indexes in ``pending`` whose subject has a violation since ``sent_at``.

    The first set contains those that the violation is about for certain, and the second those
    that share their lowercased subject with a message on another subject still pending.
    """
    reported = [i for i in pending if violations.reported_since(messages[i][0], sent_at)]
    if not reported:
        return set(), set()
    variants: dict[str, set[str]] = {}
    for index in pending:
        subject = messages[index][0]
        variants.setdefault(subject.lower(), set()).add(subject)
    denied = {i for i in reported if len(variants[messages[i][0].lower()]) == 1}
    return denied, set(reported) - denied


async def _wait_for_all_or_report(
    waiting: Sequence[asyncio.Future[Any]],
    settling: Collection[asyncio.Future[Any]],
    violations: PublishViolations,
    timeout_s: float,
) -> None:
    """Wait up to ``timeout_s`` until every future in ``waiting`` is done, one in ``settling``
    is done, or a violation is reported.

    Uses callbacks rather than a task, so a cancelled caller leaves no task or callback behind.
    """
    wake = violations.next_report()
    unsettled = len(waiting)

    def settled(future: asyncio.Future[Any]) -> None:
        nonlocal unsettled
        unsettled -= 1
        if (unsettled == 0 or future in settling) and not wake.done():
            wake.set_result(None)

    for future in waiting:
        future.add_done_callback(settled)
    try:
        await asyncio.wait([wake], timeout=timeout_s)
    finally:
        wake.cancel()
        for future in waiting:
            future.remove_done_callback(settled)


def reject_unpermitted(
    js: JetStreamContext,
    outcomes: list[Outcome | None],
    messages: Sequence[Message],
    indexes: Iterable[int],
    sent_at: float,
) -> None:
    """Reject the messages at ``indexes`` that got no reply because their user may not publish.

    Sets ``outcomes[i]`` to the reason where it is False and the server reported a permissions
    violation for the message's subject at or after monotonic ``sent_at``, when the messages
    were sent. A violation reported before then, such as one from before an operator granted
    the permission, changes nothing.

    NOTE: a report names its subject lowercased, so an unanswered message on a permitted
    subject is rejected too when another subject that differs from it only in case is denied.
    """
    violations = publish_violations(js)
    if not violations:
        return
    denied: Counter[str] = Counter()
    for index in indexes:
        message = messages[index]
        if outcomes[index] is False and violations.reported_since(message[0], sent_at):
            outcomes[index] = rejection_reason(NOT_PERMITTED, message)
            denied[message[0]] += 1
    for subject, count in denied.items():
        DENIED_SUBJECTS.record(subject, NOT_PERMITTED, count)


def rejection_reason(error: BaseException | str, message: Message) -> str:
    """Return why ``message`` can never be published, naming its id, size and subject."""
    subject, payload, msg_id = message
    return f"{error} for message {msg_id} of {len(payload)} bytes on {subject}"


async def confirm_unacknowledged(
    js: JetStreamContext,
    indexes: Sequence[int],
    messages: Sequence[Message],
    outcomes: list[Outcome | None],
    timeout_s: float,
) -> None:
    """Publish unacknowledged messages again, each as a plain request, to learn their outcome.

    Sets ``outcomes[i]`` for each of the first :data:`MAX_CONFIRMATIONS` of ``indexes`` whose
    request ends within ``timeout_s``, all requests together. The others keep their outcome.
    A plain request returns JetStream's error, which ``publish_async`` loses in nats-py 2.16.
    JetStream drops the copy of a message it has already stored, by its ``Nats-Msg-Id``,
    within the stream's duplicate window.
    """
    if not indexes:
        return

    async def confirm(index: int) -> None:
        subject, payload, msg_id = messages[index]
        try:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
        except (NatsError, TimeoutError) as exc:
            outcomes[index] = publish_outcome(exc, messages[index])
        else:
            outcomes[index] = True

    try:
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            for index in indexes[:MAX_CONFIRMATIONS]:
                group.create_task(confirm(index))
    except TimeoutError:
        logger.debug("%d unacknowledged messages not confirmed in time", len(indexes))


async def reject_streamless(
    js: JetStreamContext,
    answers: Sequence[Outcome | None],
    messages: Sequence[Message],
    timeout_s: float,
) -> list[Outcome]:
    """Reject the messages no stream replied to if JetStream has no stream for them.

    Outside a NATS restart, no stream replies on a subject that no stream captures. During
    a restart JetStream's API does not reply either, so those messages are retried. A subject
    that a stream with a leader captures is dropped on the way, typically by a leaf node
    whose user on the hub may not publish it (see :mod:`services.runtime.denied_subjects`),
    so its messages are rejected too and counted in :data:`DENIED_SUBJECTS`. Each lookup is
    bounded by ``timeout_s``, and one that misses it leaves its messages to retry.
    """
    subjects = {messages[i][0] for i, answer in enumerate(answers) if answer is None}
    streamless, captured = await _streams_of_subjects(js, subjects, timeout_s)
    dropped = await dropped_streams(js, captured, timeout_s) if captured else {}
    outcomes: list[Outcome] = []
    dropped_counts: Counter[str] = Counter()
    for answer, message in zip(answers, messages, strict=True):
        subject = message[0]
        if answer is not None:
            outcomes.append(answer)
        elif subject in streamless:
            reason = f"no JetStream stream captures subject {subject}"
            outcomes.append(rejection_reason(reason, message))
        elif subject in dropped:
            outcomes.append(rejection_reason(dropped_reason(subject, dropped[subject]), message))
            dropped_counts[subject] += 1
        else:
            outcomes.append(False)
    for subject, count in dropped_counts.items():
        DENIED_SUBJECTS.record(subject, dropped_reason(subject, dropped[subject]), count)
    return outcomes


async def _streams_of_subjects(
    js: JetStreamContext, subjects: Collection[str], timeout_s: float
) -> tuple[set[str], dict[str, str]]:
    """Return the subjects that no stream captures, and the stream of each of the others.

    A subject whose lookup fails is in neither.
    """
    streamless: set[str] = set()
    captured: dict[str, str] = {}
    for subject in subjects:
        try:
            async with asyncio.timeout(timeout_s):
                captured[subject] = await js.find_stream_name_by_subject(subject)
        except NotFoundError:
            streamless.add(subject)
        except (NatsError, TimeoutError) as exc:
            logger.warning("stream lookup for subject %s failed: %s", subject, exc)
    return streamless, captured


def log_outcomes(outcomes: Sequence[Outcome]) -> None:
    """Log how many messages were rejected for good (ERROR) and how many are retried."""
    rejected = [o for o in outcomes if isinstance(o, str)]
    retried = outcomes.count(False)
    if rejected:
        logger.error(
            "%d of %d messages rejected for good: %s", len(rejected), len(outcomes), rejected[0]
        )
    if retried:
        logger.warning(
            "%d of %d messages not acknowledged; they are retried", retried, len(outcomes)
        )
