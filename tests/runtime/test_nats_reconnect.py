"""Reconnection against a nats-server of our own that is stopped and started again."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from services.runtime.nats import Publisher, close_nats, connect_nats, ensure_stream
from services.runtime.settings import Settings
from tests.runtime.conftest import poll_until

NATS_SERVER = shutil.which("nats-server") or str(Path(__file__).parents[3] / "venv/bin/nats-server")
pytestmark = pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not found")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


StartServer = Callable[[], Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[tuple[int, StartServer]]:
    """A port and a function that starts nats-server with JetStream on it (same store)."""
    port = free_port()
    processes: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(tmp_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        processes.append(process)
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return process

    yield port, start
    for process in processes:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), timeout=10)


async def test_client_reconnects_after_server_restart(
    nats_server: tuple[int, StartServer],
) -> None:
    port, start = nats_server
    first = await start()
    settings = Settings.from_env({"ACSP_NATS_URL": f"nats://127.0.0.1:{port}"})
    client = await connect_nats(settings, "reconnect-test")
    try:
        js = client.jetstream()
        await ensure_stream(js, StreamConfig(name="RECONNECT", subjects=["reconnect.>"]))
        publisher = Publisher(js, ack_timeout_s=2.0)
        await publisher.wait([await publisher.publish("reconnect.a", b"before")])

        first.terminate()
        await asyncio.wait_for(first.wait(), timeout=10)
        await poll_until(lambda: not client.is_connected)
        await start()
        await poll_until(lambda: client.is_connected, timeout_s=20)

        await publisher.wait([await publisher.publish("reconnect.a", b"after")])
        info = await js.stream_info("RECONNECT")
    finally:
        await close_nats(client)
    assert info.state.messages == 2
