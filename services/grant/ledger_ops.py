"""Requests and results of the money-moving ledger operations, as frozen values.

The gRPC layer converts protobuf messages into these before the ledger runs, so the ledger
never receives a protobuf type. Each request carries the idempotency key that makes a retry or a
replay return the stored result instead of moving budget again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.grant.constraints import UNKNOWN_PLACEMENT, Placement
from services.grant.ledger_rules import EntryKind


@dataclass(frozen=True, slots=True)
class Cause:
    """The actor, trigger and reason behind a movement."""

    actor: str
    trigger: str
    """E.g. ``rpc:PlaceHold`` or ``timer:expiry``."""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HoldRequest:
    key: str
    grant_id: str | None
    """The grant to draw on; None to let the project's grant that expires first pay."""
    project_id: str | None
    allocation_id: str | None
    job_id: str
    amount: Decimal
    cause: Cause
    placement: Placement = UNKNOWN_PLACEMENT
    """The job's regions and model, checked against the paying grant's constraints."""

    def digest(self) -> str:
        # The placement is left out: it decides whether the hold is allowed, not what it
        # moves, and a retry of the same hold from an older caller may not carry it.
        return _digest(
            "hold", self.grant_id, self.project_id, self.allocation_id, self.job_id, self.amount
        )


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    key: str
    hold_id: str
    amount: Decimal
    cause: Cause

    def digest(self) -> str:
        return _digest("charge", self.hold_id, self.amount)


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    key: str
    hold_id: str
    cause: Cause
    settle: bool = True
    """Also stop the hold from taking further charges."""

    def digest(self) -> str:
        return _digest("release", self.hold_id, self.settle)


@dataclass(frozen=True, slots=True)
class RefundRequest:
    key: str
    hold_id: str
    amount: Decimal
    cause: Cause

    def digest(self) -> str:
        return _digest("refund", self.hold_id, self.amount)


LedgerRequest = HoldRequest | ChargeRequest | ReleaseRequest | RefundRequest


@dataclass(frozen=True, slots=True)
class EntryResult:
    """The ledger entry a request created, or found when an earlier request with its key had."""

    entry_id: int
    kind: EntryKind
    grant_id: str
    hold_id: str | None
    allocation_id: str | None
    job_id: str
    amount: Decimal
    from_held: Decimal
    created_at: datetime
    applied: bool
    """True when this request moved the budget; False when it returned an earlier result."""


def _digest(*parts: object) -> str:
    """Fingerprint a request so that a reused key with a different request is detected."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
