"""Metered usage priced again by the charging rule, the figure that GetIngestStatus reports.

Charging prices each charge line (one attempt, charging period, provider, region and model) on
its own with :func:`~services.metering.ratecard.charge`, which rounds half-even to the ledger
quantum, so the charges must add up to the sum of those line prices. PostgreSQL computes that
sum: ``div`` and ``mod`` of integral numerics are exact, so it rounds each line as charging
does, and the reply is one row however many lines the table holds. The service's event loop,
which also serves ingest, thus does no work per line.
"""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from services.metering.ratecard import (
    AMOUNT_QUANTUM,
    EXACT,
    RateCardHistory,
    UnknownModelError,
    charge_units_per_microsecond,
)

# Lines of the same time on one model and card cost the same, so they are grouped first and
# priced once per group. A tie (a remainder of exactly half the denominator) rounds to the
# even quotient, as round() of a Fraction does in charge().
_PRICED_USAGE = """
WITH groups AS (
    SELECT c.rate_card_version, l.accelerator_model,
           l.accelerator_seconds * 1000000 AS micros, count(*) AS lines
    FROM metering.charge_lines l JOIN metering.charges c USING (charge_id)
    GROUP BY 1, 2, 3
),
priced AS (
    SELECT g.rate_card_version, g.accelerator_model, g.lines, f.denominator,
           div(g.micros * f.numerator, f.denominator) AS quotient,
           mod(g.micros * f.numerator, f.denominator) AS remainder
    FROM groups g
    LEFT JOIN unnest($1::int[], $2::text[], $3::numeric[], $4::numeric[])
        AS f(rate_card_version, accelerator_model, numerator, denominator)
        USING (rate_card_version, accelerator_model)
)
SELECT
    coalesce(sum(
        lines * (quotient + CASE
            WHEN 2 * remainder > denominator THEN 1
            WHEN 2 * remainder = denominator THEN mod(quotient, 2)
            ELSE 0
        END)
    ) FILTER (WHERE denominator IS NOT NULL), 0) AS units,
    (array_agg(rate_card_version ORDER BY rate_card_version, accelerator_model)
        FILTER (WHERE denominator IS NULL))[1] AS unknown_version,
    (array_agg(accelerator_model ORDER BY rate_card_version, accelerator_model)
        FILTER (WHERE denominator IS NULL))[1] AS unknown_model
FROM priced
"""


async def priced_usage(conn: asyncpg.Connection, history: RateCardHistory) -> Decimal:
    """Return the sum of every charge line's price by the charging rule, in PF-days.

    Each line is priced with the rate-card version that its charge records. Raises
    :class:`~services.metering.ratecard.UnknownVersionError` or
    :class:`~services.metering.ratecard.UnknownModelError`, as charging does, for a line
    whose version or model ``history`` lacks.
    """
    # NOTE: the query reads every charge line on each call, so its cost grows with the table.
    versions: list[int] = []
    models: list[str] = []
    numerators: list[Decimal] = []
    denominators: list[Decimal] = []
    for card in history.versions:
        for name, model in card.models.items():
            factor = charge_units_per_microsecond(model.peak_dense_tflops)
            versions.append(card.version)
            models.append(name)
            numerators.append(Decimal(factor.numerator))
            denominators.append(Decimal(factor.denominator))
    row = await conn.fetchrow(_PRICED_USAGE, versions, models, numerators, denominators)
    assert row is not None
    if row["unknown_version"] is not None:
        card = history.get(row["unknown_version"])
        raise UnknownModelError(row["unknown_model"], card.version)
    return EXACT.multiply(Decimal(row["units"]), AMOUNT_QUANTUM)
