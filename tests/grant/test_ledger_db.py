"""The ledger against a real PostgreSQL: concurrency, idempotency and exact balances."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from services.grant import budget
from services.grant.errors import InsufficientBudget, NotFound
from services.grant.ledger import Ledger, RequestRejected
from services.grant.ledger_batcher import LedgerBatcher
from services.grant.ledger_ops import (
    Cause,
    ChargeRequest,
    EntryResult,
    HoldRequest,
    RefundRequest,
    ReleaseRequest,
)
from services.runtime.db import Database
from tests.grant.conftest import (
    OFFICE,
    account_balance,
    grant_row,
    open_database,
    postings_sum,
    seed_grant,
    seed_project,
)

SCHEDULER = Cause(actor="scheduler", trigger="test")
METERING = Cause(actor="metering", trigger="test")


def hold_request(
    grant_id: str | None, amount: str, key: str | None = None, **kw: str
) -> HoldRequest:
    return HoldRequest(
        key=key or uuid.uuid4().hex,
        grant_id=grant_id,
        project_id=kw.get("project_id"),
        allocation_id=kw.get("allocation_id"),
        job_id=kw.get("job_id", "job-1"),
        amount=Decimal(amount),
        cause=SCHEDULER,
    )


async def place(ledger: Ledger, request: HoldRequest) -> EntryResult:
    [outcome] = await ledger.apply([request])
    assert isinstance(outcome, EntryResult), outcome
    return outcome


async def run_batcher(batcher: LedgerBatcher) -> asyncio.Task[None]:
    task = asyncio.create_task(batcher.run())
    await asyncio.sleep(0)  # run() marks the batcher running before its first await
    assert batcher.running
    return task


@pytest.mark.parametrize("max_batch", [1, 32])
async def test_hundred_concurrent_holds_on_sixty(db: Database, max_batch: int) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "60")
    batcher = LedgerBatcher(Ledger(db), workers=4, max_batch=max_batch)
    task = await run_batcher(batcher)
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit(hold_request(grant_id, "1")) for _ in range(100))
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    succeeded = [o for o in outcomes if isinstance(o, EntryResult)]
    refused = [o for o in outcomes if isinstance(o, InsufficientBudget)]
    assert len(succeeded) == 60
    assert len(refused) == 40
    assert all(r.shortfall == Decimal(1) for r in refused)
    assert "shortfall 1 PF-days" in str(refused[0])
    row = await grant_row(db, grant_id)
    assert row["available"] == 0
    assert row["held"] == 60
    assert await postings_sum(db) == 0
    assert await account_balance(db, f"grant:{grant_id}:held") == 60


async def test_same_charge_twice_applies_once_across_restart(schema: str) -> None:
    first_db = await open_database(schema)
    await seed_project(first_db)
    grant_id = await seed_grant(first_db, "10")
    ledger = Ledger(first_db)
    hold = await place(ledger, hold_request(grant_id, "4"))
    assert hold.hold_id is not None
    charge = ChargeRequest("charge-1", hold.hold_id, Decimal("1.5"), METERING)
    [first] = await ledger.apply([charge])
    await first_db.close()

    # A new pool and ledger stand for a restarted service process.
    second_db = await open_database(schema)
    try:
        [second] = await Ledger(second_db).apply([charge])
        assert isinstance(first, EntryResult) and isinstance(second, EntryResult)
        assert first.applied is True
        assert second.applied is False
        assert second.entry_id == first.entry_id
        row = await grant_row(second_db, grant_id)
        assert row["consumed"] == Decimal("1.5")
        assert row["held"] == Decimal("2.5")
        assert row["available"] == Decimal(6)
    finally:
        await second_db.close()


async def test_second_release_does_nothing(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    hold = await place(ledger, hold_request(grant_id, "10"))
    assert hold.hold_id is not None
    [charged] = await ledger.apply([ChargeRequest("c1", hold.hold_id, Decimal(3), METERING)])
    assert isinstance(charged, EntryResult)
    [first] = await ledger.apply([ReleaseRequest("r1", hold.hold_id, SCHEDULER)])
    [replay] = await ledger.apply([ReleaseRequest("r1", hold.hold_id, SCHEDULER)])
    [other_key] = await ledger.apply([ReleaseRequest("r2", hold.hold_id, SCHEDULER)])
    assert isinstance(first, EntryResult) and first.amount == 7
    assert isinstance(replay, EntryResult) and replay.applied is False
    assert isinstance(other_key, EntryResult) and other_key.amount == 0
    row = await grant_row(db, grant_id)
    assert row["available"] == 7
    assert row["held"] == 0
    # Released twice never lets the project spend more than the grant: 7 is all that is left.
    outcomes = await ledger.apply([hold_request(grant_id, "7"), hold_request(grant_id, "0.1")])
    assert isinstance(outcomes[0], EntryResult)
    assert isinstance(outcomes[1], InsufficientBudget)
    assert await postings_sum(db) == 0


async def test_cancel_before_start_charges_nothing(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    hold = await place(ledger, hold_request(grant_id, "5"))
    assert hold.hold_id is not None
    release = ReleaseRequest(f"{hold.job_id}/cancel", hold.hold_id, SCHEDULER)
    await ledger.apply([release])
    await ledger.apply([release])
    row = await grant_row(db, grant_id)
    assert row["available"] == 10
    assert row["consumed"] == 0


async def test_cancel_mid_period_charges_once(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    hold = await place(ledger, hold_request(grant_id, "5"))
    assert hold.hold_id is not None
    # The job ran 40% of its period before the cancel; metering charges that part.
    ran = ChargeRequest("job-1/period-0", hold.hold_id, Decimal(2), METERING)
    cancel = ReleaseRequest("job-1/cancel", hold.hold_id, SCHEDULER)
    for _ in range(3):  # the cancel event is replayed twice
        await ledger.apply([ran])
        await ledger.apply([cancel])
    row = await grant_row(db, grant_id)
    assert row["consumed"] == 2
    assert row["available"] == 8
    assert row["held"] == 0


async def test_refund_limited_to_charged(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    hold = await place(ledger, hold_request(grant_id, "5"))
    assert hold.hold_id is not None
    await ledger.apply([ChargeRequest("c", hold.hold_id, Decimal(3), METERING)])
    [refunded] = await ledger.apply([RefundRequest("f1", hold.hold_id, Decimal(2), METERING)])
    [too_much] = await ledger.apply([RefundRequest("f2", hold.hold_id, Decimal(2), METERING)])
    assert isinstance(refunded, EntryResult)
    assert "exceeds the 1 PF-days charged" in str(too_much)
    row = await grant_row(db, grant_id)
    assert row["consumed"] == 1
    assert row["refunded"] == 2
    assert row["available"] == 7


async def test_unknown_hold_is_not_found(ledger: Ledger, db: Database) -> None:
    [outcome] = await ledger.apply([ChargeRequest("c", "hold-missing", Decimal(1), METERING)])
    assert isinstance(outcome, NotFound)
    assert await postings_sum(db) == 0


async def test_key_reused_for_other_request_rejected(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    await place(ledger, hold_request(grant_id, "1", key="k"))
    [outcome] = await ledger.apply([hold_request(grant_id, "2", key="k")])
    assert "already used for a different request" in str(outcome)
    assert (await grant_row(db, grant_id))["held"] == 1


async def test_key_reused_within_batch_rejected(db: Database, ledger: Ledger) -> None:
    """Two requests with one key in one batch: a copy gets the first's result, another body
    gets an error, whether or not the batch is atomic."""
    await seed_project(db)
    grant_id = await seed_grant(db, "10")
    hold = await place(ledger, hold_request(grant_id, "5"))
    assert hold.hold_id is not None
    first = ChargeRequest("batch-key", hold.hold_id, Decimal(1), METERING)
    copy = ChargeRequest("batch-key", hold.hold_id, Decimal(1), METERING)
    other = ChargeRequest("batch-key", hold.hold_id, Decimal(2), METERING)
    with pytest.raises(RequestRejected) as rejected:
        await ledger.apply([first, other], atomic=True)
    assert rejected.value.index == 1
    assert "already used for a different request" in str(rejected.value.error)
    assert (await grant_row(db, grant_id))["consumed"] == 0
    outcomes = await ledger.apply([first, copy, other])
    assert isinstance(outcomes[0], EntryResult)
    assert outcomes[0].applied
    assert isinstance(outcomes[1], EntryResult)
    assert outcomes[1].entry_id == outcomes[0].entry_id
    assert not outcomes[1].applied
    assert "already used for a different request" in str(outcomes[2])
    assert (await grant_row(db, grant_id))["consumed"] == 1


async def test_project_hold_spends_grant_expiring_first(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    now = datetime.now(UTC)
    late = await seed_grant(db, "10", ends_at=now + timedelta(days=60))
    early = await seed_grant(db, "3", ends_at=now + timedelta(days=5))
    first = await place(ledger, hold_request(None, "2", project_id="proj-a"))
    second = await place(ledger, hold_request(None, "2", project_id="proj-a"))
    assert first.grant_id == early
    # The early grant has 1 left, so the next hold falls to the later one.
    assert second.grant_id == late


# Every third insert into ledger_entries fails with a serialization failure. The counter is a
# sequence because nextval is not rolled back with the failed transaction.
INJECT_FAILURES = """
CREATE SEQUENCE injected_attempts;
CREATE FUNCTION inject_serialization_failure() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('injected_attempts') % 3 = 1 THEN
        RAISE EXCEPTION 'injected conflict' USING ERRCODE = '40001';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER inject_failure AFTER INSERT ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION inject_serialization_failure();
"""


async def test_charges_survive_injected_serialization_failures(db: Database) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "1000")
    ledger = Ledger(db, max_attempts=20)
    holds = [await place(ledger, hold_request(grant_id, "5", job_id=f"j{i}")) for i in range(10)]
    async with db.acquire() as conn:
        await conn.execute(INJECT_FAILURES)

    batcher = LedgerBatcher(ledger, workers=4, max_batch=8)
    task = await run_batcher(batcher)
    amounts = [Decimal(f"0.{i + 1:02d}") + Decimal("1e-24") for i in range(100)]
    try:
        outcomes = await asyncio.gather(
            *(
                batcher.submit(
                    ChargeRequest(f"c{i}", holds[i % 10].hold_id or "", amounts[i], METERING)
                )
                for i in range(100)
            )
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert all(isinstance(o, EntryResult) for o in outcomes), outcomes
    row = await grant_row(db, grant_id)
    assert row["consumed"] == sum(amounts)
    assert row["available"] + row["held"] == Decimal(1000) - sum(amounts)
    async with db.acquire() as conn:
        charges = await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'charge'")
        attempts = await conn.fetchval("SELECT last_value FROM injected_attempts")
    assert charges == 100
    # Each failed attempt rolled its batch back and the batch ran again.
    assert attempts >= 3
    assert await postings_sum(db) == 0


async def test_available_never_negative_in_database(db: Database) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "1")
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE grants SET available = -1 WHERE id = $1", grant_id)


async def test_ledger_is_append_only(db: Database) -> None:
    await seed_project(db)
    await seed_grant(db, "1")
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE ledger_entries SET amount = 2")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM postings")


async def test_same_key_racing_applies_once(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(db, "100")
    hold = await place(ledger, hold_request(grant_id, "50"))
    assert hold.hold_id is not None
    charge = ChargeRequest("racing-charge", hold.hold_id, Decimal(1), METERING)
    # Separate batches on separate connections, as two replicas would send them.
    outcomes = await asyncio.gather(*(ledger.apply([charge]) for _ in range(8)))
    results = [o[0] for o in outcomes]
    assert all(isinstance(r, EntryResult) for r in results), results
    applied = [r for r in results if isinstance(r, EntryResult) and r.applied]
    assert len(applied) == 1
    assert len({r.entry_id for r in results if isinstance(r, EntryResult)}) == 1
    row = await grant_row(db, grant_id)
    assert row["consumed"] == 1
    assert row["held"] == 49


async def test_budget_never_grows_back_with_time(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    now = datetime.now(UTC)
    grant_id = await seed_grant(db, "10", ends_at=now + timedelta(days=1))
    hold = await place(ledger, hold_request(grant_id, "4"))
    assert hold.hold_id is not None
    await ledger.apply([ChargeRequest("c", hold.hold_id, Decimal(1), METERING)])
    seen: list[Decimal] = []
    # Scans before, at and long after the end of the window.
    for offset in (timedelta(hours=1), timedelta(days=1), timedelta(days=2), timedelta(days=400)):
        async with db.transaction() as conn:
            await budget.expire_grant(conn, grant_id, OFFICE, now + offset)
        seen.append((await grant_row(db, grant_id))["available"])
    assert seen == [Decimal(6), Decimal(0), Decimal(0), Decimal(0)]
    # The running job's hold stays held; releasing it after expiry goes to the program pool.
    [released] = await ledger.apply([ReleaseRequest("r", hold.hold_id, SCHEDULER)])
    assert isinstance(released, EntryResult)
    row = await grant_row(db, grant_id)
    assert row["available"] == 0
    assert row["held"] == 0
    assert await account_balance(db, "program:pool") == Decimal(-1)
    assert await postings_sum(db) == 0
