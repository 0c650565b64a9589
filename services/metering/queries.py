"""Usage queries: metered and charged usage grouped by grant, project, institution, provider,
region or model over a time range, one page at a time (keyset pages ordered by the group key).

A sample counts in the range when its charging period starts in it. Charges and refunds that
the ledger rejected for good (state ``failed``) moved no budget, so they are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Final

import asyncpg

from services.metering.samples import micros_to_seconds

HOURS_QUANTUM: Final = Decimal("1e-12")
UNATTRIBUTED: Final = "(unattributed)"
"""Institution key of attempts stored with no institution, which older schedulers recorded.

Grant service ids start with a letter or digit, so this key cannot name an institution.
"""


def hours(micros: int) -> Decimal:
    """Return accelerator-microseconds as hours rounded to 1e-12 h (a report figure)."""
    return (micros_to_seconds(micros) / 3600).quantize(HOURS_QUANTUM)


class Grouping(StrEnum):
    GRANT = "grant"
    PROJECT = "project"
    INSTITUTION = "institution"
    PROVIDER = "provider"
    REGION = "region"
    MODEL = "model"


# The SQL expression of each grouping's key, over usage_periods u (or lines l) joined to jobs j.
_KEY: Final = {
    Grouping.GRANT: "j.grant_id",
    Grouping.PROJECT: "j.project_id",
    Grouping.INSTITUTION: f"coalesce(nullif(j.institution_id, ''), '{UNATTRIBUTED}')",
    Grouping.PROVIDER: "{t}.provider",
    Grouping.REGION: "{t}.provider || '/' || {t}.region",
    Grouping.MODEL: "{t}.accelerator_model",
}


@dataclass(frozen=True, slots=True)
class UsageFilter:
    grant_id: str = ""
    project_id: str = ""
    institution_id: str = ""
    provider: str = ""


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str
    accelerator_hours: Decimal
    charged_pf_days: Decimal
    refunded_pf_days: Decimal
    mean_utilization: float
    sample_count: int


# The institution filter compares the grouping key, so the key UNATTRIBUTED selects the rows
# that a by-institution query listed under it.
_FILTER = f"""
  AND ($3 = '' OR j.grant_id = $3) AND ($4 = '' OR j.project_id = $4)
  AND ($5 = '' OR {_KEY[Grouping.INSTITUTION]} = $5) AND ($6 = '' OR {{t}}.provider = $6)
"""


async def query_usage(
    conn: asyncpg.Connection,
    grouping: Grouping,
    start: datetime,
    end: datetime,
    filters: UsageFilter,
    *,
    after: str,
    limit: int,
) -> list[UsageRow]:
    """Return up to ``limit`` groups with keys after ``after``, ordered by key."""
    usage_key = _KEY[grouping].format(t="u")
    line_key = _KEY[grouping].format(t="l")
    common = (start, end, filters.grant_id, filters.project_id, filters.institution_id)

    usage = await conn.fetch(
        f"""
        SELECT {usage_key} AS key, sum(u.accelerator_micros) AS micros,
               sum(u.sample_count) AS samples, sum(u.utilization_seconds) AS used,
               sum(u.utilization_weight) AS weight
        FROM metering.usage_periods u
        JOIN metering.jobs j ON j.job_id = u.job_id AND j.attempt = u.attempt
        WHERE u.period_start >= $1 AND u.period_start < $2 {_FILTER.format(t="u")}
          AND (j.providers IS NULL OR u.provider = ANY(j.providers))
          AND {usage_key} > $7
        GROUP BY 1 ORDER BY 1 LIMIT $8
        """,
        *common,
        filters.provider,
        after,
        limit,
    )
    if not usage:
        return []
    keys = [row["key"] for row in usage]

    charged = await conn.fetch(
        f"""
        SELECT {line_key} AS key, sum(l.amount) AS amount
        FROM metering.charge_lines l
        JOIN metering.charges c ON c.charge_id = l.charge_id
        JOIN metering.jobs j ON j.job_id = c.job_id AND j.attempt = c.attempt
        WHERE l.period_start >= $1 AND l.period_start < $2 {_FILTER.format(t="l")}
          AND c.state <> 'failed'
          AND {line_key} = any($7::text[])
        GROUP BY 1
        """,
        *common,
        filters.provider,
        keys,
    )

    refunded = await conn.fetch(
        f"""
        SELECT {line_key} AS key, sum(l.amount) AS amount
        FROM metering.refund_lines l
        JOIN metering.refunds r ON r.job_id = l.job_id AND r.attempt = l.attempt
        JOIN metering.jobs j ON j.job_id = l.job_id AND j.attempt = l.attempt
        WHERE l.refund_time >= $1 AND l.refund_time < $2 {_FILTER.format(t="l")}
          AND r.state <> 'failed'
          AND {line_key} = any($7::text[])
        GROUP BY 1
        """,
        *common,
        filters.provider,
        keys,
    )
    charged_by_key = {row["key"]: row["amount"] for row in charged}
    refunded_by_key = {row["key"]: row["amount"] for row in refunded}
    zero = Decimal(0)
    return [
        UsageRow(
            key=row["key"],
            accelerator_hours=hours(row["micros"]),
            charged_pf_days=charged_by_key.get(row["key"], zero),
            refunded_pf_days=refunded_by_key.get(row["key"], zero),
            mean_utilization=row["used"] / row["weight"] if row["weight"] else 0.0,
            sample_count=int(row["samples"]),
        )
        for row in usage
    ]
