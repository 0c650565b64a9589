"""Grant events: written to the outbox table in the changing transaction, published after.

A change and the event that reports it commit together, so an event is never lost when the
service stops between the two and never sent for a change that rolled back. The publisher in
:mod:`services.grant.outbox` sends outbox rows to JetStream with the row id as the message id,
so JetStream's duplicate window drops a row sent twice after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

import asyncpg

from acsp import subjects
from acsp.v1 import common_pb2, events_pb2
from services.grant.amounts import format_amount


class EventKind(StrEnum):
    """Kind of grant event; the value is the last token of its subject."""

    AWARDED = "awarded"
    BUDGET_LOW = "budget_low"
    EXPIRING_SOON = "expiring_soon"
    EXPIRED = "expired"


_PROTO_KIND = {
    EventKind.AWARDED: events_pb2.GRANT_EVENT_KIND_AWARDED,
    EventKind.BUDGET_LOW: events_pb2.GRANT_EVENT_KIND_BUDGET_LOW,
    EventKind.EXPIRING_SOON: events_pb2.GRANT_EVENT_KIND_EXPIRING_SOON,
    EventKind.EXPIRED: events_pb2.GRANT_EVENT_KIND_EXPIRED,
}


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A grant fact waiting to be written to the outbox."""

    kind: EventKind
    grant_id: str
    project_id: str
    available: Decimal
    at: datetime
    actor: str
    trigger: str
    reference_id: str
    reason: str
    sub_allocation_id: str = ""
    """The sub-allocation a budget-low event concerns; empty for the whole grant."""
    crossing: int = 0
    """Ordinal of this fall of the sub-allocation below the threshold, from 1; 0 for a grant."""

    @property
    def event_id(self) -> str:
        if self.sub_allocation_id:
            return f"{self.grant_id}/{self.sub_allocation_id}/{self.kind}/{self.crossing}"
        return f"{self.grant_id}/{self.kind}"

    def subject(self) -> str:
        return subjects.grant_event_subject(self.kind.value)

    def payload(self) -> bytes:
        message = events_pb2.GrantEvent(
            event_id=self.event_id,
            kind=_PROTO_KIND[self.kind],
            grant_id=self.grant_id,
            project_id=self.project_id,
            available_pf_days=common_pb2.Decimal(value=format_amount(self.available)),
            sub_allocation_id=self.sub_allocation_id,
            cause=common_pb2.Cause(
                trigger=self.trigger,
                reference_id=self.reference_id,
                actor=self.actor,
                reason=self.reason,
            ),
        )
        message.time.FromDatetime(self.at)
        message.cause.time.FromDatetime(self.at)
        return message.SerializeToString()


async def write_events(conn: asyncpg.Connection, events: Sequence[OutboxEvent]) -> None:
    """Insert events into the outbox inside the caller's transaction."""
    if not events:
        return
    await conn.executemany(
        "INSERT INTO outbox (event_id, subject, payload) VALUES ($1, $2, $3)",
        [(e.event_id, e.subject(), e.payload()) for e in events],
    )
