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


class InsufficientBudget(FailedPrecondition):
    """A grant or sub-allocation has less available budget than a request needs."""

    def __init__(self, account: str, requested: Decimal, available: Decimal) -> None:
        with localcontext(EXACT):
            shortfall = requested - available
        super().__init__(
            f"insufficient budget on {account}: requested {format_amount(requested)} PF-days, "
            f"available {format_amount(available)} PF-days, "
            f"shortfall {format_amount(shortfall)} PF-days",
            field="amount_pf_days",
        )
        self.account = account
        self.requested = requested
        self.available = available
        self.shortfall = shortfall
