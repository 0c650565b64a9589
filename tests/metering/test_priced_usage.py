"""Priced usage for GetIngestStatus: every charge line priced in PostgreSQL by the rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal

import pytest

from services.metering.priced_usage import priced_usage
from services.metering.ratecard import (
    AMOUNT_QUANTUM,
    DEFAULT_EFFECTIVE_FROM,
    DEFAULT_MODELS,
    RateCardHistory,
    UnknownModelError,
    UnknownVersionError,
    charge_units_per_microsecond,
    default_rate_card,
)
from services.runtime.db import Database
from tests.metering.helpers import insert_charge_lines

pytestmark = pytest.mark.timeout(60)

A100 = "A100-SXM4-80GB"
TIE_MODEL = "TIE-1"
# 1/512 TFLOP/s leaves a factor of 2 in the denominator of a microsecond's price, so some
# lines cost exactly half a quantum more than a whole number of quanta.
TIE_MODEL_PEAK = Decimal(1) / 512
HISTORY = RateCardHistory((default_rate_card(),)).with_version(
    (*DEFAULT_MODELS, replace(DEFAULT_MODELS[0], name=TIE_MODEL, peak_dense_tflops=TIE_MODEL_PEAK)),
    DEFAULT_EFFECTIVE_FROM,
)


def expected_price(lines: Sequence[tuple[int, str, Decimal]]) -> Decimal:
    total = Decimal(0)
    for version, model, seconds in lines:
        total += HISTORY.get(version).charge(model, seconds)
    return total


def tie_micros(count: int) -> list[int]:
    """Return the first ``count`` times, in microseconds, whose price is a tie on TIE_MODEL."""
    factor = charge_units_per_microsecond(TIE_MODEL_PEAK)
    found = []
    micros = 0
    while len(found) < count:
        micros += 1
        if (factor * micros).denominator == 2:
            found.append(micros)
    return found


async def test_empty_table_prices_zero(db: Database) -> None:
    async with db.acquire() as conn:
        assert await priced_usage(conn, HISTORY) == 0


async def test_lines_round_one_by_one(db: Database) -> None:
    # 300 A100 seconds cost 0.00108333... PF-days, which each line rounds down by a third
    # of a quantum, so twelve lines cost four quanta less than their summed time would.
    await insert_charge_lines(db, [(1, A100, Decimal(300))] * 12)

    async with db.acquire() as conn:
        priced = await priced_usage(conn, HISTORY)

    assert priced == 12 * HISTORY.get(1).charge(A100, Decimal(300))
    assert HISTORY.get(1).charge(A100, Decimal(3600)) - priced == 4 * AMOUNT_QUANTUM


async def test_ties_round_half_even(db: Database) -> None:
    ties = tie_micros(6)
    lines = [(2, TIE_MODEL, Decimal(micros).scaleb(-6)) for micros in ties]
    await insert_charge_lines(db, lines)
    quotients = [int(charge_units_per_microsecond(TIE_MODEL_PEAK) * micros) for micros in ties]

    async with db.acquire() as conn:
        priced = await priced_usage(conn, HISTORY)

    # Both an even and an odd whole part occur, so both directions of the rounding are tested.
    assert {quotient % 2 for quotient in quotients} == {0, 1}
    assert priced == expected_price(lines)


async def test_distinct_times_match_charge(db: Database) -> None:
    models = [A100, "T4", "H800", "MI300X", "Ascend-910B", "G2"]
    lines = [
        (1 + index % 2, models[index % len(models)], Decimal(7 + index * 1_000_003).scaleb(-6))
        for index in range(400)
    ]
    lines += [(1, A100, Decimal(300))] * 5
    await insert_charge_lines(db, lines)

    async with db.acquire() as conn:
        priced = await priced_usage(conn, HISTORY)

    assert priced == expected_price(lines)


async def test_unknown_version_raises(db: Database) -> None:
    await insert_charge_lines(db, [(1, A100, Decimal(10)), (3, A100, Decimal(10))])

    async with db.acquire() as conn:
        with pytest.raises(UnknownVersionError) as raised:
            await priced_usage(conn, HISTORY)

    assert raised.value.version == 3


async def test_unknown_model_raises(db: Database) -> None:
    await insert_charge_lines(db, [(2, A100, Decimal(10)), (1, TIE_MODEL, Decimal(10))])

    async with db.acquire() as conn:
        with pytest.raises(UnknownModelError) as raised:
            await priced_usage(conn, HISTORY)

    assert raised.value.model == TIE_MODEL
    assert raised.value.version == 1
