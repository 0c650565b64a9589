"""The embedded PostgreSQL and NATS of a local mesh, for the URLs that its config leaves unset.

Each server gets the password that :mod:`acsp.mesh.passwords` keeps in the data directory,
and :meth:`EmbeddedServers.child_env` passes the passwords to the services and the fleet. The
supervisor then removes the database URL, and with it PostgreSQL's password, from the
environment of the fleet, which uses NATS alone.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Final

from acsp.mesh import passwords
from acsp.mesh._ports import free_port, port_free
from acsp.mesh._process import ChildProcess
from acsp.mesh.nats import EmbeddedNats
from acsp.mesh.postgres import EmbeddedPostgres, cluster_dir_for

logger = logging.getLogger(__name__)

NATS_PORT_FILE: Final = "nats.port"
"""File in ``data_dir/run`` with the port of the last embedded NATS."""


class EmbeddedServers:
    """The servers that a mesh in ``data_dir`` starts itself, writing their logs to ``log_dir``."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.postgres: EmbeddedPostgres | None = None
        self.nats: EmbeddedNats | None = None

    @property
    def processes(self) -> list[ChildProcess]:
        """The server processes, PostgreSQL first."""
        return [server.process for server in (self.postgres, self.nats) if server is not None]

    async def start(
        self, database_url: str | None, nats_url: str | None, timeout_s: float
    ) -> tuple[str, str]:
        """Start a server for each URL that is None; return the URLs to use, without passwords.

        Raises the first error of a server that failed to start.
        """
        starts = []
        if database_url is None:
            self.postgres = EmbeddedPostgres(
                cluster_dir_for(self.data_dir),
                log_path=self.log_dir / "postgres.log",
                password=passwords.postgres_password(self.data_dir),
            )
            starts.append(self.postgres.start(timeout_s))
        if nats_url is None:
            self.nats = EmbeddedNats(
                self.data_dir / "nats",
                log_path=self.log_dir / "nats.log",
                password=passwords.nats_password(self.data_dir),
                port=self._nats_port(),
            )
            starts.append(self.nats.start(timeout_s))
        results = await asyncio.gather(*starts, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        if self.postgres is not None:
            database_url = self.postgres.url()
        if self.nats is not None:
            nats_url = self.nats.url
        assert database_url is not None and nats_url is not None
        return database_url, nats_url

    def child_env(self, env: dict[str, str]) -> None:
        """Set the passwords of the embedded servers in the environment ``env`` of a child."""
        if self.postgres is not None:
            env["ACSP_DATABASE_URL"] = self.postgres.url_with_password()
        if self.nats is not None:
            # The embedded server admits only its own user, whatever the caller's NATS
            # credentials are.
            env.pop("ACSP_NATS_CREDS", None)
            env["ACSP_NATS_USER"] = passwords.NATS_USER
            env["ACSP_NATS_PASSWORD"] = self.nats.password.value

    def is_server(self, child: ChildProcess) -> bool:
        """Return whether ``child`` is the embedded PostgreSQL or NATS."""
        return any(child is server.process for server in (self.postgres, self.nats) if server)

    async def prepare_restart(self, child: ChildProcess) -> None:
        """Kill what a dead PostgreSQL left running, so that ``child`` can start again."""
        if self.postgres is not None and child is self.postgres.process:
            await self.postgres.kill_leftover_backends()

    async def wait_ready_again(self, child: ChildProcess, timeout_s: float) -> bool:
        """Wait until a restarted server serves, and kill it if it does not in time.

        PostgreSQL is ready once it accepts the superuser's password, and NATS once it serves
        JetStream. Returns whether it serves. A server that exits or is killed here is left to
        the caller's watch to count and restart.
        """
        server: EmbeddedPostgres | EmbeddedNats | None = None
        for candidate in (self.postgres, self.nats):
            if candidate is not None and child is candidate.process:
                server = candidate
        assert server is not None
        try:
            await server.wait_ready(timeout_s)
        except RuntimeError:
            return False
        except TimeoutError as exc:
            logger.warning("%s; killing it to start it again", exc)
            await child.kill()
            return False
        address = server.url() if isinstance(server, EmbeddedPostgres) else server.url
        logger.info("%s serves again at %s (pid %s)", child.name, address, child.pid)
        return True

    async def stop(self, grace_s: float) -> None:
        """Stop NATS and PostgreSQL together."""
        servers = [server for server in (self.nats, self.postgres) if server is not None]
        await asyncio.gather(*(server.stop(grace_s) for server in servers))

    def _nats_port(self) -> int:
        """Pick the port of the embedded NATS: the one of the last start if it is still free.

        Agents started by hand with ``--nats-url`` then reconnect to a mesh started again.
        """
        path = self.data_dir / "run" / NATS_PORT_FILE
        try:
            port: int | None = int(path.read_text())
        except (OSError, ValueError):
            port = None
        if port is None or not 0 < port < 65536 or not port_free(port):
            port = free_port()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{port}\n")
        return port
