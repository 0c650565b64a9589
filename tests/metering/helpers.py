"""Builders and a ledger test double shared by the metering tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import nats
from nats.js import JetStreamContext

from acsp.v1 import agent_pb2, common_pb2
from services.metering.attempts import AttemptFacts, record_attempt
from services.metering.charger import Charger, ChargerConfig
from services.metering.ingest import IngestConfig, UsageIngest, declare_usage_stream
from services.metering.ledger import (
    ChargeOutcome,
    GrantTerms,
    HoldRelease,
    LedgerCharge,
    LedgerRejected,
    ReleaseOutcome,
)
from services.metering.ratecard import (
    AMOUNT_QUANTUM,
    TFLOPS_PER_PF_DAY_SECOND,
    RateCard,
    RateCardHistory,
    RatePolicy,
    default_rate_card,
)
from services.runtime.db import Database

T0 = datetime(2026, 12, 1, tzinfo=UTC)
"""An hour boundary, so tests can place samples on period boundaries."""


@dataclass
class LedgerDouble:
    """An in-memory ledger that applies each request id once, as the grant service does."""

    charges: dict[str, LedgerCharge] = field(default_factory=dict)
    released: dict[str, str] = field(default_factory=dict)
    settled: dict[str, str] = field(default_factory=dict)
    refunds: dict[str, tuple[str, Decimal, str]] = field(default_factory=dict)
    refund_calls: list[str] = field(default_factory=list)
    """The request id of every Refund call, repeats included."""
    calls: int = 0
    _entries: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ids: dict[str, int] = field(default_factory=dict)

    async def commit_charges(
        self, charges: Sequence[LedgerCharge], timeout_s: float
    ) -> list[ChargeOutcome]:
        self.calls += 1
        for charge in charges:
            if charge.request_id not in self.charges and charge.hold_id in self.settled.values():
                raise LedgerRejected(f"hold {charge.hold_id} is settled")
        outcomes = []
        for charge in charges:
            applied = charge.request_id not in self.charges
            if applied:
                self.charges[charge.request_id] = charge
                self._ids[charge.request_id] = next(self._entries)
            outcomes.append(ChargeOutcome(charge.request_id, self._ids[charge.request_id], applied))
        return outcomes

    async def release_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        self.released.setdefault(request_id, hold_id)

    async def settle_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        self.settled.setdefault(request_id, hold_id)

    async def close_holds(
        self, items: Sequence[HoldRelease], timeout_s: float
    ) -> list[ReleaseOutcome]:
        self.calls += 1
        for item in items:
            target = self.settled if item.settle else self.released
            target.setdefault(item.request_id, item.hold_id)
        return [ReleaseOutcome(item.request_id, "done") for item in items]

    async def refund(
        self, request_id: str, hold_id: str, amount: Decimal, reason: str, timeout_s: float
    ) -> int:
        self.refund_calls.append(request_id)
        self.refunds.setdefault(request_id, (hold_id, amount, reason))
        return self._ids.setdefault(request_id, next(self._entries))

    async def grant_terms(self, grant_id: str, timeout_s: float) -> GrantTerms:
        return GrantTerms(RatePolicy.CURRENT, None)

    def total_charged(self) -> Decimal:
        return sum((c.amount for c in self.charges.values()), Decimal(0))


def sample(
    sample_id: str,
    job_id: str,
    start: datetime,
    seconds: int = 60,
    *,
    attempt: int = 0,
    model: str = "A100-SXM4-80GB",
    accelerator_id: str = "GPU-0",
    share_millis: int = 1000,
    utilization: float = 0.8,
) -> agent_pb2.UsageSample:
    item = agent_pb2.UsageSample(
        sample_id=sample_id,
        task_id=f"{job_id}/{attempt}/0",
        job_id=job_id,
        accelerator_id=accelerator_id,
        model=model,
        share_millis=share_millis,
        accelerator_seconds=common_pb2.Decimal(value=str(Decimal(seconds) * share_millis / 1000)),
        utilization=agent_pb2.OptionalMetric(value=utilization),
    )
    item.start_time.FromDatetime(start)
    item.end_time.FromDatetime(start + timedelta(seconds=seconds))
    return item


def report(
    samples: Sequence[agent_pb2.UsageSample],
    provider: str = "prov-a",
    region: str = "r1",
    node: str = "node-1",
) -> bytes:
    message = agent_pb2.UsageReport(
        node=agent_pb2.NodeRef(provider_id=provider, region_id=region, node_id=node),
        samples=list(samples),
        boot_id="boot-1",
    )
    return message.SerializeToString()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, interval_s: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail with TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polling a database or a counter
            await asyncio.sleep(interval_s)


class Clock:
    """A settable clock for the charger."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def rate_history() -> RateCardHistory:
    return RateCardHistory((default_rate_card(),))


@asynccontextmanager
async def running_ingest(
    nats_url: str, db: Database, **overrides: Any
) -> AsyncIterator[tuple[JetStreamContext, UsageIngest]]:
    """Run a UsageIngest with test-sized timings until the block exits."""
    client = await nats.connect(nats_url, connect_timeout=2)
    js = client.jetstream()
    settings: dict[str, Any] = {"period_seconds": 300, "ack_wait_s": 2.0, "fetch_timeout_s": 0.2}
    settings.update(overrides)
    config = IngestConfig(**settings)
    await declare_usage_stream(js, config)
    card = default_rate_card()
    ingest = UsageIngest(js, db, config, lambda: card.rates)
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(stop))
    try:
        yield js, ingest
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.close()


def make_charger(db: Database, ledger: LedgerDouble, clock: Clock, **overrides: Any) -> Charger:
    settings: dict[str, Any] = {"period_seconds": 300, "lateness_s": 30.0}
    settings.update(overrides)
    history = rate_history()
    return Charger(db, ledger, lambda: history, ChargerConfig(**settings), clock)


async def drain(charger: Charger) -> None:
    """Run charger passes until one finds no work."""
    for _ in range(50):
        if not await charger.run_once():
            return
    raise AssertionError("charger still busy after 50 passes")


async def count(db: Database, sql: str, *args: Any) -> int:
    async with db.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


async def admit(
    db: Database,
    job_id: str,
    *,
    attempt: int = 0,
    started_at: datetime = T0,
    ended_at: datetime | None = None,
    end_reason: str = "",
    end_trigger: str = "",
    last_checkpoint_at: datetime | None = None,
    providers: tuple[str, ...] | None = None,
) -> None:
    """Record an attempt as the job events would: hold, grant, and optionally its end."""
    async with db.acquire() as conn:
        await record_attempt(
            conn,
            AttemptFacts(
                job_id=job_id,
                attempt=attempt,
                hold_id=f"hold-{job_id}-{attempt}",
                grant_id="grant-1",
                project_id="proj-1",
                institution_id="inst-1",
                started_at=started_at,
                ended_at=ended_at,
                end_reason=end_reason,
                end_trigger=end_trigger,
                last_checkpoint_at=last_checkpoint_at,
                cause="test",
                providers=providers,
            ),
        )


def exact_price(model: str, seconds: Decimal | int, card: RateCard | None = None) -> Fraction:
    """Return the unrounded price in PF-days of ``seconds`` on ``model``."""
    peak = (card or default_rate_card()).models[model].peak_dense_tflops
    return Fraction(Decimal(seconds)) * Fraction(peak) / int(TFLOPS_PER_PF_DAY_SECOND)


def assert_priced(amount: Decimal, exact: Fraction, charges: int = 1) -> None:
    """Assert ``amount`` is ``exact`` within half a ledger quantum for each of ``charges``."""
    gap = abs(Fraction(amount) - exact)
    assert gap <= Fraction(charges, 2) * Fraction(AMOUNT_QUANTUM), f"{amount} is {float(gap)} off"


async def insert_charge_lines(db: Database, lines: Sequence[tuple[int, str, Decimal]]) -> None:
    """Insert one charge with one line for each (rate-card version, model, seconds)."""
    charges = [
        (f"job-{index}", T0, seconds, version) for index, (version, _, seconds) in enumerate(lines)
    ]
    async with db.acquire() as conn, conn.transaction():
        await conn.executemany(
            """
            INSERT INTO metering.charges (request_id, job_id, attempt, period_start, seq,
                hold_id, accelerator_seconds, amount, rate_card_version)
            VALUES ($1, $1, 0, $2, 0, 'hold-1', $3, 0, $4)
            """,
            charges,
        )
        await conn.executemany(
            """
            INSERT INTO metering.charge_lines (charge_id, provider, region, accelerator_model,
                accelerator_seconds, amount, period_start)
            SELECT charge_id, 'prov-a', 'r1', $2, $3, 0, period_start
            FROM metering.charges WHERE request_id = $1
            """,
            [(f"job-{index}", model, seconds) for index, (_, model, seconds) in enumerate(lines)],
        )
