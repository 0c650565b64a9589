"""Budget-low events of sub-allocations: one per fall below the threshold, none on a retry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from acsp.v1 import events_pb2
from services.grant import budget
from services.grant.ledger import Ledger
from services.grant.ledger_ops import Cause, EntryResult, HoldRequest, ReleaseRequest
from services.runtime.db import Database
from tests.grant.conftest import seed_grant, seed_project

SCHEDULER = Cause(actor="scheduler", trigger="test")


async def low_events(db: Database) -> list[events_pb2.GrantEvent]:
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT payload FROM outbox WHERE subject LIKE '%budget_low' ORDER BY id"
        )
    return [events_pb2.GrantEvent.FromString(row["payload"]) for row in rows]


async def hold(ledger: Ledger, grant_id: str, allocation_id: str, amount: str, key: str) -> str:
    request = HoldRequest(
        key=key,
        grant_id=grant_id,
        project_id=None,
        allocation_id=allocation_id,
        job_id=key,
        amount=Decimal(amount),
        cause=SCHEDULER,
    )
    [outcome] = await ledger.apply([request])
    assert isinstance(outcome, EntryResult), outcome
    return outcome.hold_id or ""


async def test_sub_allocation_low_once_per_fall(db: Database) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "100")
    async with db.transaction() as conn:
        allocation_id = await budget.create_sub_allocation(
            conn,
            grant_id,
            None,
            "pia",
            Decimal("10"),
            uuid.uuid4().hex,
            SCHEDULER,
            datetime.now(UTC),
        )
    ledger = Ledger(db, low_fraction=Decimal("0.2"))

    await hold(ledger, grant_id, allocation_id, "7", "a")
    above = await low_events(db)
    second = await hold(ledger, grant_id, allocation_id, "2", "b")
    await hold(ledger, grant_id, allocation_id, "2", "b")  # A retry of the same hold.
    await hold(ledger, grant_id, allocation_id, "0.5", "c")  # Still below: no new event.
    first_fall = await low_events(db)
    [released] = await ledger.apply([ReleaseRequest("release-b", second, SCHEDULER)])
    assert isinstance(released, EntryResult)
    await hold(ledger, grant_id, allocation_id, "1.8", "d")
    events = await low_events(db)

    assert above == []
    assert len(first_fall) == 1
    assert len(events) == 2
    assert [e.sub_allocation_id for e in events] == [allocation_id, allocation_id]
    assert [e.grant_id for e in events] == [grant_id, grant_id]
    assert events[0].available_pf_days.value == "1"
    assert events[1].available_pf_days.value == "0.7"
    assert events[0].event_id == f"{grant_id}/{allocation_id}/budget_low/1"
    assert events[1].event_id == f"{grant_id}/{allocation_id}/budget_low/2"
    assert events[0].cause.reference_id == "b"


async def test_grant_low_unaffected_by_sub_allocation(db: Database) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "100")
    async with db.transaction() as conn:
        allocation_id = await budget.create_sub_allocation(
            conn,
            grant_id,
            None,
            "pia",
            Decimal("10"),
            uuid.uuid4().hex,
            SCHEDULER,
            datetime.now(UTC),
        )
    ledger = Ledger(db, low_fraction=Decimal("0.2"))

    await hold(ledger, grant_id, allocation_id, "9", "a")
    events = await low_events(db)

    assert len(events) == 1
    assert events[0].sub_allocation_id == allocation_id
