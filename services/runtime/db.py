"""PostgreSQL access through one asyncpg pool per service, with bounded waits.

The server opens the pool at start (``Service(..., schema="grant")``) and hands it to hooks
and servicers as ``runtime.db``. Every connection's ``search_path`` is the service's schema,
then ``public``, so SQL names its tables without the schema. Quote the schema wherever SQL
names it (:func:`quote_ident`), because ``grant`` is a reserved word.

::

    async with db.acquire() as connection:          # Unavailable after ACSP_DB_ACQUIRE_TIMEOUT_S
        row = await connection.fetchrow("SELECT ...")

    async def move(connection: asyncpg.Connection) -> Decimal:
        ...                                         # runs again on serialization failure
    balance = await db.run_serializable(move)

Waits never outlast the current request's deadline (:func:`services.runtime.context.remaining_s`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, TypeVar

import asyncpg
from opentelemetry import metrics

from services.runtime import context
from services.runtime.errors import Unavailable
from services.runtime.settings import Settings, SettingsError, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 10.0
RETRYABLE_ERRORS: Final = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
CONNECT_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)
"""Errors of a pool that cannot open a connection because the server is down, starting up or
shutting down."""

# Overload shows in metrics, not only in callers' errors.
_meter = metrics.get_meter(__name__)
_acquire_timeouts = _meter.create_counter(
    "acsp.db.acquire_timeouts", description="pool acquisitions that timed out"
)
_transaction_retries = _meter.create_counter(
    "acsp.db.transaction_retries",
    description="SERIALIZABLE transactions retried after a serialization failure or deadlock",
)


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (schema, table), doubling any embedded quote."""
    return '"' + name.replace('"', '""') + '"'


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's reset query.

    The default query (advisory unlock, ``CLOSE ALL``, ``UNLISTEN *``, ``RESET ALL``) costs a
    round trip per release. Pooled connections here hold no session state: advisory locks
    and LISTEN use connections of their own, and settings use ``SET LOCAL``. asyncpg still
    rolls back a transaction left open before it calls this.
    """


class Database:
    """A pool whose waits are bounded, plus transaction helpers."""

    def __init__(self, pool: asyncpg.Pool, schema: str, acquire_timeout_s: float) -> None:
        self.pool = pool
        self.schema = schema
        self.acquire_timeout_s = acquire_timeout_s

    @classmethod
    async def connect(cls, settings: Settings, schema: str, application: str) -> Database:
        """Open the pool; raise SettingsError naming ACSP_DATABASE_URL if it cannot connect."""
        url: str = settings.require("database_url")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                pool = await asyncpg.create_pool(
                    url,
                    min_size=settings.db_pool_min,
                    max_size=settings.db_pool_max,
                    timeout=CONNECT_TIMEOUT_S,
                    reset=_keep_session,
                    server_settings={
                        "search_path": f"{quote_ident(schema)}, public",
                        "application_name": f"acsp-{application}",
                    },
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise SettingsError(
                "ACSP_DATABASE_URL",
                f"cannot connect to {redact_url(url)}: {describe_connect_error(error)}",
                "start PostgreSQL there or point the variable at a running server and database",
            ) from None
        log.info(
            "database pool open",
            extra={"schema": schema, "min": settings.db_pool_min, "max": settings.db_pool_max},
        )
        return cls(pool, schema, settings.db_acquire_timeout_s)

    def _wait_limit(self, timeout_s: float | None) -> float:
        limit = self.acquire_timeout_s if timeout_s is None else timeout_s
        remaining = context.remaining_s()
        return limit if remaining is None else min(limit, remaining)

    @asynccontextmanager
    async def acquire(self, timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """Lend a connection for the block; raise Unavailable if none is free in time or the
        server cannot be reached.

        The wait is ``timeout_s`` (default ACSP_DB_ACQUIRE_TIMEOUT_S), cut short by the
        current request's deadline.
        """
        limit = self._wait_limit(timeout_s)
        try:
            # asyncio.timeout cancels inside this task, so a connection handed over at the
            # same moment as the timeout is either returned here or put back by asyncpg.
            async with asyncio.timeout(limit):
                connection = await self.pool.acquire()
        except TimeoutError:
            _acquire_timeouts.add(1, {"schema": self.schema})
            raise Unavailable(
                f"no database connection became free within {limit:.3f} s "
                f"(pool of {self.pool.get_max_size()}); retry later"
            ) from None
        except CONNECT_ERRORS as error:
            # A server that stops while the service runs (a restart, a failover) makes the
            # pool reconnect on a later acquire, so callers and background loops retry.
            raise Unavailable(
                f"cannot connect to the database: {describe_connect_error(error)}; retry later"
            ) from error
        try:
            yield connection
        finally:
            # Release even when the caller is cancelled, so the pool never shrinks.
            await asyncio.shield(self.pool.release(connection))

    @asynccontextmanager
    async def transaction(
        self, isolation: str = "read_committed", readonly: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """Run the block in one transaction on a pooled connection."""
        async with self.acquire() as connection:
            async with connection.transaction(isolation=isolation, readonly=readonly):
                yield connection

    async def run_serializable(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        attempts: int = 5,
        readonly: bool = False,
    ) -> T:
        """Run ``work`` in a SERIALIZABLE transaction, retrying on conflicts.

        ``work`` may run several times, so it must only touch the database. After
        ``attempts`` serialization failures or deadlocks, raise Unavailable.
        """
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction(isolation="serializable", readonly=readonly) as conn:
                    return await work(conn)
            except RETRYABLE_ERRORS as error:
                if attempt == attempts:
                    raise Unavailable(
                        f"transaction conflicted with concurrent ones {attempts} times; retry later"
                    ) from error
                delay = _backoff_s(attempt)
                remaining = context.remaining_s()
                if remaining is not None and remaining <= delay:
                    raise Unavailable(
                        "transaction conflicted and no time is left before the deadline"
                    ) from error
                _transaction_retries.add(1, {"schema": self.schema, "sqlstate": error.sqlstate})
                log.debug(
                    "retrying transaction",
                    extra={"attempt": attempt, "sqlstate": error.sqlstate, "delay_s": delay},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the pool, waiting up to ``timeout_s`` for borrowed connections."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.pool.close()
        except TimeoutError:
            log.warning("database pool did not close in %s s; terminating it", timeout_s)
            self.pool.terminate()
        log.info("database pool closed", extra={"schema": self.schema})


def _backoff_s(attempt: int) -> float:
    # Exponential from 10 ms, capped at 0.5 s, with jitter so conflicting writers spread out.
    base: float = min(0.5, 0.01 * 2 ** (attempt - 1))
    return base * random.uniform(0.5, 1.5)


def describe_connect_error(error: BaseException) -> str:
    """Return a one-line reason for a failed connection attempt."""
    if isinstance(error, TimeoutError):
        return f"timed out after {CONNECT_TIMEOUT_S:.0f} s"
    lines = str(error).strip().splitlines()
    kind = type(error).__name__
    return f"{kind}: {lines[0]}" if lines else kind
