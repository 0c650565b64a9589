"""Fixtures for the scheduler service tests: a fresh PostgreSQL database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.runtime.migrations import apply_migrations
from tests.grant.conftest import running_nats

ADMIN_DSN = os.environ.get("ACSP_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
async def database_dsn() -> AsyncIterator[str]:
    """Create an empty database with the scheduler schema migrated; drop it afterwards."""
    name = f"sched_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    await apply_migrations(dsn, "scheduler", "scheduler.service.migrations")
    yield dsn
    admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_dsn, min_size=1, max_size=4, timeout=10)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Run a nats-server with JetStream on a free port for one test."""
    yield from running_nats(tmp_path)
