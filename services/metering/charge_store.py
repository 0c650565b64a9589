"""Recording charges in PostgreSQL and committing them to the ledger (an outbox).

A charge is first recorded with the state ``pending``, in the same transaction that marks its
usage as charged. Then it is sent to the ledger in batches and marked ``committed``. A crash
between the two leaves it pending, and the retry sends the same idempotency key, which the
ledger applies at most once. Rows are claimed with ``FOR UPDATE SKIP LOCKED``, so replicas
share the work without charging anything twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.metering.charging import (
    AttemptTerms,
    PeriodKey,
    PlannedCharge,
    UsageDelta,
    plan_charges,
)
from services.metering.ingest_store import INSERT_DEAD_LETTER
from services.metering.ledger import Ledger, LedgerCharge, LedgerRejected, LedgerUnavailable
from services.metering.ratecard import RateCardHistory, RatePolicy
from services.metering.samples import micros_to_seconds

logger = logging.getLogger(__name__)

_DUE_USAGE = """
SELECT up.job_id, up.attempt, up.period_start, up.provider, up.region, up.accelerator_model,
       up.accelerator_micros - up.charged_micros AS delta_micros,
       j.hold_id, j.rate_policy, j.award_rate_card_version,
       (j.ended_at IS NOT NULL AND j.ended_at <= $2) AS final,
       (j.providers IS NOT NULL AND up.provider <> ALL(j.providers)) AS unplaced
FROM metering.usage_periods up
JOIN metering.jobs j ON j.job_id = up.job_id AND j.attempt = up.attempt
WHERE up.accelerator_micros > up.charged_micros
  AND j.hold_id <> ''
  AND (up.period_start <= $1 OR (j.ended_at IS NOT NULL AND j.ended_at <= $2))
ORDER BY up.job_id, up.attempt, up.period_start, up.provider, up.region, up.accelerator_model
LIMIT $3
FOR UPDATE OF up SKIP LOCKED
"""

_NEXT_SEQ = """
SELECT c.job_id, c.attempt, c.period_start, max(c.seq) + 1 AS next_seq
FROM metering.charges c
JOIN unnest($1::text[], $2::int[], $3::timestamptz[]) AS k(job_id, attempt, period_start)
  ON c.job_id = k.job_id AND c.attempt = k.attempt AND c.period_start = k.period_start
GROUP BY c.job_id, c.attempt, c.period_start
"""

_INSERT_CHARGES = """
INSERT INTO metering.charges
    (request_id, job_id, attempt, period_start, seq, hold_id, accelerator_seconds, amount,
     rate_card_version, final)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::timestamptz[], $5::int[],
                     $6::text[], $7::numeric[], $8::numeric[], $9::int[], $10::bool[])
RETURNING charge_id, request_id
"""

_MARK_CHARGED = """
UPDATE metering.usage_periods up
SET charged_micros = up.charged_micros + d.delta
FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
            $7::bigint[]) AS d(job_id, attempt, period_start, provider, region, model, delta)
WHERE up.job_id = d.job_id AND up.attempt = d.attempt AND up.period_start = d.period_start
  AND up.provider = d.provider AND up.region = d.region AND up.accelerator_model = d.model
"""

_CLAIM_PENDING = """
SELECT charge_id, request_id, hold_id, amount, rate_card_version, attempts
FROM metering.charges
WHERE state = 'pending'
ORDER BY charge_id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""


async def record_due_charges(
    conn: asyncpg.Connection,
    history: RateCardHistory,
    *,
    now: datetime,
    period_seconds: int,
    lateness_s: float,
    limit: int = 5000,
) -> list[PlannedCharge]:
    """Turn uncharged usage of closed periods and ended attempts into pending charges.

    A period is closed once ``lateness_s`` has passed after its end; an ended attempt's usage
    is charged ``lateness_s`` after it ended, whatever its period, which is its final charge.
    """
    latest_closed_start = now - timedelta(seconds=lateness_s + period_seconds)
    ended_before = now - timedelta(seconds=lateness_s)
    async with conn.transaction():
        due = await conn.fetch(_DUE_USAGE, latest_closed_start, ended_before, limit)
        unplaced = [r for r in due if r["unplaced"]]
        if unplaced:
            await _reject_unplaced(conn, unplaced)
        rows = [r for r in due if not r["unplaced"]]
        if not rows:
            return []
        deltas = [
            UsageDelta(
                r["job_id"],
                r["attempt"],
                r["period_start"],
                r["provider"],
                r["region"],
                r["accelerator_model"],
                micros_to_seconds(r["delta_micros"]),
            )
            for r in rows
        ]
        terms = {
            (r["job_id"], r["attempt"]): AttemptTerms(
                r["hold_id"], RatePolicy(r["rate_policy"]), r["award_rate_card_version"]
            )
            for r in rows
        }
        final = frozenset((r["job_id"], r["attempt"]) for r in rows if r["final"])
        next_seq = await _next_sequences(conn, deltas)
        planned = plan_charges(deltas, terms, next_seq, history, final)
        ids = await _insert_charges(conn, planned)
        await _insert_lines(conn, planned, ids)
        await _mark_charged(conn, rows)
    return planned


async def _mark_charged(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Add each due row's uncharged micros to its period's charged micros."""
    await conn.execute(
        _MARK_CHARGED,
        [r["job_id"] for r in rows],
        [r["attempt"] for r in rows],
        [r["period_start"] for r in rows],
        [r["provider"] for r in rows],
        [r["region"] for r in rows],
        [r["accelerator_model"] for r in rows],
        [r["delta_micros"] for r in rows],
    )


async def _reject_unplaced(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Mark usage from providers that run no task of its attempt as done, charging nothing.

    Each rejection is logged and kept as a dead letter for an operator. It names the amount, so a
    later sample of the same period adds another.
    """
    letters = []
    for r in rows:
        reason = (
            f"provider {r['provider']} reported {micros_to_seconds(r['delta_micros'])} "
            f"accelerator-seconds for job {r['job_id']} attempt {r['attempt']}, which runs on "
            "none of its nodes; the usage is not charged"
        )
        logger.warning(
            "rejecting usage from a provider that does not run the attempt: %s",
            reason,
            extra={"job_id": r["job_id"], "attempt": r["attempt"], "provider": r["provider"]},
        )
        key = (
            f"unplaced:{r['job_id']}/{r['attempt']}/{r['period_start'].isoformat()}/"
            f"{r['provider']}/{r['region']}/{r['accelerator_model']}/{r['delta_micros']}"
        )
        letters.append((key, "", 0, None, reason, None))
    await conn.executemany(INSERT_DEAD_LETTER, letters)
    await _mark_charged(conn, rows)


async def _next_sequences(
    conn: asyncpg.Connection, deltas: Sequence[UsageDelta]
) -> dict[PeriodKey, int]:
    keys = sorted({(d.job_id, d.attempt, d.period_start) for d in deltas})
    rows = await conn.fetch(
        _NEXT_SEQ, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )
    return {(r["job_id"], r["attempt"], r["period_start"]): r["next_seq"] for r in rows}


async def _insert_charges(
    conn: asyncpg.Connection, planned: Sequence[PlannedCharge]
) -> dict[str, int]:
    rows = await conn.fetch(
        _INSERT_CHARGES,
        [p.request_id for p in planned],
        [p.job_id for p in planned],
        [p.attempt for p in planned],
        [p.period_start for p in planned],
        [p.seq for p in planned],
        [p.hold_id for p in planned],
        [p.seconds for p in planned],
        [p.amount for p in planned],
        [p.rate_card_version for p in planned],
        [p.final for p in planned],
    )
    return {r["request_id"]: r["charge_id"] for r in rows}


async def _insert_lines(
    conn: asyncpg.Connection, planned: Sequence[PlannedCharge], ids: dict[str, int]
) -> None:
    records = [
        (
            ids[p.request_id],
            line.provider,
            line.region,
            line.accelerator_model,
            line.seconds,
            line.amount,
            p.period_start,
        )
        for p in planned
        for line in p.lines
    ]
    await conn.copy_records_to_table(
        "charge_lines",
        schema_name="metering",
        records=records,
        columns=(
            "charge_id",
            "provider",
            "region",
            "accelerator_model",
            "accelerator_seconds",
            "amount",
            "period_start",
        ),
    )


@dataclass(frozen=True, slots=True)
class PostResult:
    committed: int
    failed: int
    retry_later: int


async def post_pending_charges(
    conn: asyncpg.Connection,
    ledger: Ledger,
    *,
    batch: int,
    timeout_s: float,
    max_attempts: int,
    now: datetime,
) -> PostResult:
    """Send one batch of pending charges to the ledger and record the outcome."""
    async with conn.transaction():
        rows = await conn.fetch(_CLAIM_PENDING, batch)
        if not rows:
            return PostResult(0, 0, 0)
        charges = [
            LedgerCharge(
                r["request_id"],
                r["hold_id"],
                r["amount"],
                r["rate_card_version"],
                f"metering-charge:{r['charge_id']}",
            )
            for r in rows
        ]
        attempts = {r["request_id"]: r["attempts"] for r in rows}
        try:
            outcomes = await ledger.commit_charges(charges, timeout_s)
        except LedgerUnavailable as error:
            logger.warning("ledger unavailable for %d charges: %s", len(charges), error)
            await _record_error(conn, [c.request_id for c in charges], str(error), None)
            return PostResult(0, 0, len(charges))
        except LedgerRejected as error:
            # One bad charge rejects the whole batch; send each alone to find which.
            logger.warning("ledger rejected a batch of %d charges: %s", len(charges), error)
            return await _post_one_by_one(
                conn, ledger, charges, attempts, timeout_s, max_attempts, now
            )
        await _mark_committed(conn, [(o.request_id, o.entry_id) for o in outcomes], now)
        return PostResult(len(outcomes), 0, 0)


async def _post_one_by_one(
    conn: asyncpg.Connection,
    ledger: Ledger,
    charges: Sequence[LedgerCharge],
    attempts: dict[str, int],
    timeout_s: float,
    max_attempts: int,
    now: datetime,
) -> PostResult:
    committed = failed = retry = 0
    for charge in charges:
        try:
            outcomes = await ledger.commit_charges([charge], timeout_s)
        except LedgerUnavailable as error:
            await _record_error(conn, [charge.request_id], str(error), None)
            retry += 1
            continue
        except LedgerRejected as error:
            give_up = attempts[charge.request_id] + 1 >= max_attempts
            logger.error(
                "ledger rejected charge %s on hold %s: %s",
                charge.request_id,
                charge.hold_id,
                error,
                extra={"request_id": charge.request_id, "hold_id": charge.hold_id},
            )
            await _record_error(
                conn, [charge.request_id], str(error), "failed" if give_up else None
            )
            failed += 1 if give_up else 0
            retry += 0 if give_up else 1
            continue
        await _mark_committed(conn, [(o.request_id, o.entry_id) for o in outcomes], now)
        committed += len(outcomes)
    return PostResult(committed, failed, retry)


async def _mark_committed(
    conn: asyncpg.Connection, outcomes: Sequence[tuple[str, int]], now: datetime
) -> None:
    await conn.execute(
        """
        UPDATE metering.charges c
        SET state = 'committed', ledger_entry_id = o.entry_id, committed_at = $3,
            attempts = c.attempts + 1
        FROM unnest($1::text[], $2::bigint[]) AS o(request_id, entry_id)
        WHERE c.request_id = o.request_id
        """,
        [request_id for request_id, _ in outcomes],
        [entry_id for _, entry_id in outcomes],
        now,
    )


async def _record_error(
    conn: asyncpg.Connection, request_ids: Sequence[str], error: str, state: str | None
) -> None:
    await conn.execute(
        """
        UPDATE metering.charges
        SET attempts = attempts + 1, last_error = $2, state = coalesce($3, state)
        WHERE request_id = any($1::text[])
        """,
        list(request_ids),
        error[:2000],
        state,
    )
