"""Recording job facts in one batch stores the rows that recording them one by one stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.metering.attempts import AttemptFacts, merge_facts, record_attempt, record_attempts
from services.metering.ratecard import RatePolicy
from services.runtime.db import Database

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

COLUMNS = (
    "job_id, attempt, hold_id, grant_id, project_id, institution_id, rate_policy,"
    " award_rate_card_version, started_at, ended_at, end_reason, end_trigger,"
    " last_checkpoint_at, cause"
)


def admitted(job_id: str, attempt: int = 1) -> AttemptFacts:
    return AttemptFacts(
        job_id=job_id,
        attempt=attempt,
        hold_id=f"hold-{job_id}",
        grant_id="grant-1",
        project_id="proj-1",
        institution_id="inst-1",
        rate_policy=RatePolicy.FIXED_AT_AWARD,
        award_rate_card_version=3,
        cause="event:admitted",
    )


def started(job_id: str, at: datetime, checkpoint: datetime | None = None) -> AttemptFacts:
    return AttemptFacts(
        job_id=job_id,
        attempt=1,
        hold_id=f"hold-{job_id}",
        grant_id="grant-1",
        started_at=at,
        last_checkpoint_at=checkpoint,
        cause="event:started",
    )


def ended(job_id: str, at: datetime, reason: str, trigger: str = "") -> AttemptFacts:
    return AttemptFacts(
        job_id=job_id,
        attempt=1,
        hold_id="",
        grant_id="",
        started_at=at - timedelta(minutes=5),
        ended_at=at,
        end_reason=reason,
        end_trigger=trigger,
        last_checkpoint_at=at - timedelta(minutes=1),
        cause="event:ended",
    )


# Facts in the order the events arrive, including a repeated end and events out of order.
SEQUENCE = [
    admitted("a"),
    started("a", T0, checkpoint=T0 + timedelta(minutes=2)),
    ended("a", T0 + timedelta(minutes=9), "completed"),
    ended("b", T0 + timedelta(minutes=4), "failed", trigger="health:xid-79"),
    admitted("b"),
    started("b", T0),
    ended("b", T0 + timedelta(minutes=7), "cancelled", trigger="recall:r1"),
    admitted("c"),
    admitted("c", attempt=2),
    started("c", T0 + timedelta(minutes=1)),
]


async def stored_rows(db: Database) -> list[tuple[object, ...]]:
    async with db.acquire() as conn:
        rows = await conn.fetch(f"SELECT {COLUMNS} FROM metering.jobs ORDER BY job_id, attempt")
        await conn.execute("TRUNCATE metering.jobs")
    return [tuple(row) for row in rows]


async def test_batch_matches_one_by_one(db: Database) -> None:
    async with db.acquire() as conn:
        for fact in SEQUENCE:
            await record_attempt(conn, fact)
    one_by_one = await stored_rows(db)

    async with db.acquire() as conn:
        await record_attempts(conn, SEQUENCE)
    batched = await stored_rows(db)

    assert len(one_by_one) == 4
    assert batched == one_by_one


async def test_batch_over_existing_rows(db: Database) -> None:
    head, tail = SEQUENCE[:4], SEQUENCE[4:]
    async with db.acquire() as conn:
        for fact in SEQUENCE:
            await record_attempt(conn, fact)
    one_by_one = await stored_rows(db)

    async with db.acquire() as conn:
        await record_attempts(conn, head)
        await record_attempts(conn, tail)
    batched = await stored_rows(db)

    assert batched == one_by_one


async def test_first_end_kept(db: Database) -> None:
    async with db.acquire() as conn:
        await record_attempts(conn, SEQUENCE)
        row = await conn.fetchrow(
            "SELECT ended_at, end_reason, end_trigger FROM metering.jobs WHERE job_id = 'b'"
        )
    assert row is not None
    assert row["ended_at"] == T0 + timedelta(minutes=4)
    assert row["end_reason"] == "failed"
    assert row["end_trigger"] == "health:xid-79"


def test_merge_keeps_first_seen_order() -> None:
    merged = merge_facts(SEQUENCE)
    assert [(f.job_id, f.attempt) for f in merged] == [("a", 1), ("b", 1), ("c", 1), ("c", 2)]
