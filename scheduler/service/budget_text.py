"""PF-day amounts as pending reasons show them, and the reason of a hold the budget cannot pay.

The ledger keeps amounts exact at 1e-24 PF-day, which is 24 decimal places. A person reading a
job's pending reason needs a few of them, so these messages round for display only. The exact
amounts stay in the job's ``hold_amount`` and in the grant service's balances.
"""

from __future__ import annotations

from decimal import Decimal

from acsp.decimals import display_decimal as display_pf_days

__all__ = ["display_pf_days", "no_budget_message", "pot_name"]


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
    *,
    supplemented: bool = False,
) -> str:
    """Explain a hold of ``amount`` PF-days that its grant or sub-allocation could not pay.

    ``available`` and ``credited`` are the pot's budgets that the grant service returned.
    ``credited`` is None for a job that names no grant, whose hold any grant of its project
    could pay: ``available`` is then the most that one of them has. ``supplemented`` states
    that the grant has had its one supplement, so its credited total never grows.
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
        elif supplemented:
            growth = (
                "the grant has had its one supplement, so the job can start only on a cheaper "
                "model that it accepts"
            )
        else:
            growth = "it waits until the program office supplements the grant"
        return (
            f"{need}, more than the whole {display_pf_days(credited)} PF-days {pot} was ever "
            f"credited; {growth}, or resubmit with a shorter wall_time_seconds or fewer "
            "accelerators"
        )
    return f"{need}; {pot} has {display_pf_days(available)} PF-days available"
