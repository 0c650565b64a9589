"""Connection handling against a nats-server of our own: credentials and restarts."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from services.runtime import nats as runtime_nats
from services.runtime.nats import Publisher, close_nats, connect_nats, ensure_stream
from services.runtime.settings import Settings, SettingsError
from tests.runtime.conftest import poll_until

NATS_SERVER = shutil.which("nats-server") or str(Path(__file__).parents[3] / "venv/bin/nats-server")
pytestmark = pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not found")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


StartServer = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[tuple[int, StartServer]]:
    """A port and a function that starts nats-server with JetStream on it (same store)."""
    port = free_port()
    processes: list[asyncio.subprocess.Process] = []

    async def start(*options: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(tmp_path),
            *options,
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


async def test_user_and_password_reach_server(nats_server: tuple[int, StartServer]) -> None:
    port, start = nats_server
    await start("--user", "metering", "--pass", "s3cret")
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"nats://127.0.0.1:{port}",
            "ACSP_NATS_USER": "metering",
            "ACSP_NATS_PASSWORD": "s3cret",
        }
    )
    client = await connect_nats(settings, "auth-test")
    try:
        assert client.is_connected
    finally:
        await close_nats(client)


async def test_wrong_password_names_variable(
    nats_server: tuple[int, StartServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, start = nats_server
    await start("--user", "metering", "--pass", "s3cret")
    # Several attempts, so at least one reads the server's -ERR before the connection resets.
    monkeypatch.setattr(runtime_nats, "CONNECT_TIMEOUT_S", 3.0)
    monkeypatch.setattr(runtime_nats, "RECONNECT_WAIT_S", 0.2)
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"nats://127.0.0.1:{port}",
            "ACSP_NATS_USER": "metering",
            "ACSP_NATS_PASSWORD": "wrong",
        }
    )
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, "auth-test")
    assert caught.value.variable == "ACSP_NATS_URL"
    assert "Authorization Violation" in caught.value.reason
    assert "ACSP_NATS_USER" in caught.value.fix
    assert "wrong" not in str(caught.value)


async def test_password_in_url_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_nats, "CONNECT_TIMEOUT_S", 0.5)
    settings = Settings.from_env({"ACSP_NATS_URL": f"nats://acsp:s3cret@127.0.0.1:{free_port()}"})
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, "auth-test")
    assert "s3cret" not in str(caught.value)
    assert "acsp:***@127.0.0.1" in str(caught.value)
