"""The rows one ledger batch has locked, and the changes the rules made to them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.grant.events import OutboxEvent
from services.grant.ledger_ops import LedgerRequest
from services.grant.ledger_rules import GrantState, HoldBalance, Movement, Pot


def grant_pot_name(grant_id: str) -> str:
    return f"grant:{grant_id}"


def allocation_pot_name(allocation_id: str) -> str:
    return f"sub_allocation:{allocation_id}"


def pot_from_row(name: str, row: Mapping[str, Any]) -> Pot:
    """Read a pot from a ``grants`` or ``allocations`` row."""
    return Pot(
        name=name,
        credited=row["credited"],
        available=row["available"],
        held=row["held"],
        consumed=row["consumed"],
        refunded=row["refunded"],
    )


@dataclass(frozen=True, slots=True)
class AppliedEntry:
    """A request the rules accepted, with what the entry row records about it."""

    request: LedgerRequest
    movement: Movement
    grant_id: str
    hold_id: str | None
    allocation_id: str | None
    job_id: str


@dataclass
class BatchState:
    """Rows locked for one batch and the changes applied to them so far."""

    now: datetime
    grants: dict[str, GrantState] = field(default_factory=dict)
    grant_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The locked grant rows, including ``project_id`` and ``low_notified``."""
    allocation_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The locked sub-allocation rows by id, including ``low_notified`` and ``low_crossings``."""
    pots: dict[str, Pot] = field(default_factory=dict)
    """Keyed by pot name: ``grant:<id>`` or ``sub_allocation:<id>``."""
    pot_grant: dict[str, str] = field(default_factory=dict)
    holds: dict[str, HoldBalance] = field(default_factory=dict)
    hold_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_holds: set[str] = field(default_factory=set)
    existing: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    """Stored entries of the batch's idempotency keys."""
    changed_pots: set[str] = field(default_factory=set)
    changed_holds: set[str] = field(default_factory=set)
    entries: list[AppliedEntry] = field(default_factory=list)
    events: list[OutboxEvent] = field(default_factory=list)
