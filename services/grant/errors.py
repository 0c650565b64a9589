"""Errors of the grant service beyond the shared ones in :mod:`services.runtime.errors`."""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Final

from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from acsp.decimals import display_decimal
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


INSUFFICIENT_BUDGET: Final = "INSUFFICIENT_BUDGET"
"""``google.rpc.ErrorInfo.reason`` of :class:`InsufficientBudget`, whose metadata carries the
exact amounts."""
ERROR_DOMAIN: Final = "grant.acsp"


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
        # The message rounds for people, and details() carries the exact amounts.
        super().__init__(
            f"{context}{describe_pot(pot)} has {display_decimal(available)} PF-days available, "
            f"{display_decimal(requested)} requested; shortfall {display_decimal(shortfall)} "
            "PF-days",
            field="amount_pf_days",
        )
        self.pot = pot
        self.requested = requested
        self.available = available
        self.shortfall = shortfall
        self.credited = credited

    def details(self) -> list[any_pb2.Any]:
        """Return the precondition failure and an ErrorInfo with the exact amounts."""
        info = error_details_pb2.ErrorInfo(
            reason=INSUFFICIENT_BUDGET,
            domain=ERROR_DOMAIN,
            metadata={
                "pot": self.pot,
                "requested_pf_days": format_amount(self.requested),
                "available_pf_days": format_amount(self.available),
                "shortfall_pf_days": format_amount(self.shortfall),
            },
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [*super().details(), packed]
