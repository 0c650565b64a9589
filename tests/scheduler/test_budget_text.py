"""Display rounding of PF-day amounts in pending reasons."""

from __future__ import annotations

from decimal import Decimal

import pytest

from scheduler.service.budget_text import display_pf_days


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0", "0"),
        ("8", "8"),
        ("1.250000000000000000000001", "1.25"),
        ("1234567.1234567", "1234567.123457"),
        ("0.000001", "0.000001"),
        ("0.000000001234567", "0.00000000123"),
        ("1e-24", "0.000000000000000000000001"),
    ],
)
def test_display_pf_days_rounds(amount: str, shown: str) -> None:
    assert display_pf_days(Decimal(amount)) == shown
