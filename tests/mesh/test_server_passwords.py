"""Passwords of the embedded PostgreSQL and NATS: generated, private, and required."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.errors import Error as NatsError

from acsp.mesh import passwords
from acsp.mesh.postgres import (
    HBA_CONFIG,
    EmbeddedPostgres,
    _bin_dir,
    _ensure_system_user,
    cluster_dir_for,
)
from tests.conftest import RunningMesh, make_mesh_dir

pytestmark = pytest.mark.timeout(120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _ignore_error(error: Exception) -> None:
    return None


async def _connect_nats(url: str, **credentials: str) -> nats.NATS:
    return await nats.connect(
        url,
        connect_timeout=2,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=_ignore_error,
        **credentials,
    )


def test_password_files_are_private(tmp_path: Path) -> None:
    created = passwords.postgres_password(tmp_path)
    again = passwords.postgres_password(tmp_path)

    assert created.created
    assert not again.created
    assert again.value == created.value
    assert len(created.value) >= 40
    assert _mode(created.path) == 0o600
    assert _mode(created.path.parent) == 0o700
    assert passwords.nats_password(tmp_path).value != created.value


def test_readable_password_file_is_made_private(tmp_path: Path) -> None:
    path = passwords.nats_password(tmp_path).path
    path.chmod(0o644)

    passwords.nats_password(tmp_path)

    assert _mode(path) == 0o600


def test_empty_password_file_gets_new_password(tmp_path: Path) -> None:
    path = passwords.nats_password(tmp_path).path
    path.write_text("\n")

    replaced = passwords.nats_password(tmp_path)

    assert replaced.created
    assert replaced.value
    assert path.read_text().strip() == replaced.value


@pytest.mark.asyncio(loop_scope="session")
async def test_mesh_postgres_requires_password(mesh: RunningMesh) -> None:
    info = mesh.info
    assert info.database_password_file is not None
    assert ":" not in info.database_url.split("@")[0].removeprefix("postgresql://")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(info.database_url, password="wrong", timeout=10)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(info.database_url, timeout=10)

    password = info.database_password_file.read_text().strip()
    connection = await asyncpg.connect(info.database_url, password=password, timeout=10)
    try:
        assert await connection.fetchval("SELECT current_user") == "postgres"
    finally:
        await connection.close()
    assert _mode(info.database_password_file) == 0o600


@pytest.mark.asyncio(loop_scope="session")
async def test_mesh_nats_requires_password(mesh: RunningMesh) -> None:
    info = mesh.info
    assert info.nats_user == passwords.NATS_USER
    assert info.nats_password_file is not None
    with pytest.raises(NatsError):
        await _connect_nats(info.nats_url)
    with pytest.raises(NatsError):
        await _connect_nats(info.nats_url, user=info.nats_user, password="wrong")

    password = info.nats_password_file.read_text().strip()
    client = await _connect_nats(info.nats_url, user=info.nats_user, password=password)
    try:
        await client.jetstream(timeout=5).account_info()
    finally:
        await client.close()
    assert _mode(info.nats_password_file) == 0o600
    assert _mode(info.nats_password_file.with_name("nats.conf")) == 0o600


def test_mesh_file_contains_no_password(mesh: RunningMesh) -> None:
    text = (mesh.info.data_dir / "mesh.json").read_text()
    assert mesh.info.database_password_file is not None
    assert mesh.info.nats_password_file is not None
    for path in (mesh.info.database_password_file, mesh.info.nats_password_file):
        assert path.read_text().strip() not in text


async def test_trusting_cluster_gets_password() -> None:
    # A cluster initialized as earlier versions did: every local TCP connection trusted.
    data_dir = make_mesh_dir("acsp-trust-")
    cluster = cluster_dir_for(data_dir)
    server = None
    try:
        server = EmbeddedPostgres(
            cluster,
            log_path=data_dir / "postgres.log",
            password=passwords.postgres_password(data_dir),
        )
        await asyncio.to_thread(_init_trusting_cluster, cluster, server._user)
        # The password file exists from an earlier start, so only the trusting
        # pg_hba.conf shows that the server does not know it.
        server.password = passwords.postgres_password(data_dir)
        assert not server.password.created

        await server.start(timeout_s=60)

        assert (cluster / "pg_hba.conf").read_text() == HBA_CONFIG
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(server.url(), timeout=10)
        connection = await asyncpg.connect(server.url(), password=server.password.value, timeout=10)
        await connection.close()
    finally:
        if server is not None:
            await server.stop(10)
        shutil.rmtree(cluster, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def _init_trusting_cluster(cluster: Path, user: str | None) -> None:
    cluster.mkdir(mode=0o700)
    if user is not None:
        _ensure_system_user()
        shutil.chown(cluster, user, user)
    subprocess.run(
        [str(_bin_dir() / "initdb"), "-D", str(cluster), "--auth=trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        user=user,
        timeout=120,
    )


@pytest.mark.parametrize("value", ["it's", 'say "x"', "a b", "p@ss/word"])
def test_edited_password_file_rejected(tmp_path: Path, value: str) -> None:
    # A password typed into the file by hand goes unquoted into a URL, a NATS configuration
    # file and SQL, so it may use only the characters that generated passwords use.
    path = passwords.nats_password(tmp_path).path
    path.write_text(value + "\n")

    with pytest.raises(ValueError, match="letters, digits") as raised:
        passwords.nats_password(tmp_path)

    assert str(path) in str(raised.value)
    assert value not in str(raised.value)
    assert path.read_text() == value + "\n"


async def test_failed_password_change_raises() -> None:
    # Single-user mode exits 0 after a failed statement, so only its output shows the failure.
    data_dir = make_mesh_dir("acsp-alter-")
    cluster = cluster_dir_for(data_dir)
    try:
        created = passwords.postgres_password(data_dir)
        server = EmbeddedPostgres(cluster, log_path=data_dir / "postgres.log", password=created)
        await asyncio.to_thread(server._init_cluster)
        server.password = passwords.Password("secret'value", created.path, created=True)

        with pytest.raises(RuntimeError, match="setting the password") as raised:
            await asyncio.to_thread(server._set_password_offline)

        assert "secret'value" not in str(raised.value)
    finally:
        shutil.rmtree(cluster, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
