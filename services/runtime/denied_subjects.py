"""Subjects that NATS denies to a publisher: their reports, and the leaf node case.

A server that denies a publish to the connection's own user reports a permissions violation
(see :class:`services.runtime.publish_errors.PublishViolations`). A leaf node on the way does
not. With nats-server 2.15, a publish through a leaf node gets no responders at once when the
leaf's NATS user on the hub may not publish its subject. The leaf does not pass the hub's
interest in that subject on to its clients. A stream without a leader, during an election
or without quorum, also gets no responders, but then JetStream's API, which the leaf forwards,
reports no leader for the stream. So a subject that gets no responders while the API finds a
stream with a leader for it is dropped on the way, and its messages are rejected for good.
They go where each publisher puts such messages: the agent's dead letters, or the dead events
of a service's outbox.

NOTE: the two lookups run after the publish, so a stream that lost its leader just before the
publish and got one back before the lookup is taken for a dropped subject. The outboxes of the
agent and of the services count several rejections, spaced out, before they give a message up,
which rides out an election.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

logger = logging.getLogger(__name__)

LOG_SPACING_S: Final = 60.0
"""Seconds between two log lines about the same denied subject."""
MAX_SUBJECTS: Final = 1024
"""Subjects a :class:`DeniedSubjects` keeps at most. The least recently denied go first."""


def dropped_reason(subject: str, stream: str) -> str:
    """Return why messages on ``subject`` can never reach ``stream``, and how to fix it."""
    return (
        f"no responders on subject {subject}, although JetStream stream {stream} captures it "
        "and has a leader, so a NATS server on the way drops it. A leaf node does this when its "
        "NATS user on the hub may not publish to the subject: grant that user (the provider's "
        f"user in the hub's configuration) publish permission for {subject}"
    )


@dataclass(slots=True)
class _Report:
    unlogged: int
    """Messages denied since the last log line."""
    logged_at: float
    """Monotonic time of the last log line."""


class DeniedSubjects:
    """Counts of the messages rejected because NATS denies their subject to the publisher.

    Logs one WARNING per subject at most every ``log_spacing_s``, with the messages counted
    since the previous line, because a denied subject of usage samples repeats every interval.
    """

    def __init__(
        self, log_spacing_s: float = LOG_SPACING_S, max_subjects: int = MAX_SUBJECTS
    ) -> None:
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, not {max_subjects}")
        self._log_spacing_s = log_spacing_s
        self._max_subjects = max_subjects
        self._reports: dict[str, _Report] = {}
        """Reports by subject, least recently denied first."""
        self.total = 0
        """Messages rejected for a denied subject since the process started."""

    def record(self, subject: str, reason: str, messages: int) -> None:
        """Count ``messages`` on ``subject`` rejected for ``reason``, and log them unless a line
        about the subject is recent."""
        self.total += messages
        now = time.monotonic()
        report = self._reports.pop(subject, None)
        if report is None:
            report = _Report(0, now - self._log_spacing_s)
        self._reports[subject] = report
        if len(self._reports) > self._max_subjects:
            del self._reports[next(iter(self._reports))]
        report.unlogged += messages
        if now - report.logged_at < self._log_spacing_s:
            return
        logger.warning(
            "%d messages on %s rejected for good since the last report (%d on all denied "
            "subjects): %s",
            report.unlogged,
            subject,
            self.total,
            reason,
            extra={"subject": subject},
        )
        report.unlogged = 0
        report.logged_at = now


DENIED_SUBJECTS: Final = DeniedSubjects()
"""The counts of this process, which every publisher shares."""


async def dropped_streams(
    js: JetStreamContext, streams: Mapping[str, str], timeout_s: float
) -> dict[str, str]:
    """Return those of ``streams`` (stream by subject) whose stream has a leader.

    The caller passes the subjects that got no responders although a stream captures them.
    One stream lookup runs per stream, each bounded by ``timeout_s``. A lookup that fails or
    times out leaves that stream's subjects out, so their messages are retried.
    """
    led = await _streams_with_leader(js, set(streams.values()), timeout_s)
    return {subject: stream for subject, stream in streams.items() if stream in led}


async def _streams_with_leader(
    js: JetStreamContext, names: Collection[str], timeout_s: float
) -> set[str]:
    led: set[str] = set()
    for name in names:
        try:
            async with asyncio.timeout(timeout_s):
                info = await js.stream_info(name)
        except (NatsError, TimeoutError) as exc:
            logger.warning("stream info of %s failed: %s", name, exc)
            continue
        # nats-server 2.15 reports a leader outside a cluster too. A reply without cluster
        # information is taken for a stream that is up.
        if info.cluster is None or info.cluster.leader:
            led.add(name)
    return led
