"""The bounded pool and the SERIALIZABLE helper against the local PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from services.runtime import context
from services.runtime.db import Database, quote_ident
from services.runtime.errors import Unavailable
from services.runtime.settings import Settings, SettingsError
from tests.runtime.conftest import TEST_DSN

POOL_MAX = 3


@pytest.fixture
async def database(fresh_schema: str) -> AsyncIterator[Database]:
    settings = Settings.from_env(
        {
            "ACSP_DATABASE_URL": TEST_DSN,
            "ACSP_DB_POOL_MIN": "1",
            "ACSP_DB_POOL_MAX": str(POOL_MAX),
            "ACSP_DB_ACQUIRE_TIMEOUT_S": "0.2",
        }
    )
    connection = await asyncpg.connect(TEST_DSN, timeout=10)
    try:
        await connection.execute(f"CREATE SCHEMA {quote_ident(fresh_schema)}")
        await connection.execute(
            f"CREATE TABLE {quote_ident(fresh_schema)}.counters "
            "(id text PRIMARY KEY, value NUMERIC(48, 24) NOT NULL)"
        )
    finally:
        await connection.close()
    db = await Database.connect(settings, fresh_schema, "runtime-test")
    yield db
    await db.close()


async def test_search_path_is_service_schema(database: Database) -> None:
    async with database.acquire() as connection:
        await connection.execute("INSERT INTO counters VALUES ('a', 1.5)")
        value = await connection.fetchval("SELECT value FROM counters WHERE id = 'a'")
    assert value == Decimal("1.5")


async def test_timed_out_acquisitions_leave_pool_usable(database: Database) -> None:
    borrowed = [await database.pool.acquire() for _ in range(POOL_MAX)]

    async def try_acquire() -> None:
        async with database.acquire():
            raise AssertionError("no connection should be free")

    results = await asyncio.gather(*(try_acquire() for _ in range(50)), return_exceptions=True)
    assert all(isinstance(result, Unavailable) for result in results), results
    assert "no database connection became free within 0.200 s" in str(results[0])
    assert database.pool.get_size() <= POOL_MAX
    for connection in borrowed:
        await database.pool.release(connection)
    # Every connection comes back: POOL_MAX callers can hold one at the same time.
    async with asyncio.timeout(5):
        async with database.acquire() as first, database.acquire() as second:
            async with database.acquire() as third:
                values = [await c.fetchval("SELECT 1") for c in (first, second, third)]
    assert values == [1, 1, 1]
    assert database.pool.get_size() <= POOL_MAX
    assert database.pool.get_idle_size() == database.pool.get_size()


async def test_cancelled_acquisitions_leave_pool_usable(database: Database) -> None:
    borrowed = await database.pool.acquire()
    waiters = [
        asyncio.ensure_future(database.acquire(timeout_s=10).__aenter__()) for _ in range(20)
    ]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    await database.pool.release(borrowed)
    leaked = [result for result in results if isinstance(result, asyncpg.Connection)]
    assert all(isinstance(result, asyncio.CancelledError) for result in results), leaked
    async with asyncio.timeout(5):
        async with database.acquire() as a, database.acquire() as b, database.acquire() as c:
            assert [await x.fetchval("SELECT 2") for x in (a, b, c)] == [2, 2, 2]


async def test_acquire_wait_is_cut_by_request_deadline(database: Database) -> None:
    borrowed = [await database.pool.acquire() for _ in range(POOL_MAX)]
    token = context.set_deadline(time.monotonic() + 0.05)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            async with database.acquire(timeout_s=5):
                pass
        waited = time.monotonic() - started
    finally:
        context.reset_deadline(token)
        for connection in borrowed:
            await database.pool.release(connection)
    assert waited < 1.0


async def test_serializable_retries_conflicting_increments(database: Database) -> None:
    async with database.acquire() as connection:
        await connection.execute("INSERT INTO counters VALUES ('c', 0)")
    attempts = 0
    both_read = asyncio.Barrier(2)

    async def increment(connection: asyncpg.Connection) -> None:
        nonlocal attempts
        attempts += 1
        value = await connection.fetchval("SELECT value FROM counters WHERE id = 'c'")
        if attempts <= 2:
            # Both first attempts read before either writes, so one must fail to serialize.
            await asyncio.wait_for(both_read.wait(), timeout=5)
        await connection.execute("UPDATE counters SET value = $1 WHERE id = 'c'", value + 1)

    await asyncio.gather(database.run_serializable(increment), database.run_serializable(increment))
    async with database.acquire() as connection:
        final = await connection.fetchval("SELECT value FROM counters WHERE id = 'c'")
    assert final == Decimal(2)
    assert attempts == 3


async def test_serializable_gives_up_after_attempts(database: Database) -> None:
    calls = 0

    async def always_conflicts(connection: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.SerializationError("could not serialize access")

    with pytest.raises(Unavailable):
        await database.run_serializable(always_conflicts, attempts=3)
    assert calls == 3


async def test_unreachable_database_names_variable() -> None:
    settings = Settings.from_env({"ACSP_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"})
    with pytest.raises(SettingsError) as caught:
        await Database.connect(settings, "unused", "runtime-test")
    assert caught.value.variable == "ACSP_DATABASE_URL"
    assert "Connect call failed" in str(caught.value)


async def test_acquire_from_stopped_server_is_unavailable() -> None:
    # A server that stops while the service runs (a restart, a failover) must not end the
    # background loops, which retry on Unavailable, nor reach callers as INTERNAL.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/test", min_size=0, max_size=1
    )
    database = Database(pool, "unused", acquire_timeout_s=5.0)
    try:
        with pytest.raises(Unavailable) as caught:
            async with database.acquire():
                raise AssertionError("no server listens, so no connection is lent")
    finally:
        await database.close()
    assert "cannot connect to the database" in caught.value.message
    assert "retry later" in caught.value.message
