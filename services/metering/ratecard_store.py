"""Rate-card versions in PostgreSQL and in the rate-card KV bucket the scheduler reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime

import asyncpg
import nats.errors
from nats.js.kv import KeyValue

from services.metering.convert import rate_card_out
from services.metering.ratecard import (
    AcceleratorModel,
    RateCard,
    RateCardHistory,
    default_rate_card,
)
from services.runtime.db import Database
from services.runtime.errors import FailedPrecondition, Unavailable

logger = logging.getLogger(__name__)


async def ensure_default(conn: asyncpg.Connection) -> None:
    """Store version 1, the built-in catalog, unless a version 1 exists."""
    card = default_rate_card()
    await conn.execute(
        "INSERT INTO metering.rate_cards (version, effective_from, body, cause) "
        "VALUES ($1, $2, $3::jsonb, 'built-in catalog') ON CONFLICT (version) DO NOTHING",
        card.version,
        card.effective_from,
        card.to_json(),
    )


async def load_history(conn: asyncpg.Connection) -> RateCardHistory:
    rows = await conn.fetch("SELECT body::text AS body FROM metering.rate_cards ORDER BY version")
    if not rows:
        return RateCardHistory((default_rate_card(),))
    return RateCardHistory(tuple(RateCard.from_json(row["body"]) for row in rows))


async def publish_version(
    conn: asyncpg.Connection,
    models: Iterable[AcceleratorModel],
    effective_from: datetime,
    cause: str,
    *,
    effective_stated: bool = True,
) -> RateCard:
    """Store a new version numbered one past the current one, one publisher at a time.

    ``cause`` names the request, so a retry of a stored request returns the version it stored.
    A reuse of it for other models, or for another ``effective_from`` when the caller
    stated one, raises FailedPrecondition naming ``request_id``. Raises FailedPrecondition,
    storing nothing, when the new version leaves out a model that the current one prices,
    because ingest would then reject that model's usage, or when ``effective_from`` is
    before the current version's.
    """
    models = tuple(models)
    async with conn.transaction():
        await conn.execute("LOCK TABLE metering.rate_cards IN SHARE ROW EXCLUSIVE MODE")
        stored = await conn.fetchval(
            "SELECT body::text FROM metering.rate_cards WHERE cause = $1", cause
        )
        if stored is not None:
            card = RateCard.from_json(stored)
            _check_same_card(card, models, effective_from if effective_stated else None)
            return card
        history = await load_history(conn)
        current = history.current
        if effective_from < current.effective_from:
            raise FailedPrecondition(
                f"the effective time {effective_from.isoformat()} is before that of version "
                f"{current.version}, {current.effective_from.isoformat()}; leave it unset to "
                "take effect now",
                field="rate_card.effective_time",
            )
        missing = sorted(set(current.models) - {model.name for model in models})
        if missing:
            raise FailedPrecondition(
                f"the rate card leaves out {', '.join(missing)}, which version "
                f"{current.version} prices, so ingest would reject the usage of "
                f"{'that model' if len(missing) == 1 else 'those models'}; give every model of "
                f"version {current.version} a rate",
                field="rate_card.rates",
            )
        updated = history.with_version(models, effective_from)
        card = updated.current
        await conn.execute(
            "INSERT INTO metering.rate_cards (version, effective_from, body, cause) "
            "VALUES ($1, $2, $3::jsonb, $4)",
            card.version,
            card.effective_from,
            card.to_json(),
            cause,
        )
    logger.info("published rate card version %d (%s)", card.version, cause)
    return card


def _check_same_card(
    card: RateCard, models: tuple[AcceleratorModel, ...], effective_from: datetime | None
) -> None:
    """Raise FailedPrecondition unless ``card`` has ``models`` and, if given, ``effective_from``."""
    same_models = dict(card.models) == {model.name: model for model in models}
    same_time = effective_from is None or effective_from == card.effective_from
    if not (same_models and same_time):
        raise FailedPrecondition(
            f"this request id was already used to publish rate card version {card.version}, "
            "which differs from this rate card; use a new request id for a new version",
            field="request_id",
        )


async def put_in_bucket(kv: KeyValue, card: RateCard) -> None:
    """Put a version, as a serialized ``acsp.v1.RateCard``, under ``v<version>`` and ``current``."""
    body = rate_card_out(card).SerializeToString()
    await kv.put(f"v{card.version}", body)
    await kv.put("current", body)


class RateCardCache:
    """The rate-card history this process prices with, refreshed from PostgreSQL.

    Another replica may publish a version; each replica picks it up within ``refresh_s``.
    """

    def __init__(self, db: Database, refresh_s: float = 10.0) -> None:
        self._db = db
        self._refresh_s = refresh_s
        self._history = RateCardHistory((default_rate_card(),))

    def history(self) -> RateCardHistory:
        return self._history

    def set(self, history: RateCardHistory) -> None:
        self._history = history

    async def load(self) -> RateCardHistory:
        async with self._db.acquire() as conn:
            await ensure_default(conn)
            self._history = await load_history(conn)
        return self._history

    async def run(self, stop: asyncio.Event, kv: KeyValue | None) -> None:
        """Refresh until ``stop`` is set, mirroring a new current version into the bucket."""
        published = 0
        while not stop.is_set():
            try:
                history = await self.load()
                if kv is not None and history.current.version != published:
                    await put_in_bucket(kv, history.current)
                    published = history.current.version
            except (Unavailable, asyncpg.PostgresError, nats.errors.Error) as error:
                # PostgreSQL or NATS restarting must not stop metering: it prices with the
                # history it has, and the next pass loads and mirrors the current version.
                logger.warning("rate card refresh failed, retrying: %s", error)
            try:
                await asyncio.wait_for(stop.wait(), self._refresh_s)
            except TimeoutError:
                pass
