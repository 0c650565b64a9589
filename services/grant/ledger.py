"""The ledger's database side: applies batches of hold, charge, release and refund requests.

One batch is one transaction of four round trips: BEGIN, one statement that locks and reads
what the batch touches (:mod:`services.grant.ledger_reads`), one statement that writes it
(:mod:`services.grant.ledger_writes`), and COMMIT. In between, each request is applied in memory
with the pure rules of :mod:`services.grant.ledger_rules`. A request the rules reject gets its
error and changes nothing, while the rest of its batch commits. The ``UNIQUE`` constraint on the
idempotency key is the final guard against applying a request twice: a violation rolls the batch
back and it runs again, and then finds the stored entry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg

from services.grant import ledger_rules as rules
from services.grant.amounts import format_amount
from services.grant.constraints import GrantConstraints, check_placement, placement_problem
from services.grant.errors import FailedPrecondition, NotFound
from services.grant.events import EventKind, OutboxEvent
from services.grant.ledger_ops import (
    ChargeRequest,
    EntryResult,
    HoldRequest,
    LedgerRequest,
    ReleaseRequest,
)
from services.grant.ledger_reads import lock_and_read
from services.grant.ledger_rules import EntryKind, GrantState, HoldBalance, Movement
from services.grant.ledger_state import (
    AppliedEntry,
    BatchState,
    allocation_pot_name,
    grant_pot_name,
    pot_from_row,
)
from services.grant.ledger_writes import write_batch
from services.runtime.db import Database
from services.runtime.errors import Unavailable

log = logging.getLogger(__name__)

RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01", "23505"})
"""Serialization failure, deadlock, and a unique violation on an idempotency key."""

Outcome = EntryResult | Exception


class RequestRejected(Exception):
    """An atomic batch was not applied because the rules rejected one of its requests."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"request {index} was rejected: {error}")
        self.index = index
        self.error = error


class _Written:
    """Marker outcome: the request's entry is in the batch and gets its id once written."""


@dataclass(frozen=True, slots=True)
class _Duplicate:
    """Marker outcome: the request repeats the key of the batch's request at ``index``."""

    index: int


WRITTEN: Final = _Written()
_Pending = EntryResult | Exception | _Written | _Duplicate


class Ledger:
    """Applies ledger requests in transactions on a connection pool.

    ``low_fraction`` is the share of credited budget below which a grant's available budget
    emits one budget-low event. A sub-allocation emits one each time its available budget falls
    below that share of what it was credited.
    """

    def __init__(
        self, db: Database, *, low_fraction: Decimal = Decimal("0.1"), max_attempts: int = 8
    ) -> None:
        self._db = db
        self._low_fraction = low_fraction
        self._max_attempts = max_attempts

    async def apply(
        self, requests: Sequence[LedgerRequest], *, atomic: bool = False
    ) -> list[Outcome]:
        """Apply requests in one transaction; return one result or error per request, in order.

        With ``atomic``, a request that the rules reject leaves the whole batch unapplied and
        raises :class:`RequestRejected` naming its position.

        Serialization failures, deadlocks and idempotency-key races roll the batch back and
        retry it with jittered backoff, at most ``max_attempts`` times, then raise Unavailable.
        """
        for attempt in range(1, self._max_attempts + 1):
            try:
                async with self._db.acquire() as conn:
                    return await self._apply_once(conn, requests, atomic)
            except asyncpg.PostgresError as error:
                if error.sqlstate not in RETRYABLE_SQLSTATES:
                    raise
                log.info(
                    "ledger batch of %s requests rolled back (%s), attempt %s of %s",
                    len(requests),
                    error.sqlstate,
                    attempt,
                    self._max_attempts,
                )
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
        raise Unavailable(
            f"the ledger batch kept conflicting after {self._max_attempts} attempts; retry later"
        )

    async def _apply_once(
        self, conn: asyncpg.Connection, requests: Sequence[LedgerRequest], atomic: bool
    ) -> list[Outcome]:
        batch = BatchState(now=datetime.now(UTC))
        async with conn.transaction():
            outcomes = await self._lock_and_apply(conn, batch, requests)
            if atomic:
                for index, outcome in enumerate(outcomes):
                    if isinstance(outcome, Exception):
                        # Nothing is written yet, so leaving the transaction undoes only locks.
                        raise RequestRejected(index, outcome)
            written = await write_batch(conn, batch) if batch.entries else {}
        return _finish(outcomes, requests, written)

    async def _lock_and_apply(
        self, conn: asyncpg.Connection, batch: BatchState, requests: Sequence[LedgerRequest]
    ) -> list[_Pending]:
        rows = await lock_and_read(conn, requests)
        project_grants: dict[str, list[str]] = {}
        for row in rows.grants:
            grant = GrantState(row["id"], row["starts_at"], row["ends_at"], row["expired"])
            batch.grants[grant.grant_id] = grant
            batch.grant_meta[grant.grant_id] = row
            name = grant_pot_name(grant.grant_id)
            batch.pots[name] = pot_from_row(name, row)
            batch.pot_grant[name] = grant.grant_id
            if not row["expired"]:
                project_grants.setdefault(row["project_id"], []).append(grant.grant_id)
        for row in rows.allocations:
            name = allocation_pot_name(row["id"])
            batch.pots[name] = pot_from_row(name, row)
            batch.allocation_meta[row["id"]] = row
            batch.pot_grant[name] = row["grant_id"]
        for row in rows.holds:
            batch.hold_rows[row["id"]] = row
            batch.holds[row["id"]] = HoldBalance(
                hold_id=row["id"],
                amount=row["amount"],
                remaining=row["remaining"],
                charged=row["charged"],
                refunded=row["refunded"],
                released=row["released"],
                settled=row["settled"],
            )
        batch.existing = {row["idempotency_key"]: row for row in rows.entries}

        outcomes: list[_Pending] = []
        seen: dict[str, int] = {}
        for index, request in enumerate(requests):
            if request.key in seen:
                first = seen[request.key]
                if requests[first].digest() != request.digest():
                    outcomes.append(_reused_key(request.key))
                    continue
                # A duplicate inside the batch gets the first one's outcome once it is written.
                outcomes.append(_Duplicate(first))
                continue
            seen[request.key] = index
            try:
                outcomes.append(self._apply_one(batch, request, project_grants))
            except (FailedPrecondition, NotFound) as error:
                outcomes.append(error)
        return outcomes

    def _apply_one(
        self, batch: BatchState, request: LedgerRequest, project_grants: dict[str, list[str]]
    ) -> _Pending:
        stored = batch.existing.get(request.key)
        if stored is not None:
            if stored["request_digest"] != request.digest():
                raise _reused_key(request.key)
            return _result_from_row(stored, applied=False)
        if isinstance(request, HoldRequest):
            return self._hold(batch, request, project_grants)

        hold = batch.holds.get(request.hold_id)
        if hold is None:
            raise NotFound("hold", request.hold_id)
        row = batch.hold_rows[request.hold_id]
        grant = batch.grants[row["grant_id"]]
        if row["allocation_id"]:
            pot = batch.pots[allocation_pot_name(row["allocation_id"])]
        else:
            pot = batch.pots[grant_pot_name(grant.grant_id)]

        if isinstance(request, ChargeRequest):
            movement = rules.charge(pot, hold, request.amount)
        elif isinstance(request, ReleaseRequest):
            movement = rules.release(grant, pot, hold, settle=request.settle)
        else:
            movement = rules.refund(grant, pot, hold, request.amount)
        self._record(
            batch,
            request,
            movement,
            grant.grant_id,
            hold.hold_id,
            row["allocation_id"],
            row["job_id"],
        )
        return WRITTEN

    def _hold(
        self, batch: BatchState, request: HoldRequest, project_grants: dict[str, list[str]]
    ) -> _Pending:
        if request.grant_id:
            grant = batch.grants.get(request.grant_id)
            if grant is None:
                raise NotFound("grant", request.grant_id)
            check_placement(grant.grant_id, _constraints(batch, grant.grant_id), request.placement)
            pot = batch.pots[grant_pot_name(grant.grant_id)]
        else:
            assert request.project_id is not None
            grant_ids = project_grants.get(request.project_id, [])
            allowed = [
                g
                for g in grant_ids
                if placement_problem(g, _constraints(batch, g), request.placement) is None
            ]
            if grant_ids and not allowed:
                # Name the limits of the grant that would have paid without the placement.
                first = min(grant_ids, key=lambda g: (batch.grants[g].ends_at, g))
                check_placement(first, _constraints(batch, first), request.placement)
            candidates = [(batch.grants[g], batch.pots[grant_pot_name(g)]) for g in allowed]
            grant, pot = rules.choose_grant(candidates, request.amount, batch.now)
        if request.allocation_id:
            name = allocation_pot_name(request.allocation_id)
            if batch.pot_grant.get(name) != grant.grant_id:
                raise NotFound("sub-allocation", request.allocation_id)
            pot = batch.pots[name]
        hold_id = f"hold-{uuid.uuid4().hex}"
        movement = rules.place_hold(grant, pot, hold_id, request.amount, batch.now)
        batch.new_holds.add(hold_id)
        batch.hold_rows[hold_id] = {
            "grant_id": grant.grant_id,
            "allocation_id": request.allocation_id,
            "job_id": request.job_id,
        }
        self._record(
            batch, request, movement, grant.grant_id, hold_id, request.allocation_id, request.job_id
        )
        return WRITTEN

    def _record(
        self,
        batch: BatchState,
        request: LedgerRequest,
        movement: Movement,
        grant_id: str,
        hold_id: str | None,
        allocation_id: str | None,
        job_id: str,
    ) -> None:
        grant_pot = grant_pot_name(grant_id)
        before = batch.pots[grant_pot].available
        before_allocation = (
            batch.pots[allocation_pot_name(allocation_id)] if allocation_id else None
        )
        for pot in movement.pots:
            batch.pots[pot.name] = pot
            batch.changed_pots.add(pot.name)
        if allocation_id and before_allocation is not None:
            self._allocation_low(
                batch, request, grant_id, allocation_id, before_allocation.available
            )
        if movement.hold is not None and hold_id is not None:
            batch.holds[hold_id] = movement.hold
            batch.changed_holds.add(hold_id)
        batch.entries.append(
            AppliedEntry(request, movement, grant_id, hold_id, allocation_id, job_id)
        )
        meta = batch.grant_meta[grant_id]
        after = batch.pots[grant_pot]
        if not meta["low_notified"] and rules.crossed_low(
            before, after.available, after.credited, self._low_fraction
        ):
            meta["low_notified"] = True
            batch.events.append(
                OutboxEvent(
                    kind=EventKind.BUDGET_LOW,
                    grant_id=grant_id,
                    project_id=meta["project_id"],
                    available=after.available,
                    at=batch.now,
                    actor=request.cause.actor,
                    trigger=request.cause.trigger,
                    reference_id=request.key,
                    reason=f"available fell below {format_amount(self._low_fraction)} of credited",
                )
            )

    def _allocation_low(
        self,
        batch: BatchState,
        request: LedgerRequest,
        grant_id: str,
        allocation_id: str,
        before: Decimal,
    ) -> None:
        """Record a budget-low event when a sub-allocation just fell below the threshold, and
        re-arm it once it rises back."""
        meta = batch.allocation_meta[allocation_id]
        after = batch.pots[allocation_pot_name(allocation_id)]
        notify, notified = rules.low_state(
            bool(meta["low_notified"]), before, after.available, after.credited, self._low_fraction
        )
        meta["low_notified"] = notified
        if not notify:
            return
        meta["low_crossings"] = int(meta["low_crossings"]) + 1
        batch.events.append(
            OutboxEvent(
                kind=EventKind.BUDGET_LOW,
                grant_id=grant_id,
                project_id=batch.grant_meta[grant_id]["project_id"],
                available=after.available,
                at=batch.now,
                actor=request.cause.actor,
                trigger=request.cause.trigger,
                reference_id=request.key,
                reason=(
                    f"available of sub-allocation {allocation_id} fell below "
                    f"{format_amount(self._low_fraction)} of credited"
                ),
                sub_allocation_id=allocation_id,
                crossing=meta["low_crossings"],
            )
        )


def _reused_key(key: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"idempotency key {key!r} was already used for a different request",
        field="request_id",
    )


def _constraints(batch: BatchState, grant_id: str) -> GrantConstraints:
    return GrantConstraints.from_row(batch.grant_meta[grant_id])


def _result_from_row(row: Mapping[str, Any], *, applied: bool) -> EntryResult:
    return EntryResult(
        entry_id=row["id"],
        kind=EntryKind(row["kind"]),
        grant_id=row["grant_id"],
        hold_id=row["hold_id"],
        allocation_id=row["allocation_id"],
        job_id=row["job_id"],
        amount=row["amount"],
        from_held=row["from_held"],
        created_at=row["created_at"],
        applied=applied,
    )


def _finish(
    pending: list[_Pending],
    requests: Sequence[LedgerRequest],
    written: dict[str, asyncpg.Record],
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for request, outcome in zip(requests, pending, strict=True):
        if isinstance(outcome, _Written):
            outcomes.append(_result_from_row(written[request.key], applied=True))
        elif isinstance(outcome, _Duplicate):
            first = outcomes[outcome.index]
            outcomes.append(
                replace(first, applied=False) if isinstance(first, EntryResult) else first
            )
        else:
            outcomes.append(outcome)
    return outcomes
