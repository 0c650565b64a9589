"""Provider settlements: what a provider delivered in a period, against its pledge, net of refunds.

Delivered PF-days are the charges' lines for the provider's usage whose charging period starts
in the settlement period; refunds are the refund lines for the provider's faults and recalls in
it. Pledged and recalled accelerator-hours come from the pledge and recall records clipped to
the period and to the time the settlement is built, so they never count the future. They also
start no earlier than the pledge's creation, because a window may start before the pledge was
made, when nothing measured the capacity. Recalled hours also stop when the recall's pledge
ends.

The pledge is kept when no recall took more than its pledge's recallable capacity, and every
pledge in effect in the period (from its creation on) had at least its protected count of
healthy accelerators (on up nodes, not failed) whenever metering counted them. Metering counts
them from the scheduler's pledge listing once a sync interval (PledgeSync, a minute by default),
so a shortfall shorter than that may be missed, and a pledge never counted in the period
(metering or the scheduler down, or a standby scheduler listing) is reported as uncounted
instead of broken. Metering does not know whether the healthy accelerators were reachable by
jobs (drained nodes count as healthy) or what the provider promised beyond the pledge records.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

import asyncpg

from acsp.decimals import SUM_CONTEXT, exact_sum, format_decimal

_HOURS = Decimal(3600)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class SettlementLine:
    region: str
    accelerator_model: str
    accelerator_hours: Decimal
    pf_days: Decimal
    refunded_pf_days: Decimal
    pledged_accelerator_hours: Decimal
    recalled_accelerator_hours: Decimal

    @property
    def net_pf_days(self) -> Decimal:
        """PF-days delivered less those refunded, without rounding."""
        return SUM_CONTEXT.subtract(self.pf_days, self.refunded_pf_days)


PledgeCopySource = Literal["fresh", "stored"]
"""The origin of a settlement's pledges and recalls: "fresh" for a copy that metering made from
the scheduler for the settlement, "stored" for the copy it had stored before."""


@dataclass(frozen=True, slots=True)
class Settlement:
    provider: str
    period_start: datetime
    period_end: datetime
    lines: tuple[SettlementLine, ...]
    delivered_pf_days: Decimal
    refunded_pf_days: Decimal
    net_pf_days: Decimal
    pledge_kept: bool
    recall_count: int
    short_pledges: tuple[str, ...] = ()
    """Pledges whose healthy accelerators fell below their protected count in the period."""
    uncounted_pledges: tuple[str, ...] = ()
    """Pledges in effect in the period whose accelerators metering never counted in it."""
    pledges_copied_at: datetime | None = None
    """When metering last copied the provider's pledges from the scheduler; None if never."""
    pledges_copy_source: PledgeCopySource = "stored"
    """Source of the copy at ``pledges_copied_at``: "fresh" for one made for this settlement.
    Only the service, which makes that copy before it builds the settlement, sets "fresh"."""


# The pledges and recalls are metering's copy. The service copies the provider's pledges again
# before it calls this, and uses an older copy only when it was made after the period ended
# (see :mod:`services.metering.settlement_copy`), which ``pledges_copied_at`` shows.
async def build_settlement(
    conn: asyncpg.Connection,
    provider: str,
    start: datetime,
    end: datetime,
    now: datetime | None = None,
) -> Settlement:
    """Build one provider's settlement for the half-open period [start, end).

    Pledge and recall hours stop at ``now`` (default: the current time).
    """
    # Pledges, recalls and healthy accelerators count only up to now, and a period that starts
    # in the future counts none of them.
    until = max(start, min(end, now or datetime.now(UTC)))
    delivered = await conn.fetch(
        """
        SELECT region, accelerator_model, sum(accelerator_seconds) AS seconds,
               sum(amount) AS amount
        FROM metering.charge_lines
        WHERE provider = $1 AND period_start >= $2 AND period_start < $3
        GROUP BY region, accelerator_model
        """,
        provider,
        start,
        end,
    )
    refunded = await conn.fetch(
        """
        SELECT rl.region, rl.accelerator_model, sum(rl.amount) AS amount
        FROM metering.refund_lines rl
        JOIN metering.refunds r USING (job_id, attempt)
        WHERE rl.provider = $1 AND rl.refund_time >= $2 AND rl.refund_time < $3
          AND r.state <> 'failed'
        GROUP BY rl.region, rl.accelerator_model
        """,
        provider,
        start,
        end,
    )
    pledged = await conn.fetch(
        """
        SELECT region, accelerator_model,
               sum((protected_count + recallable_count) * extract(epoch FROM
                   least(window_end, $3) - greatest(window_start, created_at, $2))) AS seconds
        FROM metering.pledges
        WHERE provider = $1 AND greatest(window_start, created_at) < least(window_end, $3)
          AND window_end > $2 AND $3 > $2
        GROUP BY region, accelerator_model
        """,
        provider,
        start,
        until,
    )
    # A recall counts only within its pledge's window, because recalls copied before the
    # scheduler ended them with their pledge may end later or never, and only from the
    # pledge's creation, like the pledge's own hours.
    recalls = await conn.fetch(
        """
        SELECT p.region, p.accelerator_model, r.accelerator_count, p.recallable_count,
               extract(epoch FROM least(r.end_time, p.window_end, $3)
                   - greatest(r.start_time, p.created_at, $2)) AS seconds
        FROM metering.recalls r JOIN metering.pledges p USING (pledge_id)
        WHERE p.provider = $1
          AND greatest(r.start_time, p.created_at) < least(r.end_time, p.window_end, $3)
          AND r.end_time > $2 AND p.window_end > $2 AND $3 > $2
        """,
        provider,
        start,
        until,
    )
    capacity = await conn.fetch(
        """
        WITH spans AS (
            SELECT c.pledge_id, c.healthy_count, c.observed_at AS since,
                   lead(c.observed_at) OVER (PARTITION BY c.pledge_id ORDER BY c.observed_at)
                       AS until
            FROM metering.pledge_capacity c JOIN metering.pledges p USING (pledge_id)
            WHERE p.provider = $1 AND c.observed_at < $3
        )
        SELECT p.pledge_id, p.protected_count, min(s.healthy_count) AS min_healthy
        FROM metering.pledges p
        LEFT JOIN spans s ON s.pledge_id = p.pledge_id
            AND (s.until IS NULL OR s.until > greatest($2, p.window_start, p.created_at))
        WHERE p.provider = $1
          AND greatest(p.window_start, p.created_at) < least(p.window_end, $3)
          AND p.window_end > $2 AND $3 > $2
        GROUP BY p.pledge_id, p.protected_count
        ORDER BY p.pledge_id
        """,
        provider,
        start,
        until,
    )
    copied_at = await conn.fetchval(
        "SELECT max(copied_at) FROM metering.pledge_copies WHERE provider IN ('', $1)",
        provider,
    )
    settlement = assemble(provider, start, end, delivered, refunded, pledged, recalls, capacity)
    return replace(settlement, pledges_copied_at=copied_at)


async def has_provider_records(conn: asyncpg.Connection, provider: str) -> bool:
    """Return whether metering stores a node, pledge, charge line or refund line of ``provider``."""
    known = await conn.fetchval(
        """
        SELECT EXISTS (SELECT 1 FROM metering.nodes WHERE provider = $1)
            OR EXISTS (SELECT 1 FROM metering.pledges WHERE provider = $1)
            OR EXISTS (SELECT 1 FROM metering.charge_lines WHERE provider = $1)
            OR EXISTS (SELECT 1 FROM metering.refund_lines WHERE provider = $1)
        """,
        provider,
    )
    return bool(known)


def assemble(
    provider: str,
    start: datetime,
    end: datetime,
    delivered: list[asyncpg.Record],
    refunded: list[asyncpg.Record],
    pledged: list[asyncpg.Record],
    recalls: list[asyncpg.Record],
    capacity: list[asyncpg.Record],
) -> Settlement:
    keys: set[tuple[str, str]] = set()
    seconds: dict[tuple[str, str], Decimal] = {}
    amounts: dict[tuple[str, str], Decimal] = {}
    refunds: dict[tuple[str, str], Decimal] = {}
    pledge_seconds: dict[tuple[str, str], Decimal] = {}
    recall_seconds: dict[tuple[str, str], Decimal] = {}
    for row in delivered:
        key = (row["region"], row["accelerator_model"])
        keys.add(key)
        seconds[key] = row["seconds"]
        amounts[key] = row["amount"]
    for row in refunded:
        key = (row["region"], row["accelerator_model"])
        keys.add(key)
        refunds[key] = row["amount"]
    for row in pledged:
        key = (row["region"], row["accelerator_model"])
        keys.add(key)
        pledge_seconds[key] = Decimal(row["seconds"])
    kept = True
    for row in recalls:
        key = (row["region"], row["accelerator_model"])
        keys.add(key)
        taken = Decimal(row["accelerator_count"]) * Decimal(row["seconds"])
        recall_seconds[key] = recall_seconds.get(key, Decimal(0)) + taken
        kept = kept and row["accelerator_count"] <= row["recallable_count"]
    short = tuple(
        row["pledge_id"]
        for row in capacity
        if row["min_healthy"] is not None and row["min_healthy"] < row["protected_count"]
    )
    uncounted = tuple(row["pledge_id"] for row in capacity if row["min_healthy"] is None)
    zero = Decimal(0)
    lines = tuple(
        SettlementLine(
            region=key[0],
            accelerator_model=key[1],
            accelerator_hours=_hours(seconds.get(key, zero)),
            pf_days=amounts.get(key, zero),
            refunded_pf_days=refunds.get(key, zero),
            pledged_accelerator_hours=_hours(pledge_seconds.get(key, zero)),
            recalled_accelerator_hours=_hours(recall_seconds.get(key, zero)),
        )
        for key in sorted(keys)
    )
    delivered_total = exact_sum(line.pf_days for line in lines)
    refunded_total = exact_sum(line.refunded_pf_days for line in lines)
    return Settlement(
        provider=provider,
        period_start=start,
        period_end=end,
        lines=lines,
        delivered_pf_days=delivered_total,
        refunded_pf_days=refunded_total,
        net_pf_days=SUM_CONTEXT.subtract(delivered_total, refunded_total),
        pledge_kept=kept and not short,
        recall_count=len(recalls),
        short_pledges=short,
        uncounted_pledges=uncounted,
    )


def _hours(seconds: Decimal) -> Decimal:
    """Convert to hours, rounded to 1e-12 h; hours are a report figure, not money."""
    return (seconds / _HOURS).quantize(Decimal("1e-12"))


CSV_HEADER = (
    "provider",
    "period_start",
    "period_end",
    "region",
    "accelerator_model",
    "accelerator_hours",
    "pf_days",
    "refunded_pf_days",
    "net_pf_days",
    "pledged_accelerator_hours",
    "recalled_accelerator_hours",
    "pledges_copied_at",
    "pledges_copy_source",
)


def settlement_csv(settlement: Settlement) -> str:
    """Render a settlement as CSV: one row per region and model, then a TOTAL row.

    Numbers are written in the positional notation of :func:`acsp.decimals.format_decimal`.
    Every row ends with the time and source of the pledge copy, which the whole settlement
    shares, and the time is empty when the pledges were never copied.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    start = settlement.period_start.isoformat()
    end = settlement.period_end.isoformat()
    copied_at = settlement.pledges_copied_at
    pledge_copy = (
        copied_at.isoformat() if copied_at is not None else "",
        settlement.pledges_copy_source,
    )
    for line in settlement.lines:
        writer.writerow(
            (
                settlement.provider,
                start,
                end,
                line.region,
                line.accelerator_model,
                format_decimal(line.accelerator_hours),
                format_decimal(line.pf_days),
                format_decimal(line.refunded_pf_days),
                format_decimal(line.net_pf_days),
                format_decimal(line.pledged_accelerator_hours),
                format_decimal(line.recalled_accelerator_hours),
                *pledge_copy,
            )
        )
    writer.writerow(
        (
            settlement.provider,
            start,
            end,
            "TOTAL",
            "",
            format_decimal(sum((line.accelerator_hours for line in settlement.lines), ZERO)),
            format_decimal(settlement.delivered_pf_days),
            format_decimal(settlement.refunded_pf_days),
            format_decimal(settlement.net_pf_days),
            format_decimal(
                sum((line.pledged_accelerator_hours for line in settlement.lines), ZERO)
            ),
            format_decimal(
                sum((line.recalled_accelerator_hours for line in settlement.lines), ZERO)
            ),
            *pledge_copy,
        )
    )
    return out.getvalue()
