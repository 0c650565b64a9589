"""Exact PF-day amounts: parsing and validation.

Every amount is a :class:`~decimal.Decimal` with at most 24 decimal places (the ledger quantum,
1e-24 PF-day) and at most 24 integer digits, which is what a ``NUMERIC(48,24)`` column holds.
"""

from __future__ import annotations

from decimal import Decimal, Inexact, InvalidOperation, localcontext
from typing import Final

from acsp.decimals import SUM_CONTEXT, format_decimal
from services.runtime.errors import InvalidArgument

QUANTUM: Final = Decimal("1e-24")
"""The smallest amount the ledger records, in PF-days."""
LIMIT: Final = Decimal(10) ** 24
"""Amounts must be below this many PF-days to fit NUMERIC(48,24)."""
_FIX: Final = "give a decimal number of PF-days, e.g. '12.5'"
ZERO: Final = Decimal(0)
EXACT: Final = SUM_CONTEXT
"""Arithmetic context for ledger sums: 60 digits hold any sum of NUMERIC(48,24) values that the
ledger forms, and the Inexact trap turns any rounding into an error instead of a lost quantum."""


def parse_amount(field: str, text: str, *, allow_zero: bool = False) -> Decimal:
    """Parse an exact decimal string into a validated amount in PF-days.

    Raises InvalidArgument naming ``field`` when the text is empty, not a decimal number, NaN or
    infinite, negative, zero (unless ``allow_zero``), has more than 24 decimal places or does not
    fit 24 integer digits.
    """
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument(field, "is missing", "give a decimal number of PF-days, e.g. '12.5'")
    not_decimal = InvalidArgument(
        field, f"{text!r} is not a decimal number", "give PF-days such as '12.5'"
    )
    # Decimal() also reads digit group underscores and non-ASCII digits, so '0_5' would be
    # 5 PF-days and not the 0.5 a caller mistyped.
    if not stripped.isascii() or "_" in stripped:
        raise not_decimal
    try:
        value = Decimal(stripped)
    except InvalidOperation:
        raise not_decimal from None
    return validate_amount(field, value, allow_zero=allow_zero)


def validate_amount(field: str, value: Decimal, *, allow_zero: bool = False) -> Decimal:
    """Return ``value`` normalised if it is a valid ledger amount, else raise InvalidArgument."""
    if not value.is_finite():
        raise InvalidArgument(field, f"{value} is not a finite number", _FIX)
    if value.is_signed() and value != ZERO:
        raise InvalidArgument(
            field, f"{format_amount(value)} is negative", "amounts must be positive"
        )
    if value == ZERO and not allow_zero:
        raise InvalidArgument(
            field,
            f"{value} is zero, but PF-day amounts must be above zero",
            "give a positive number of PF-days, e.g. '12.5'",
        )
    if value >= LIMIT:
        raise InvalidArgument(
            field,
            f"{format_amount(value)} is too large",
            "amounts must be below 1000000000000000000000000 PF-days",
        )
    with localcontext(EXACT):
        try:
            exact = value.quantize(QUANTUM)
        except Inexact:
            raise InvalidArgument(
                field,
                f"{format_amount(value)} has more than 24 decimal places",
                "round to the ledger quantum, 0.000000000000000000000001 PF-day",
            ) from None
        # Strip trailing zeros and the sign of "-0", so that equal amounts give equal request
        # digests; format_amount writes them without an exponent.
        return abs(exact).normalize() if exact != ZERO else ZERO


PLAIN_EXPONENT_LIMIT: Final = 64
"""Largest power of ten, up or down, that :func:`format_amount` writes in plain notation."""


def format_amount(value: Decimal) -> str:
    """Format a decimal as :func:`acsp.decimals.format_decimal` does, e.g. ``1.6E+2`` as ``160``.

    Unlike that function, NaN and infinities give their names instead of raising, so an error
    message can quote any rejected value, such as a settings value of ``Infinity``. A value of
    1e65 or more, or below 1e-64, far outside any amount, keeps its exponent, e.g. ``1E+1000000``,
    because plain notation would need a digit per power of ten and, past 1e999999, overflows
    the decimal context (an INTERNAL error instead of INVALID_ARGUMENT) or rounds to zero.
    """
    if not value.is_finite():
        return str(value)
    if not value.is_zero() and abs(value.adjusted()) > PLAIN_EXPONENT_LIMIT:
        return str(value)
    return format_decimal(value)
