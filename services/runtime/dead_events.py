"""Dead events: outbox messages that JetStream rejected for good, kept for an operator.

A service that publishes from an outbox counts each rejection for good (see
:mod:`services.runtime.publish_errors`) in the outbox row. Once the count reaches the
service's limit, the row leaves the outbox and its message goes to the ``dead_events`` table
of the service's schema in the same transaction, so it is neither lost nor retried forever.
The service then calls :func:`report_dead_events`, which logs one ERROR line per message and
counts it. A migration creates the table with these columns::

    message_id  text PRIMARY KEY       -- the Nats-Msg-Id the message was published with
    event_id    text NOT NULL
    subject     text NOT NULL
    payload     bytea NOT NULL
    reason      text NOT NULL          -- the last rejection's reason
    rejections  integer NOT NULL
    created_at  timestamptz NOT NULL   -- when the message entered the outbox
    dead_at     timestamptz NOT NULL DEFAULT now()

To publish a dead event by hand, send its payload to its subject with its ``message_id`` as
the ``Nats-Msg-Id`` header, then delete the row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg
from opentelemetry.metrics import Counter

REJECTION_SPACING_S: Final = 5.0
"""Seconds before a rejected message is tried and counted again. With a limit of N, a message
moves no sooner than (N - 1) times this after its first rejection. So a stream that an
operator deletes and declares again within that time does not move the messages published
meanwhile."""


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """A message moved out of an outbox because JetStream rejected it for good."""

    message_id: str
    """The ``Nats-Msg-Id`` the message was published with."""
    event_id: str
    subject: str
    payload: bytes
    reason: str
    """Reason of the last rejection, from JetStream or the NATS client."""
    rejections: int
    created_at: datetime
    """When the message entered the outbox."""


async def insert_dead_events(
    conn: asyncpg.Connection, table: str, events: Sequence[DeadEvent]
) -> None:
    """Insert ``events`` into ``table``, in the caller's transaction.

    ``table`` is a constant of the caller, such as ``metering.dead_events``. A message that is
    already there, moved again after an operator put it back in the outbox, keeps one row that
    sums the rejections of both moves.
    """
    if not events:
        return
    await conn.execute(
        f"""
        INSERT INTO {table} AS d
            (message_id, event_id, subject, payload, reason, rejections, created_at)
        SELECT * FROM unnest(
            $1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int[],
            $7::timestamptz[]
        )
        ON CONFLICT (message_id) DO UPDATE SET
            reason = EXCLUDED.reason, rejections = d.rejections + EXCLUDED.rejections,
            dead_at = now()
        """,
        [e.message_id for e in events],
        [e.event_id for e in events],
        [e.subject for e in events],
        [e.payload for e in events],
        [e.reason for e in events],
        [e.rejections for e in events],
        [e.created_at for e in events],
    )


def report_dead_events(
    logger: logging.Logger, table: str, events: Sequence[DeadEvent], counter: Counter
) -> None:
    """Log one ERROR line per moved message, with its ids, subject and reason, and count them."""
    for event in events:
        logger.error(
            "event %s (message %s) on %s moved to %s after %d rejections: %s",
            event.event_id,
            event.message_id,
            event.subject,
            table,
            event.rejections,
            event.reason,
            extra={"event_id": event.event_id, "message_id": event.message_id},
        )
    if events:
        counter.add(len(events))
