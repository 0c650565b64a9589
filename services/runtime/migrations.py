"""Numbered SQL migrations applied to a service's own schema at start.

A service keeps its migrations in a package folder, e.g. ``services/grant/migrations/``, as
``NNN_name.sql`` files (three digits, lowercase name). At start the server calls::

    await apply_migrations(database_url, schema="grant", package="services.grant.migrations")

which, holding a PostgreSQL advisory lock keyed by the schema, creates the schema and its
``schema_migrations`` table, then applies each file not yet recorded there in version order,
each in its own transaction with ``search_path`` set to the schema. Processes that start at the
same moment wait on the lock, so each migration runs exactly once. A file edited after it was
applied stops the start: add a new migration instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg

from services.runtime.db import CONNECT_TIMEOUT_S, describe_connect_error, quote_ident
from services.runtime.errors import StartupError
from services.runtime.settings import SettingsError, redact_url

log = logging.getLogger(__name__)

FILE_PATTERN: Final = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# First key of the two-int advisory lock: "acsp" in ASCII, so other users of advisory
# locks in the same database do not collide with ours.
LOCK_NAMESPACE: Final = 0x61637370
DEFAULT_LOCK_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class Migration:
    """One SQL file: its version, name, text and SHA-256 checksum."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


class MigrationError(StartupError):
    """The migrations cannot be applied; the message names the file and the fix."""


def load_migrations(package: str) -> list[Migration]:
    """Read every ``NNN_name.sql`` in ``package``, sorted by version.

    Raise MigrationError on a ``.sql`` file with another name or two files with one version.
    """
    found: dict[int, Migration] = {}
    for entry in resources.files(package).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = FILE_PATTERN.match(entry.name)
        if match is None:
            raise MigrationError(
                f"{package}/{entry.name}",
                "is not named NNN_name.sql",
                "rename it with a three-digit version and a lowercase name, e.g. 004_add_holds.sql",
            )
        version = int(match.group(1))
        text = entry.read_text(encoding="utf-8")
        migration = Migration(
            version=version,
            name=match.group(2),
            sql=text,
            checksum=hashlib.sha256(text.encode()).hexdigest(),
        )
        if version in found:
            raise MigrationError(
                f"{package}/{entry.name}",
                f"has the same version as {found[version].filename}",
                "give each migration its own version number",
            )
        found[version] = migration
    return [found[version] for version in sorted(found)]


async def apply_migrations(
    database_url: str,
    schema: str,
    package: str,
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[int]:
    """Apply the pending migrations of ``package`` to ``schema``; return the versions applied.

    Opens its own connection, so closing it releases the advisory lock even when a migration
    fails or the caller is cancelled.
    """
    migrations = load_migrations(package)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            connection = await asyncpg.connect(database_url)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise SettingsError(
            "ACSP_DATABASE_URL",
            f"cannot connect to {redact_url(database_url)}: {describe_connect_error(error)}",
            "start PostgreSQL there or point the variable at a running server and database",
        ) from None
    try:
        await _lock(connection, schema, lock_timeout_s)
        applied = await _ensure_table(connection, schema)
        _check_applied(migrations, applied, schema, package)
        done: list[int] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await _apply_one(connection, schema, migration)
            done.append(migration.version)
        return done
    finally:
        # Closing the session releases the advisory lock even if the unlock never ran.
        await asyncio.shield(connection.close(timeout=CONNECT_TIMEOUT_S))


async def _lock(connection: asyncpg.Connection, schema: str, timeout_s: float) -> None:
    key = _lock_key(schema)
    try:
        await connection.execute(
            "SELECT pg_advisory_lock($1, $2)", LOCK_NAMESPACE, key, timeout=timeout_s
        )
    except TimeoutError:
        raise MigrationError(
            f"schema {schema}",
            f"another process held the migration lock for over {timeout_s:.0f} s",
            "check for a stuck service start (pg_locks, locktype advisory) and restart",
        ) from None


def _lock_key(schema: str) -> int:
    # pg_advisory_lock(int, int) takes signed 32-bit keys.
    value = zlib.crc32(schema.encode())
    return value - 2**32 if value >= 2**31 else value


async def _ensure_table(connection: asyncpg.Connection, schema: str) -> dict[int, str]:
    quoted = quote_ident(schema)
    await connection.execute(
        f"""
        CREATE SCHEMA IF NOT EXISTS {quoted};
        CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )
    rows = await connection.fetch(f"SELECT version, checksum FROM {quoted}.schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _check_applied(
    migrations: list[Migration], applied: dict[int, str], schema: str, package: str
) -> None:
    known = {migration.version: migration for migration in migrations}
    for version, checksum in applied.items():
        migration = known.get(version)
        if migration is None:
            log.warning(
                "schema has a migration this code does not know; a newer version applied it",
                extra={"schema": schema, "version": version},
            )
            continue
        if migration.checksum != checksum:
            raise MigrationError(
                f"{package}/{migration.filename}",
                f"changed after it was applied to schema {schema}",
                "restore the applied text and put the change in a new migration",
            )


async def _apply_one(connection: asyncpg.Connection, schema: str, migration: Migration) -> None:
    quoted = quote_ident(schema)
    try:
        async with connection.transaction():
            await connection.execute(f"SET LOCAL search_path TO {quoted}, public")
            await connection.execute(migration.sql)
            await connection.execute(
                f"INSERT INTO {quoted}.schema_migrations (version, name, checksum) "
                "VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as error:
        raise MigrationError(
            migration.filename,
            f"failed on schema {schema}: {type(error).__name__}: {error}",
            "fix the SQL; nothing of this file was applied",
        ) from None
    log.info(
        "migration applied",
        extra={"schema": schema, "version": migration.version, "migration": migration.name},
    )
