"""Exact decimals on the wire: ``acsp.v1.Decimal`` to and from :class:`decimal.Decimal`.

Metering and the scheduler write amounts, rates and hours with :func:`to_proto`, and the grant
service's ``format_amount`` writes the same notation, so exports and listings read alike. The
text is plain positional notation: no exponent, no trailing zeros after the decimal point and
no point when nothing follows it, a leading ``-`` for negative values and ``0`` for every
zero. Python's ``str(Decimal)`` would write ``0E-12`` and ``1.0560738425916890E-8`` instead.
The digits that remain are exactly the value's digits, so
``Decimal(format_decimal(x)) == x`` for every finite ``x``.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Final

from acsp.v1 import common_pb2


def format_decimal(value: Decimal) -> str:
    """Write a finite decimal in plain positional notation, e.g. ``1E-8`` as ``0.00000001``.

    ``Decimal("1.6E+2")`` gives ``160``, ``Decimal("12.50")`` gives ``12.5`` and ``0E-12``
    and ``-0`` give ``0``. Raises ValueError for NaN and infinities, which no amount may be.
    """
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite decimal")
    if value.is_zero():
        return "0"
    # normalize() strips trailing zeros but may round to the context's precision, so it
    # runs in a context wide enough for every digit of the value.
    digits = len(value.as_tuple().digits)
    normalized = value.normalize(Context(prec=max(digits, 28)))
    return format(normalized, "f")


SUM_CONTEXT: Final = Context(prec=60, traps=[Inexact, InvalidOperation, Overflow])
"""Context of :func:`exact_sum`. Ledger amounts have at most 24 places and 24 integer digits,
so 60 digits hold their sums, and the Inexact trap turns any rounding into an error."""


def exact_sum(amounts: Iterable[Decimal]) -> Decimal:
    """Add amounts without rounding, raising ``decimal.Inexact`` if the sum needs over 60 digits.

    The built-in ``sum()`` adds in the default context of 28 digits, so it rounds a sum of
    10,000 PF-days or more at the ledger's 24 places.
    """
    total = Decimal(0)
    for amount in amounts:
        total = SUM_CONTEXT.add(total, amount)
    return total


DISPLAY_PLACES: Final = 6
"""Decimal places of a displayed amount of at least :data:`SMALL_AMOUNT`."""
SMALL_AMOUNT: Final = Decimal("1e-6")
"""Below this, an amount shows :data:`SMALL_DIGITS` significant digits instead, so a nonzero
amount never shows as 0."""
SMALL_DIGITS: Final = 3


def display_decimal(value: Decimal) -> str:
    """Round ``value`` for a message to people, in plain notation: ``1.25``, ``0.000000123``.

    Ledger amounts carry up to 24 decimal places, which no reader needs in an error or a
    pending reason. Machines read the exact value from the response or the error details.
    NaN and infinities give their names.
    """
    if not value.is_finite():
        return str(value)
    if value.is_zero():
        return "0"
    if abs(value) >= SMALL_AMOUNT:
        step = Decimal(1).scaleb(-DISPLAY_PLACES)
    else:
        step = Decimal(1).scaleb(value.adjusted() - SMALL_DIGITS + 1)
    # The context is wide enough for every digit left of the point, so quantize never raises.
    context = Context(prec=max(value.adjusted(), 0) + DISPLAY_PLACES + 2)
    return format_decimal(value.quantize(step, rounding=ROUND_HALF_EVEN, context=context))


def to_proto(value: Decimal) -> common_pb2.Decimal:
    """Convert a finite decimal to ``acsp.v1.Decimal`` in the notation of :func:`format_decimal`."""
    return common_pb2.Decimal(value=format_decimal(value))


def from_proto(message: common_pb2.Decimal) -> Decimal:
    """Parse ``acsp.v1.Decimal``; raises ValueError naming the text if it is not a finite number."""
    try:
        value = Decimal(message.value)
    except InvalidOperation:
        raise ValueError(f"{message.value!r} is not a decimal number") from None
    if not value.is_finite():
        raise ValueError(f"{message.value!r} is not a finite number")
    return value
