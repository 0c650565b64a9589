"""Errors of the grant service beyond the shared ones in :mod:`services.runtime.errors`."""

from __future__ import annotations

from decimal import Decimal, localcontext

from services.grant.amounts import EXACT, format_amount
from services.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "InsufficientBudget",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
]


def describe_pot(name: str) -> str:
    """Return the words for a pot's ledger name: ``grant:g-1`` gives ``grant g-1``."""
    kind, _, identifier = name.partition(":")
    if not identifier:
        return name
    return f"{kind.replace('_', '-')} {identifier}"


class InsufficientBudget(FailedPrecondition):
    """A grant or sub-allocation has less available budget than a request needs."""

    def __init__(
        self,
        pot: str,
        requested: Decimal,
        available: Decimal,
        *,
        context: str = "",
        credited: Decimal | None = None,
    ) -> None:
        """``pot`` is the ledger name (``grant:<id>``); ``context`` opens the message.

        ``credited`` is all the pot was ever credited, when the pot is the one that was asked.
        """
        with localcontext(EXACT):
            shortfall = requested - available
        super().__init__(
            f"{context}{describe_pot(pot)} has {format_amount(available)} PF-days available, "
            f"{format_amount(requested)} requested; shortfall {format_amount(shortfall)} PF-days",
            field="amount_pf_days",
        )
        self.pot = pot
        self.requested = requested
        self.available = available
        self.shortfall = shortfall
        self.credited = credited
