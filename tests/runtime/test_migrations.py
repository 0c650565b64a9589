"""The migration runner against the local PostgreSQL: once only, locked, checked."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from services.runtime.db import quote_ident
from services.runtime.migrations import MigrationError, apply_migrations, load_migrations
from tests.runtime.conftest import TEST_DSN

PACKAGE = "tests.runtime.sample_migrations"


async def fetch(schema: str, query: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(TEST_DSN, timeout=10)
    try:
        await connection.execute(f"SET search_path TO {quote_ident(schema)}")
        return await connection.fetch(query)
    finally:
        await connection.close()


def test_files_load_in_version_order() -> None:
    migrations = load_migrations(PACKAGE)
    assert [(m.version, m.name) for m in migrations] == [(1, "accounts"), (2, "account_owner")]
    assert all(len(m.checksum) == 64 for m in migrations)


async def test_apply_creates_schema_and_records_versions(fresh_schema: str) -> None:
    applied = await apply_migrations(TEST_DSN, fresh_schema, PACKAGE)
    again = await apply_migrations(TEST_DSN, fresh_schema, PACKAGE)
    rows = await fetch(fresh_schema, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert applied == [1, 2]
    assert again == []
    assert [(row["version"], row["name"]) for row in rows] == [
        (1, "accounts"),
        (2, "account_owner"),
    ]


async def test_concurrent_starts_apply_each_migration_once(fresh_schema: str) -> None:
    results = await asyncio.gather(
        *(apply_migrations(TEST_DSN, fresh_schema, PACKAGE) for _ in range(4))
    )
    applied = sorted(version for result in results for version in result)
    runs = await fetch(fresh_schema, "SELECT count(*) AS n FROM migration_runs")
    assert applied == [1, 2]
    # 002 inserts one row each time it runs.
    assert runs[0]["n"] == 1


REPOSITORY = str(Path(__file__).resolve().parents[2])


async def test_two_processes_migrate_once(fresh_schema: str) -> None:
    environ = {
        "PYTHONPATH": REPOSITORY,
        "PATH": "/usr/bin:/bin",
    }
    script = (
        "import asyncio\n"
        "from services.runtime.migrations import apply_migrations\n"
        f"print(asyncio.run(apply_migrations({TEST_DSN!r}, {fresh_schema!r}, {PACKAGE!r})))\n"
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, env=environ, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [
        (await asyncio.wait_for(process.communicate(), timeout=60))[0].decode().strip()
        for process in processes
    ]
    assert sorted(outputs) == ["[1, 2]", "[]"]
    assert all(process.returncode == 0 for process in processes)
    runs = await fetch(fresh_schema, "SELECT count(*) AS n FROM migration_runs")
    assert runs[0]["n"] == 1


@pytest.fixture
def temporary_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    name = f"migrations_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield folder
    sys.modules.pop(name, None)


async def test_edited_applied_migration_stops_start(
    fresh_schema: str, temporary_package: Path
) -> None:
    (temporary_package / "001_first.sql").write_text("CREATE TABLE first (id int);")
    await apply_migrations(TEST_DSN, fresh_schema, temporary_package.name)
    (temporary_package / "001_first.sql").write_text("CREATE TABLE first (id bigint);")
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(TEST_DSN, fresh_schema, temporary_package.name)
    assert "001_first.sql: changed after it was applied" in str(caught.value)
    assert "new migration" in str(caught.value)


async def test_failing_migration_applies_nothing_of_itself(
    fresh_schema: str, temporary_package: Path
) -> None:
    (temporary_package / "001_first.sql").write_text("CREATE TABLE first (id int);")
    (temporary_package / "002_broken.sql").write_text(
        "CREATE TABLE second (id int); INSERT INTO missing_table VALUES (1);"
    )
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(TEST_DSN, fresh_schema, temporary_package.name)
    tables = await fetch(
        fresh_schema,
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_schema = '{fresh_schema}' ORDER BY table_name",
    )
    assert "002_broken.sql" in str(caught.value)
    assert [row["table_name"] for row in tables] == ["first", "schema_migrations"]


def test_misnamed_file_is_rejected(temporary_package: Path) -> None:
    (temporary_package / "1_first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError) as caught:
        load_migrations(temporary_package.name)
    assert "is not named NNN_name.sql" in str(caught.value)


def test_duplicate_version_is_rejected(temporary_package: Path) -> None:
    (temporary_package / "001_first.sql").write_text("SELECT 1;")
    (temporary_package / "001_second.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError) as caught:
        load_migrations(temporary_package.name)
    assert "same version" in str(caught.value)
