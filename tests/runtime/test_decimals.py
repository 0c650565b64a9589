"""The shared conversion of exact decimals to and from ``acsp.v1.Decimal``."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal, Inexact, localcontext

import pytest

from acsp.decimals import display_decimal, exact_sum, format_decimal, from_proto, to_proto
from acsp.v1 import common_pb2
from services.metering.settlement import Settlement, SettlementLine, settlement_csv

CASES = [
    ("0", "0"),
    ("0E-12", "0"),
    ("-0", "0"),
    ("0.000", "0"),
    ("1", "1"),
    ("1.000", "1"),
    ("12.50", "12.5"),
    ("1.6E+2", "160"),
    ("1E+30", "1000000000000000000000000000000"),
    ("-2.50", "-2.5"),
    ("1E-24", "0.000000000000000000000001"),
    ("1.0560738425916890E-8", "0.00000001056073842591689"),
    ("0.012999999999999600", "0.0129999999999996"),
    ("123456789012345678901234.123456789012345678901234", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_format_decimal_plain_notation(text: str, expected: str | None) -> None:
    written = format_decimal(Decimal(text))
    assert "E" not in written
    assert written == (expected or text)


@pytest.mark.parametrize(("text", "_"), CASES)
def test_round_trip_is_exact(text: str, _: str | None) -> None:
    value = Decimal(text)
    back = from_proto(to_proto(value))
    assert back == value
    assert format_decimal(back) == format_decimal(value)


def test_format_ignores_narrow_context() -> None:
    with localcontext() as context:
        context.prec = 5
        assert format_decimal(Decimal("1234567.891000")) == "1234567.891"


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a finite"):
        to_proto(Decimal(text))
    with pytest.raises(ValueError, match="not a finite"):
        from_proto(common_pb2.Decimal(value=text))


def test_from_proto_names_bad_text() -> None:
    with pytest.raises(ValueError, match="'12,5' is not a decimal number"):
        from_proto(common_pb2.Decimal(value="12,5"))


def test_settlement_csv_has_no_exponents() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    line = SettlementLine(
        region="r1",
        accelerator_model="A100-SXM4-80GB",
        accelerator_hours=Decimal("0E-12"),
        pf_days=Decimal("1.0560738425916890E-8"),
        refunded_pf_days=Decimal("0"),
        pledged_accelerator_hours=Decimal("1.6E+3"),
        recalled_accelerator_hours=Decimal("0E-12"),
    )
    settlement = Settlement(
        provider="p",
        period_start=start,
        period_end=start + timedelta(days=1),
        lines=(line,),
        delivered_pf_days=line.pf_days,
        refunded_pf_days=Decimal(0),
        net_pf_days=line.pf_days,
        pledge_kept=True,
        recall_count=0,
    )
    rows = list(csv.reader(io.StringIO(settlement_csv(settlement))))
    assert rows[1][5:11] == [
        "0",
        "0.00000001056073842591689",
        "0",
        "0.00000001056073842591689",
        "1600",
        "0",
    ]
    assert rows[2][5:11] == [
        "0",
        "0.00000001056073842591689",
        "0",
        "0.00000001056073842591689",
        "1600",
        "0",
    ]


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("2.99996349399938425925926", "2.999963"),
        ("97.00003650600061574074074", "97.000037"),
        ("-0.5000004", "-0.5"),
        ("0.0000001234567", "0.000000123"),
        ("999999999999999999999999.999999999999999999999999", "1000000000000000000000000"),
        ("Infinity", "Infinity"),
    ],
)
def test_display_decimal_rounds(amount: str, shown: str) -> None:
    assert display_decimal(Decimal(amount)) == shown


def test_exact_sum_keeps_every_place() -> None:
    amounts = [Decimal("12345.000000000000000000000001"), Decimal("0.000000000000000000000001")]

    assert exact_sum(amounts) == Decimal("12345.000000000000000000000002")
    assert sum(amounts, Decimal(0)) != Decimal("12345.000000000000000000000002")
    assert exact_sum([]) == 0


def test_exact_sum_raises_instead_of_rounding() -> None:
    with pytest.raises(Inexact):
        exact_sum([Decimal("1e40"), Decimal("1e-24")])
