"""PF-day amounts as pending reasons show them, and the reason of a hold the budget cannot pay.

The ledger keeps amounts exact at 1e-24 PF-day, which is 24 decimal places. A person reading a
job's pending reason needs a few of them, so these messages round for display only. The exact
amounts stay in the job's ``hold_amount`` and in the grant service's balances.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Final

from acsp.decimals import format_decimal

DISPLAY_PLACES: Final = 6
"""Decimal places of a displayed amount of at least :data:`SMALL_AMOUNT` PF-days."""
SMALL_AMOUNT: Final = Decimal("1e-6")
"""Below this, an amount shows :data:`SMALL_DIGITS` significant digits instead, so a nonzero
amount never shows as 0."""
SMALL_DIGITS: Final = 3


def display_pf_days(amount: Decimal) -> str:
    """Round ``amount`` for a message, in plain notation: ``1.25``, ``0.000000123``, ``12``."""
    if amount.is_zero() or not amount.is_finite():
        return format_decimal(amount) if amount.is_finite() else str(amount)
    if abs(amount) >= SMALL_AMOUNT:
        step = Decimal(1).scaleb(-DISPLAY_PLACES)
    else:
        step = Decimal(1).scaleb(amount.adjusted() - SMALL_DIGITS + 1)
    return format_decimal(amount.quantize(step, rounding=ROUND_HALF_EVEN))


def pot_name(grant_id: str, sub_allocation_id: str) -> str:
    """Name the pot a hold draws on: ``grant g-1`` or ``sub-allocation s-1 of grant g-1``."""
    if sub_allocation_id:
        return f"sub-allocation {sub_allocation_id} of grant {grant_id}"
    return f"grant {grant_id}"


def no_budget_message(
    amount: Decimal,
    grant_id: str,
    sub_allocation_id: str,
    available: Decimal,
    credited: Decimal | None,
) -> str:
    """Explain a hold of ``amount`` PF-days that its grant or sub-allocation could not pay.

    ``available`` and ``credited`` are the pot's budgets that the grant service returned.
    ``credited`` is None for a job that names no grant, whose hold any grant of its project
    could pay: ``available`` is then the most that one of them has.
    """
    need = f"needs {display_pf_days(amount)} PF-days for this hold"
    if not grant_id:
        return (
            f"{need}; no grant of the project has that much available, the most any has is "
            f"{display_pf_days(available)} PF-days"
        )
    pot = pot_name(grant_id, sub_allocation_id)
    if credited is not None and amount > credited:
        if sub_allocation_id:
            growth = "ask the PI for a sub-allocation that large"
        else:
            growth = "it waits until the program office supplements the grant"
        return (
            f"{need}, more than the whole {display_pf_days(credited)} PF-days {pot} was ever "
            f"credited; {growth}, or resubmit with a shorter wall_time_seconds or fewer "
            "accelerators"
        )
    return f"{need}; {pot} has {display_pf_days(available)} PF-days available"
