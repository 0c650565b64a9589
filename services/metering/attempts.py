"""Attempt lifecycle in PostgreSQL: job facts, health events, hold settlement and refunds."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from services.metering.end_triggers import take_placed_candidates
from services.metering.ledger import (
    MAX_RELEASES_PER_CALL,
    HoldRelease,
    Ledger,
    LedgerRejected,
    LedgerUnavailable,
)
from services.metering.ratecard import RateCardHistory, RatePolicy
from services.metering.refunds import (
    EndedAttempt,
    HealthFact,
    PeriodCharge,
    RefundDecision,
    SampleSlice,
    decide_refund,
    find_cause,
)
from services.metering.samples import micros_to_seconds

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttemptFacts:
    """Facts a job event reports about one attempt. A None field leaves the stored value alone."""

    job_id: str
    attempt: int
    hold_id: str
    grant_id: str
    project_id: str = ""
    institution_id: str = ""
    rate_policy: RatePolicy = RatePolicy.CURRENT
    award_rate_card_version: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str = ""
    end_trigger: str = ""
    last_checkpoint_at: datetime | None = None
    cause: str = ""
    providers: tuple[str, ...] | None = None
    """Providers of the attempt's placements, sorted; None when the event names none."""


# True when an agent's provider named the stored end trigger before the attempt's providers were
# known, and the event being stored shows that provider runs none of its tasks. The upsert then
# replaces the trigger with the earliest candidate of a placed provider (see end_triggers.py),
# or else with the event's, so the other provider's trigger cannot decide a refund.
_FOREIGN_TRIGGER = """(
        j.end_trigger_provider IS NOT NULL
        AND (j.providers IS NOT NULL OR excluded.providers IS NOT NULL)
        AND j.end_trigger_provider <> ALL(
            coalesce(j.providers, '{}'::text[]) || coalesce(excluded.providers, '{}'::text[])))"""

# A column of the earliest trigger that a placed provider named while the providers were
# unknown; NULL when there is none. Only a foreign trigger evaluates it.
_PLACED_CANDIDATE = """(
        SELECT c.{0}
        FROM metering.end_trigger_candidates c
        WHERE c.job_id = excluded.job_id AND c.attempt = excluded.attempt
          AND c.provider = ANY(
              coalesce(j.providers, '{{}}'::text[]) || coalesce(excluded.providers, '{{}}'::text[]))
        ORDER BY c.recorded_at, c.position
        LIMIT 1)"""

_UPSERT_SET = f"""
ON CONFLICT (job_id, attempt) DO UPDATE SET
    hold_id = CASE WHEN excluded.hold_id <> '' THEN excluded.hold_id ELSE j.hold_id END,
    grant_id = CASE WHEN excluded.grant_id <> '' THEN excluded.grant_id
                    ELSE j.grant_id END,
    project_id = CASE WHEN excluded.project_id <> '' THEN excluded.project_id
                      ELSE j.project_id END,
    institution_id = CASE WHEN excluded.institution_id <> ''
                          THEN excluded.institution_id ELSE j.institution_id END,
    rate_policy = excluded.rate_policy,
    award_rate_card_version = excluded.award_rate_card_version,
    started_at = coalesce(j.started_at, excluded.started_at),
    ended_at = coalesce(j.ended_at, excluded.ended_at),
    end_reason = CASE WHEN j.ended_at IS NULL THEN excluded.end_reason
                      ELSE j.end_reason END,
    end_trigger = CASE WHEN j.end_trigger = '' THEN excluded.end_trigger
                       WHEN {_FOREIGN_TRIGGER}
                       THEN coalesce({_PLACED_CANDIDATE.format("end_trigger")},
                                     excluded.end_trigger)
                       ELSE j.end_trigger END,
    end_trigger_provider = CASE WHEN j.end_trigger = '' THEN excluded.end_trigger_provider
                                WHEN {_FOREIGN_TRIGGER}
                                THEN coalesce({_PLACED_CANDIDATE.format("provider")},
                                              excluded.end_trigger_provider)
                                ELSE j.end_trigger_provider END,
    last_checkpoint_at = greatest(j.last_checkpoint_at, excluded.last_checkpoint_at),
    cause = excluded.cause,
    providers = CASE
        WHEN excluded.providers IS NULL THEN j.providers
        WHEN j.providers IS NULL THEN excluded.providers
        ELSE ARRAY(SELECT DISTINCT p FROM unnest(j.providers || excluded.providers) AS p
                   ORDER BY p)
    END,
    updated_at = now()
"""

_COLUMNS = """
    (job_id, attempt, hold_id, grant_id, project_id, institution_id, rate_policy,
     award_rate_card_version, started_at, ended_at, end_reason, end_trigger,
     last_checkpoint_at, cause, providers)
"""

# Providers travel as a JSON array (or NULL) in both statements, because unnest() flattens an
# array of arrays instead of returning one array per row.
_PROVIDERS = "CASE WHEN {0} IS NULL THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text({0})) END"

_RECORD_ATTEMPT = f"""
INSERT INTO metering.jobs AS j {_COLUMNS}
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
        {_PROVIDERS.format("$15::jsonb")})
{_UPSERT_SET}
"""

# One row per attempt, because an upsert may not change the same row twice in one statement.
_RECORD_ATTEMPTS = f"""
INSERT INTO metering.jobs AS j {_COLUMNS}
SELECT u.job_id, u.attempt, u.hold_id, u.grant_id, u.project_id, u.institution_id,
       u.rate_policy, u.award_rate_card_version, u.started_at, u.ended_at, u.end_reason,
       u.end_trigger, u.last_checkpoint_at, u.cause, {_PROVIDERS.format("u.providers")}
FROM unnest(
    $1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::int[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[],
    $13::timestamptz[], $14::text[], $15::jsonb[]
) AS u(job_id, attempt, hold_id, grant_id, project_id, institution_id, rate_policy,
       award_rate_card_version, started_at, ended_at, end_reason, end_trigger,
       last_checkpoint_at, cause, providers)
{_UPSERT_SET}
"""


def _attempt_row(facts: AttemptFacts) -> tuple[object, ...]:
    return (
        facts.job_id,
        facts.attempt,
        facts.hold_id,
        facts.grant_id,
        facts.project_id,
        facts.institution_id,
        facts.rate_policy.value,
        facts.award_rate_card_version,
        facts.started_at,
        facts.ended_at,
        facts.end_reason,
        facts.end_trigger,
        facts.last_checkpoint_at,
        facts.cause,
        None if facts.providers is None else json.dumps(list(facts.providers)),
    )


def merge_facts(facts: Sequence[AttemptFacts]) -> list[AttemptFacts]:
    """Combine the facts about each attempt into one, in the order of each attempt's first fact.

    Storing the combined fact gives the row that storing the facts one after another gives,
    because each field follows the upsert's rule. A non-empty id, the rate terms and the cause
    take the later value. The start, the end and the end trigger keep the first that is set.
    The end reason comes with the first end, and the latest checkpoint time wins. The
    providers are the union of those named.
    """
    merged: dict[tuple[str, int], AttemptFacts] = {}
    for fact in facts:
        key = (fact.job_id, fact.attempt)
        earlier = merged.get(key)
        merged[key] = fact if earlier is None else _combine(earlier, fact)
    return list(merged.values())


def _combine(earlier: AttemptFacts, later: AttemptFacts) -> AttemptFacts:
    ended = earlier.ended_at is not None
    checkpoints = [t for t in (earlier.last_checkpoint_at, later.last_checkpoint_at) if t]
    return AttemptFacts(
        job_id=earlier.job_id,
        attempt=earlier.attempt,
        hold_id=later.hold_id or earlier.hold_id,
        grant_id=later.grant_id or earlier.grant_id,
        project_id=later.project_id or earlier.project_id,
        institution_id=later.institution_id or earlier.institution_id,
        rate_policy=later.rate_policy,
        award_rate_card_version=later.award_rate_card_version,
        started_at=earlier.started_at if earlier.started_at is not None else later.started_at,
        ended_at=earlier.ended_at if ended else later.ended_at,
        end_reason=earlier.end_reason if ended else later.end_reason,
        end_trigger=earlier.end_trigger or later.end_trigger,
        last_checkpoint_at=max(checkpoints) if checkpoints else None,
        cause=later.cause,
        providers=_union(earlier.providers, later.providers),
    )


def _union(
    earlier: tuple[str, ...] | None, later: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    if earlier is None or later is None:
        return later if earlier is None else earlier
    return tuple(sorted(set(earlier) | set(later)))


async def record_attempts(conn: asyncpg.Connection, facts: Sequence[AttemptFacts]) -> None:
    """Insert or update attempts as if one by one in the given order. A recorded end never moves.

    The facts about one attempt (admitted, started, ended) are merged first (see
    :func:`merge_facts`), so that every attempt is one row of a single statement. The rows go
    in key order, so that replicas recording the same attempts lock the rows in the same order
    instead of deadlocking.
    """
    merged = sorted(merge_facts(facts), key=lambda fact: (fact.job_id, fact.attempt))
    rows = [_attempt_row(fact) for fact in merged]
    if rows:
        await conn.execute(_RECORD_ATTEMPTS, *(list(column) for column in zip(*rows, strict=True)))
    placed = [fact for fact in merged if fact.providers]
    if placed:
        # The upsert reads candidates with its own snapshot, so it misses those of a batch of end
        # triggers that committed while it waited on the row. This statement reads them.
        await take_placed_candidates(
            conn, [fact.job_id for fact in placed], [fact.attempt for fact in placed]
        )


async def record_attempt(conn: asyncpg.Connection, facts: AttemptFacts) -> None:
    """Insert or update one attempt; see :func:`record_attempts`."""
    await conn.execute(_RECORD_ATTEMPT, *_attempt_row(facts))
    if facts.providers:
        await take_placed_candidates(conn, [facts.job_id], [facts.attempt])


async def record_health_event(
    conn: asyncpg.Connection, fact: HealthFact, provider: str, region: str, detail: str
) -> None:
    await conn.execute(
        """
        INSERT INTO metering.health_events
            (event_id, provider, region, node, accelerator_id, kind, code, fatal, detail,
             event_time)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (event_id) DO NOTHING
        """,
        fact.event_id,
        provider,
        region,
        fact.node,
        fact.accelerator_id,
        fact.condition,
        fact.xid,
        fact.fatal_severity,
        detail,
        fact.time,
    )


_CHARGES_COMPLETE = """
NOT EXISTS (
    SELECT 1 FROM metering.usage_periods up
    WHERE up.job_id = j.job_id AND up.attempt = j.attempt
      AND up.accelerator_micros > up.charged_micros)
AND NOT EXISTS (
    SELECT 1 FROM metering.charges c
    WHERE c.job_id = j.job_id AND c.attempt = j.attempt AND c.state = 'pending')
"""
"""SQL condition on ``metering.jobs j``: every stored sample of the attempt is charged and
every charge committed."""


async def release_ended_attempts(
    conn: asyncpg.Connection, ledger: Ledger, *, now: datetime, lateness_s: float, timeout_s: float
) -> int:
    """Release what is left of the holds of attempts whose final charges are committed.

    Releasing returns the remainder to the grant but keeps the hold open, so a sample published
    after this point (an agent that spooled through a NATS outage) is still charged to it.
    """
    try:
        cutoff = now - timedelta(seconds=lateness_s)
    except OverflowError:
        # The charger passes datetime.min when it cannot read the ingest position: release
        # nothing this round instead of crashing the service.
        return 0
    rows = await conn.fetch(
        f"""
        SELECT j.job_id, j.attempt, j.hold_id FROM metering.jobs j
        WHERE j.released_at IS NULL AND j.ended_at IS NOT NULL AND j.ended_at <= $1
          AND j.hold_id <> '' AND {_CHARGES_COMPLETE}
        ORDER BY j.ended_at
        LIMIT 500
        """,
        cutoff,
    )
    return await _close_holds(conn, ledger, rows, settle=False, now=now, timeout_s=timeout_s)


# NOTE: a sample published more than the settle delay after its attempt was released is still
# charged, but the ledger rejects a charge on a settled hold, so such a charge ends in state
# 'failed' for an operator.
async def settle_released_attempts(
    conn: asyncpg.Connection,
    ledger: Ledger,
    *,
    now: datetime,
    settle_after_s: float,
    timeout_s: float,
) -> int:
    """Settle the holds of attempts released ``settle_after_s`` ago: they take no more charges."""
    rows = await conn.fetch(
        f"""
        SELECT j.job_id, j.attempt, j.hold_id FROM metering.jobs j
        WHERE j.released_at IS NOT NULL AND j.settled_at IS NULL AND j.released_at <= $1
          AND {_CHARGES_COMPLETE}
        ORDER BY j.released_at
        LIMIT 500
        """,
        now - timedelta(seconds=settle_after_s),
    )
    return await _close_holds(conn, ledger, rows, settle=True, now=now, timeout_s=timeout_s)


async def _close_holds(
    conn: asyncpg.Connection,
    ledger: Ledger,
    rows: Sequence[asyncpg.Record],
    *,
    settle: bool,
    now: datetime,
    timeout_s: float,
) -> int:
    """Release (or settle) each attempt's hold and record it; return how many were recorded.

    Each chunk of up to ``MAX_RELEASES_PER_CALL`` hold releases goes to the ledger in one call,
    and every row the ledger replied to is recorded in one statement. When a call fails as a whole,
    nothing of its chunk is recorded, and it and the chunks after it wait for the next round.
    """
    step, column = ("settle", "settled_at") if settle else ("release", "released_at")
    done: list[asyncpg.Record] = []
    waiting = 0  # Releases not applied because the ledger was unavailable.
    cause = ""
    for start in range(0, len(rows), MAX_RELEASES_PER_CALL):
        chunk = rows[start : start + MAX_RELEASES_PER_CALL]
        releases = [
            HoldRelease(f"{step}/{row['job_id']}/{row['attempt']}", row["hold_id"], settle)
            for row in chunk
        ]
        try:
            outcomes = await ledger.close_holds(releases, timeout_s)
        except LedgerUnavailable as error:
            waiting += len(rows) - start
            cause = str(error)
            break
        except LedgerRejected as error:
            logger.error(
                "ledger rejected the call to %s %s holds, so they wait for the next round: %s",
                step,
                len(chunk),
                error,
            )
            break
        for row, outcome in zip(chunk, outcomes, strict=True):
            if outcome.status == "unavailable":
                waiting += 1
                cause = cause or outcome.message
                continue
            if outcome.status == "rejected":
                logger.error(
                    "ledger rejected the %s of hold %s of job %s: %s",
                    step,
                    row["hold_id"],
                    row["job_id"],
                    outcome.message,
                    extra={"job_id": row["job_id"], "hold_id": row["hold_id"]},
                )
            done.append(row)
    if waiting:
        logger.warning(
            "ledger unavailable: %s of %s holds postponed to the next round: %s",
            step,
            waiting,
            cause,
        )
    if done:
        await conn.execute(
            f"""
            UPDATE metering.jobs AS j SET {column} = $3
            FROM unnest($1::text[], $2::int[]) AS u(job_id, attempt)
            WHERE j.job_id = u.job_id AND j.attempt = u.attempt
            """,
            [row["job_id"] for row in done],
            [row["attempt"] for row in done],
            now,
        )
    return len(done)


async def decide_due_refunds(
    conn: asyncpg.Connection,
    history: RateCardHistory,
    *,
    now: datetime,
    max_lost: timedelta,
    tie_window: timedelta,
) -> list[RefundDecision]:
    """Check released attempts for a refund once, and record each refund as pending."""
    # NOTE: a health event or job event stored after this check does not reopen it. Releasing
    # waits for the ingest position and the lateness allowance, which covers events that
    # agents publish beside their usage, but not a health stream that lags far behind.
    decisions: list[RefundDecision] = []
    async with conn.transaction():
        rows = await conn.fetch(
            """
            SELECT * FROM metering.jobs
            WHERE released_at IS NOT NULL AND refund_checked_at IS NULL
            ORDER BY released_at LIMIT 200 FOR UPDATE SKIP LOCKED
            """
        )
        if not rows:
            return decisions
        job_ids = [row["job_id"] for row in rows]
        attempt_numbers = [row["attempt"] for row in rows]
        samples = await _samples_by_attempt(conn, job_ids, attempt_numbers)
        events = await _health_events_for(conn, rows, samples)
        for row in rows:
            key = (row["job_id"], row["attempt"])
            decision = await _decide_one(
                conn, row, samples.get(key, []), events, history, max_lost, tie_window
            )
            if decision is not None:
                await _insert_refund(conn, row, decision)
                decisions.append(decision)
        await conn.execute(
            """
            UPDATE metering.jobs AS j SET refund_checked_at = $3
            FROM unnest($1::text[], $2::int[]) AS u(job_id, attempt)
            WHERE j.job_id = u.job_id AND j.attempt = u.attempt
            """,
            job_ids,
            attempt_numbers,
            now,
        )
    return decisions


async def _samples_by_attempt(
    conn: asyncpg.Connection, job_ids: list[str], attempts: list[int]
) -> dict[tuple[str, int], list[SampleSlice]]:
    """Read the usage samples of many attempts in one query, grouped by attempt."""
    rows = await conn.fetch(
        """
        SELECT s.job_id, s.attempt, s.start_time, s.period_start, s.provider, s.region,
               s.accelerator_model, s.accelerator_id, s.node, s.accelerator_micros
        FROM metering.usage_samples s
        JOIN unnest($1::text[], $2::int[]) AS u(job_id, attempt)
          ON s.job_id = u.job_id AND s.attempt = u.attempt
        """,
        job_ids,
        attempts,
    )
    out: dict[tuple[str, int], list[SampleSlice]] = {}
    for r in rows:
        out.setdefault((r["job_id"], r["attempt"]), []).append(
            SampleSlice(
                r["start_time"],
                r["period_start"],
                r["provider"],
                r["region"],
                r["accelerator_model"],
                r["accelerator_id"],
                r["node"],
                micros_to_seconds(r["accelerator_micros"]),
            )
        )
    return out


async def _health_events_for(
    conn: asyncpg.Connection,
    rows: Sequence[asyncpg.Record],
    samples: dict[tuple[str, int], list[SampleSlice]],
) -> list[HealthFact]:
    """Read, in one query, every health event that any of the attempts could blame.

    Those are the events on an accelerator the attempts used, node-wide events on their nodes,
    and the events named as their end triggers. :func:`_decide_one` picks each attempt's own.
    """
    accelerators = {s.accelerator_id for slices in samples.values() for s in slices}
    nodes = {s.node for slices in samples.values() for s in slices}
    triggers = [row["end_trigger"].removeprefix("health:") for row in rows if row["end_trigger"]]
    event_rows = await conn.fetch(
        """
        SELECT event_id, accelerator_id, node, kind, code, fatal, event_time, provider
        FROM metering.health_events
        WHERE accelerator_id = any($1::text[]) OR (accelerator_id = '' AND node = any($2::text[]))
           OR event_id = any($3::text[])
        """,
        list(accelerators),
        list(nodes),
        triggers,
    )
    return [HealthFact(*r) for r in event_rows]


async def _decide_one(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    samples: list[SampleSlice],
    candidates: list[HealthFact],
    history: RateCardHistory,
    max_lost: timedelta,
    tie_window: timedelta,
) -> RefundDecision | None:
    attempt = EndedAttempt(
        row["job_id"],
        row["attempt"],
        row["hold_id"],
        row["started_at"],
        row["ended_at"],
        row["end_reason"],
        row["end_trigger"],
        row["last_checkpoint_at"],
    )
    accelerators = frozenset(s.accelerator_id for s in samples)
    nodes = frozenset(s.node for s in samples)
    providers = frozenset(s.provider for s in samples)
    trigger = attempt.end_trigger.removeprefix("health:")
    # An event counts only if it came from the provider whose nodes ran the attempt, because
    # another provider could name any accelerator or node in an event of its own.
    events = [
        e
        for e in candidates
        if e.provider in providers
        and (
            e.accelerator_id in accelerators
            or (e.accelerator_id == "" and e.node in nodes)
            or (trigger != "" and e.event_id == trigger)
        )
    ]
    cause = find_cause(attempt, events, accelerators, nodes, tie_window)
    if cause is None:
        return None
    charge_rows = await conn.fetch(
        """
        SELECT period_start, sum(amount) AS amount,
               array_agg(DISTINCT rate_card_version) AS versions
        FROM metering.charges WHERE job_id = $1 AND attempt = $2 AND state = 'committed'
        GROUP BY period_start
        """,
        attempt.job_id,
        attempt.attempt,
    )
    charges = {
        r["period_start"]: PeriodCharge(
            Decimal(r["amount"]), tuple(history.get(v) for v in r["versions"])
        )
        for r in charge_rows
    }
    return decide_refund(attempt, cause, samples, charges, max_lost)


async def _insert_refund(
    conn: asyncpg.Connection, row: asyncpg.Record, decision: RefundDecision
) -> None:
    await conn.execute(
        """
        INSERT INTO metering.refunds
            (job_id, attempt, request_id, hold_id, amount, accelerator_seconds, lost_from,
             lost_until, reason, cause)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT DO NOTHING
        """,
        row["job_id"],
        row["attempt"],
        decision.request_id,
        row["hold_id"],
        decision.amount,
        decision.seconds,
        decision.lost_from,
        decision.lost_until,
        decision.reason,
        row["end_trigger"] or f"job ended: {row['end_reason']}",
    )
    await conn.executemany(
        """
        INSERT INTO metering.refund_lines
            (job_id, attempt, provider, region, accelerator_model, accelerator_seconds, amount,
             refund_time)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT DO NOTHING
        """,
        [
            (
                row["job_id"],
                row["attempt"],
                line.provider,
                line.region,
                line.accelerator_model,
                line.seconds,
                line.amount,
                decision.lost_until,
            )
            for line in decision.lines
        ],
    )


async def post_pending_refunds(
    conn: asyncpg.Connection, ledger: Ledger, *, now: datetime, timeout_s: float, max_attempts: int
) -> int:
    """Send pending refunds to the ledger, each as its own entry."""
    committed = 0
    async with conn.transaction():
        rows = await conn.fetch(
            """
            SELECT job_id, attempt, request_id, hold_id, amount, reason, attempts
            FROM metering.refunds WHERE state = 'pending'
            ORDER BY created_at LIMIT 100 FOR UPDATE SKIP LOCKED
            """
        )
        for row in rows:
            try:
                entry_id = await ledger.refund(
                    row["request_id"], row["hold_id"], row["amount"], row["reason"], timeout_s
                )
            except LedgerUnavailable as error:
                logger.warning("ledger unavailable for refund %s: %s", row["request_id"], error)
                await _refund_error(conn, row["request_id"], str(error), None)
                break
            except LedgerRejected as error:
                give_up = row["attempts"] + 1 >= max_attempts
                logger.error("ledger rejected refund %s: %s", row["request_id"], error)
                await _refund_error(
                    conn, row["request_id"], str(error), "failed" if give_up else None
                )
                continue
            await conn.execute(
                """
                UPDATE metering.refunds
                SET state = 'committed', ledger_entry_id = $2, committed_at = $3,
                    attempts = attempts + 1
                WHERE request_id = $1
                """,
                row["request_id"],
                entry_id,
                now,
            )
            committed += 1
    return committed


async def _refund_error(
    conn: asyncpg.Connection, request_id: str, error: str, state: str | None
) -> None:
    await conn.execute(
        """
        UPDATE metering.refunds SET attempts = attempts + 1, last_error = $2,
            state = coalesce($3, state)
        WHERE request_id = $1
        """,
        request_id,
        error[:2000],
        state,
    )
