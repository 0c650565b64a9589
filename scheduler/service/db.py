"""Schema migrations of the ``scheduler`` schema, applied at start under an advisory lock."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

logger = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x5C4ED0  # any constant shared by every scheduler replica
SCHEMA = "scheduler"


async def migrate(conn: asyncpg.Connection, timeout_s: float = 60.0) -> list[str]:
    """Apply the numbered SQL files in ``migrations/`` not applied yet; return their names."""
    files = sorted(
        (entry.name, entry.read_text())
        for entry in resources.files("scheduler.service.migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=timeout_s)
        await conn.execute(
            f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};"
            f" CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            timeout=timeout_s,
        )
        done = {row[0] for row in await conn.fetch(f"SELECT name FROM {SCHEMA}.schema_migrations")}
        for name, sql in files:
            if name in done:
                continue
            await conn.execute(sql, timeout=timeout_s)
            await conn.execute(f"INSERT INTO {SCHEMA}.schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
            logger.info("applied migration %s", name)
    return applied
