"""The charging loop: prices closed periods, commits charges, closes holds, refunds faults."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import nats.errors

from services.metering.attempts import (
    decide_due_refunds,
    post_pending_refunds,
    release_ended_attempts,
    settle_released_attempts,
)
from services.metering.charge_store import post_pending_charges, record_due_charges
from services.metering.ledger import Ledger
from services.metering.ratecard import RateCardHistory, UnknownVersionError
from services.runtime.db import Database
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChargerConfig:
    period_seconds: int = 300
    lateness_s: float = 30.0
    """Seconds after a period ends (or an attempt ends) before its usage is charged, so that
    samples still in flight arrive first. Later samples get a further charge."""
    interval_s: float = 1.0
    """Seconds between passes when there is no backlog."""
    ledger_batch: int = 500
    ledger_timeout_s: float = 5.0
    max_attempts: int = 20
    """Ledger rejections after which a charge or refund is marked failed for an operator."""
    max_refund_s: float = 6 * 3600.0
    """Maximum lost time refunded for one fault, however old the last checkpoint."""
    tie_window_s: float = 300.0
    """How long after an attempt ends a fatal health event still counts as its cause."""
    settle_after_s: float = 14 * 86_400.0
    """Seconds after a hold is released before it is settled and takes no more charges. The
    default equals the usage stream's maximum age, ``IngestConfig.stream_max_age_s``."""


@dataclass
class ChargerCounters:
    charges_recorded: int = 0
    charges_committed: int = 0
    charges_failed: int = 0
    holds_released: int = 0
    holds_settled: int = 0
    refunds_recorded: int = 0
    refunds_committed: int = 0


class Charger:
    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        history: Callable[[], RateCardHistory],
        config: ChargerConfig,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        ingested_through: Callable[[], Awaitable[datetime]] | None = None,
    ) -> None:
        self._db = db
        self._ledger = ledger
        self._history = history
        self._config = config
        self._clock = clock
        self._ingested_through = ingested_through
        self.counters = ChargerCounters()

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("charger starting: period %d s", self._config.period_seconds)
        while not stop.is_set():
            try:
                busy = await self.run_once()
            except (asyncpg.PostgresError, Unavailable) as error:
                # Two replicas can race for one period's next sequence number (a unique
                # violation) or the pool can be exhausted; the next pass retries.
                logger.warning("charging pass failed, retrying: %s", error)
                busy = False
            except UnknownVersionError as error:
                # Another replica published a version and priced with it before this one's
                # cache refreshed. The failed step's transaction rolled back, so a later pass
                # with the refreshed cache does the work.
                logger.warning(
                    "charging pass failed: %s; retrying once the rate cards refresh", error
                )
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(stop.wait(), self._config.interval_s)
                except TimeoutError:
                    pass
        logger.info("charger stopped")

    async def run_once(self) -> bool:
        """Make one pass; return whether it found work (so the next pass starts at once)."""
        config = self._config
        counters = self.counters
        now = self._clock()
        history = self._history()

        async with self._db.acquire() as conn:
            planned = await record_due_charges(
                conn,
                history,
                now=now,
                period_seconds=config.period_seconds,
                lateness_s=config.lateness_s,
            )
            posted = await post_pending_charges(
                conn,
                self._ledger,
                batch=config.ledger_batch,
                timeout_s=config.ledger_timeout_s,
                max_attempts=config.max_attempts,
                now=self._clock(),
            )
            released = await release_ended_attempts(
                conn,
                self._ledger,
                now=await self._release_before(now),
                lateness_s=config.lateness_s,
                timeout_s=config.ledger_timeout_s,
            )
            settled = await settle_released_attempts(
                conn,
                self._ledger,
                now=now,
                settle_after_s=config.settle_after_s,
                timeout_s=config.ledger_timeout_s,
            )
            refunds = await decide_due_refunds(
                conn,
                history,
                now=now,
                max_lost=timedelta(seconds=config.max_refund_s),
                tie_window=timedelta(seconds=config.tie_window_s),
            )
            refunded = await post_pending_refunds(
                conn,
                self._ledger,
                now=self._clock(),
                timeout_s=config.ledger_timeout_s,
                max_attempts=config.max_attempts,
            )

        counters.charges_recorded += len(planned)
        counters.charges_committed += posted.committed
        counters.charges_failed += posted.failed
        counters.holds_released += released
        counters.holds_settled += settled
        counters.refunds_recorded += len(refunds)
        counters.refunds_committed += refunded
        for refund in refunds:
            logger.info(
                "refund %s: %s PF-days, %s", refund.request_id, refund.amount, refund.reason
            )
        return bool(planned or posted.committed or released or settled or refunds or refunded)

    async def _release_before(self, now: datetime) -> datetime:
        """Return the time up to which ended attempts may release their holds.

        A hold is released only once every usage message published before the attempt's end
        (plus the lateness allowance) is stored, so its remainder is not returned while a
        backlog in the usage stream, such as after a metering restart, still owes charges.
        """
        if self._ingested_through is None:
            return now
        try:
            return min(now, await self._ingested_through())
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning("could not read the ingest position, releasing nothing: %s", error)
            return datetime.min.replace(tzinfo=UTC)
