"""TLS and inbox prefixes on the NATS connection, against nats-server processes of our own.

Each test writes a server config with certificates from :mod:`services.runtime.tls`, starts
nats-server on free ports and checks from the server's monitoring endpoint (``/connz``) what
the connection really used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from services.runtime import nats as runtime_nats
from services.runtime.nats import close_nats, connect_nats
from services.runtime.settings import Settings, SettingsError
from services.runtime.tls import CertPaths, ensure_local_pki, load_nats_ssl_context
from tests.runtime.conftest import SampleFactory, poll_until
from tests.runtime.test_nats_reconnect import NATS_SERVER, free_port

pytestmark = pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="nats-server not found")

CLIENT_NAME = "tls-test"


class NatsProcess:
    """A nats-server started from a config file, with its client and monitoring ports."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, http_port: int) -> None:
        self.process = process
        self.port = port
        self.http_port = http_port

    async def connections(self) -> list[dict[str, Any]]:
        """Return the server's client connections as ``/connz`` lists them."""
        url = f"http://127.0.0.1:{self.http_port}/connz"

        def fetch() -> dict[str, Any]:
            with urllib.request.urlopen(url, timeout=5) as response:
                result: dict[str, Any] = json.load(response)
                return result

        return list((await asyncio.to_thread(fetch)).get("connections") or [])

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), timeout=10)


StartNats = Callable[..., Awaitable[NatsProcess]]


@pytest.fixture
async def start_nats(tmp_path: Path) -> AsyncIterator[StartNats]:
    """A function that starts nats-server with ``tls`` and ``extra`` config on free ports."""
    started: list[NatsProcess] = []

    async def start(
        tls: CertPaths | None = None,
        *,
        verify: bool = False,
        extra: str = "",
        port: int | None = None,
    ) -> NatsProcess:
        port = port or free_port()
        http_port = free_port()
        lines = [f"listen: 127.0.0.1:{port}", f"http: 127.0.0.1:{http_port}"]
        if tls is not None:
            lines += [
                "tls {",
                f'  cert_file: "{tls.cert}"',
                f'  key_file: "{tls.key}"',
                f'  ca_file: "{tls.ca}"',
                f"  verify: {'true' if verify else 'false'}",
                "  timeout: 2",
                "}",
            ]
        lines.append(extra)
        config = tmp_path / f"nats-{port}-{len(started)}.conf"
        config.write_text("\n".join(lines) + "\n")
        process = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        server = NatsProcess(process, port, http_port)
        started.append(server)
        async with asyncio.timeout(10):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"nats-server exited with {process.returncode}: {config}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", http_port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, CertPaths]:
    """The CA, a certificate for the NATS server, one for a service and one for a client."""
    return ensure_local_pki(tmp_path / "acsp", services=["nats", "metering"], clients=["agent"])


@pytest.fixture
def other_pki(tmp_path: Path) -> dict[str, CertPaths]:
    """A second, unrelated CA with a client certificate of its own."""
    return ensure_local_pki(tmp_path / "other", services=[], clients=["agent"])


def service_tls(pki: dict[str, CertPaths]) -> dict[str, str]:
    paths = pki["metering"]
    return {
        "ACSP_TLS_CA": str(paths.ca),
        "ACSP_TLS_CERT": str(paths.cert),
        "ACSP_TLS_KEY": str(paths.key),
    }


@pytest.fixture
def short_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough for at least one rejected attempt on a loaded machine.
    monkeypatch.setattr(runtime_nats, "CONNECT_TIMEOUT_S", 3.0)


async def connection_named(server: NatsProcess, name: str) -> dict[str, Any]:
    matching = [entry for entry in await server.connections() if entry.get("name") == name]
    assert len(matching) == 1, f"expected one connection named {name}, got {matching}"
    return matching[0]


# TLS.


async def test_tls_url_trusts_service_ca_by_default(
    start_nats: StartNats, pki: dict[str, CertPaths]
) -> None:
    server = await start_nats(pki["nats"])
    settings = Settings.from_env(
        {"ACSP_NATS_URL": f"tls://127.0.0.1:{server.port}", **service_tls(pki)}
    )
    client = await connect_nats(settings, "tls-test")
    try:
        await client.flush(timeout=5)
        connection = await connection_named(server, f"acsp-{CLIENT_NAME}")
    finally:
        await close_nats(client)
    assert connection.get("tls_version", "").startswith("1.")
    assert connection.get("tls_cipher_suite")


async def test_client_certificate_reaches_verifying_server(
    start_nats: StartNats, pki: dict[str, CertPaths], short_connect_timeout: None
) -> None:
    server = await start_nats(pki["nats"], verify=True)
    url = f"tls://127.0.0.1:{server.port}"
    without_cert = Settings.from_env(
        {"ACSP_NATS_URL": url, "ACSP_NATS_TLS_CA": str(pki["nats"].ca)}
    )
    with pytest.raises(SettingsError) as rejected:
        await connect_nats(without_cert, CLIENT_NAME)
    with_cert = Settings.from_env(
        {
            "ACSP_NATS_URL": url,
            "ACSP_NATS_TLS_CA": str(pki["agent"].ca),
            "ACSP_NATS_TLS_CERT": str(pki["agent"].cert),
            "ACSP_NATS_TLS_KEY": str(pki["agent"].key),
        }
    )
    client = await connect_nats(with_cert, CLIENT_NAME)
    try:
        await client.flush(timeout=5)
        connection = await connection_named(server, f"acsp-{CLIENT_NAME}")
    finally:
        await close_nats(client)
    assert rejected.value.variable == "ACSP_NATS_URL"
    assert connection.get("tls_version", "").startswith("1.")


async def test_server_of_unknown_ca_is_rejected(
    start_nats: StartNats,
    pki: dict[str, CertPaths],
    other_pki: dict[str, CertPaths],
    short_connect_timeout: None,
) -> None:
    server = await start_nats(pki["nats"])
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"tls://127.0.0.1:{server.port}",
            "ACSP_NATS_TLS_CA": str(other_pki["agent"].ca),
        }
    )
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, CLIENT_NAME)
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.reason
    assert "ACSP_NATS_TLS_" in caught.value.fix


async def test_plaintext_server_is_rejected_for_tls_url(
    start_nats: StartNats, pki: dict[str, CertPaths], short_connect_timeout: None
) -> None:
    server = await start_nats()
    settings = Settings.from_env(
        {"ACSP_NATS_URL": f"tls://127.0.0.1:{server.port}", **service_tls(pki)}
    )
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, CLIENT_NAME)
    assert "does not offer TLS" in caught.value.reason
    assert await server.connections() == []


async def test_tls_settings_require_tls_on_nats_url(
    start_nats: StartNats, pki: dict[str, CertPaths], short_connect_timeout: None
) -> None:
    server = await start_nats()
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"nats://127.0.0.1:{server.port}",
            "ACSP_NATS_TLS_CA": str(pki["nats"].ca),
        }
    )
    with pytest.raises(SettingsError) as caught:
        await connect_nats(settings, CLIENT_NAME)
    assert "does not offer TLS" in caught.value.reason


async def test_password_is_not_sent_to_plaintext_server(
    pki: dict[str, CertPaths], short_connect_timeout: None
) -> None:
    # A listener that speaks the first line of the NATS protocol without offering TLS, as a
    # man in the middle that clears tls_required would, and records what the client sends.
    received = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "fake", "version": "2.10.0", "proto": 1, "auth_required": True}
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        await writer.drain()
        try:
            async with asyncio.timeout(1):
                while chunk := await reader.read(4096):
                    received.extend(chunk)
        except TimeoutError:
            pass
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"tls://127.0.0.1:{port}",
            "ACSP_NATS_USER": "metering",
            "ACSP_NATS_PASSWORD": "s3cret-password",
            **service_tls(pki),
        }
    )
    try:
        with pytest.raises(SettingsError) as caught:
            await connect_nats(settings, CLIENT_NAME)
    finally:
        listener.close()
        await listener.wait_closed()
    assert "does not offer TLS" in caught.value.reason
    assert b"s3cret-password" not in received
    assert b"CONNECT" not in received


async def test_reconnect_to_plaintext_server_is_rejected(
    start_nats: StartNats, pki: dict[str, CertPaths], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime.nats")
    tls_server = await start_nats(pki["nats"])
    settings = Settings.from_env(
        {"ACSP_NATS_URL": f"tls://127.0.0.1:{tls_server.port}", **service_tls(pki)}
    )
    client = await connect_nats(settings, CLIENT_NAME)
    try:
        await tls_server.stop()
        await poll_until(lambda: not client.is_connected)
        plain_server = await start_nats(port=tls_server.port)
        await poll_until(
            lambda: any("does not offer TLS" in record.getMessage() for record in caplog.records),
            timeout_s=20,
        )
        connected_in_plaintext = client.is_connected
        # A rejected attempt may leave its socket open until the next one, but it never sent
        # CONNECT, which carries the client name.
        plain_connections = await plain_server.connections()
    finally:
        await close_nats(client, timeout_s=2)
    assert not connected_in_plaintext
    assert [entry for entry in plain_connections if entry.get("name")] == []


# Settings and files.


def test_nats_url_without_tls_settings_stays_plaintext(pki: dict[str, CertPaths]) -> None:
    settings = Settings.from_env({"ACSP_NATS_URL": "nats://127.0.0.1:4222", **service_tls(pki)})
    assert settings.nats_tls_required is False
    assert load_nats_ssl_context(settings) is None


def test_tls_url_without_any_ca_uses_system_trust() -> None:
    settings = Settings.from_env({"ACSP_NATS_URL": "tls://nats.example.org:4222"})
    context = load_nats_ssl_context(settings)
    assert context is not None
    assert context.check_hostname is True
    assert context.cert_store_stats()["x509_ca"] > 0


def test_nats_tls_cert_without_key_names_key(pki: dict[str, CertPaths]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "ACSP_NATS_URL": "tls://127.0.0.1:4222",
                "ACSP_NATS_TLS_CERT": str(pki["agent"].cert),
            }
        )
    assert caught.value.variable == "ACSP_NATS_TLS_KEY"


def test_nats_tls_ca_that_is_not_pem_names_variable(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    settings = Settings.from_env(
        {"ACSP_NATS_URL": "tls://127.0.0.1:4222", "ACSP_NATS_TLS_CA": str(not_pem)}
    )
    with pytest.raises(SettingsError) as caught:
        load_nats_ssl_context(settings)
    assert caught.value.variable == "ACSP_NATS_TLS_CA"
    assert str(not_pem) in str(caught.value)


def test_default_ca_that_is_not_pem_names_tls_ca(tmp_path: Path, pki: dict[str, CertPaths]) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": "tls://127.0.0.1:4222",
            **service_tls(pki),
            "ACSP_TLS_CA": str(not_pem),
        }
    )
    with pytest.raises(SettingsError) as caught:
        load_nats_ssl_context(settings)
    assert caught.value.variable == "ACSP_TLS_CA"


def test_mismatched_nats_key_names_key(
    pki: dict[str, CertPaths], other_pki: dict[str, CertPaths]
) -> None:
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": "tls://127.0.0.1:4222",
            "ACSP_NATS_TLS_CERT": str(pki["agent"].cert),
            "ACSP_NATS_TLS_KEY": str(other_pki["agent"].key),
        }
    )
    with pytest.raises(SettingsError) as caught:
        load_nats_ssl_context(settings)
    assert caught.value.variable == "ACSP_NATS_TLS_KEY"
    assert "does not match" in caught.value.reason


def test_missing_nats_tls_file_names_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "ACSP_NATS_URL": "tls://127.0.0.1:4222",
                "ACSP_NATS_TLS_CA": str(tmp_path / "absent.crt"),
            }
        )
    assert caught.value.variable == "ACSP_NATS_TLS_CA"
    assert "does not exist" in caught.value.reason


def test_tls_settings_with_plain_websocket_url_are_rejected(pki: dict[str, CertPaths]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"ACSP_NATS_URL": "ws://127.0.0.1:8080", "ACSP_NATS_TLS_CA": str(pki["nats"].ca)}
        )
    assert caught.value.variable == "ACSP_NATS_URL"
    assert "wss://" in caught.value.fix


# Inbox prefix.

PROVIDER_PERMISSIONS = """
jetstream {{ store_dir: "{store}" }}
authorization {{
  users: [
    {{ user: admin, password: admin-pass }}
    {{
      user: alpha
      password: alpha-pass
      permissions: {{
        publish: {{ allow: ["acsp.usage.alpha.>"] }}
        subscribe: {{ allow: ["_INBOX.alpha.>"] }}
      }}
    }}
  ]
}}
"""


@pytest.fixture
async def provider_server(start_nats: StartNats, tmp_path: Path) -> AsyncIterator[NatsProcess]:
    """A server where user ``alpha`` may only read ``_INBOX.alpha.>``, with a usage stream."""
    server = await start_nats(extra=PROVIDER_PERMISSIONS.format(store=tmp_path / "js"))
    admin = await connect_as(server, "admin", "admin-pass")
    try:
        await admin.jetstream().add_stream(
            StreamConfig(name="USAGE_ALPHA", subjects=["acsp.usage.alpha.>"])
        )
    finally:
        await close_nats(admin)
    yield server


async def connect_as(
    server: NatsProcess, user: str, password: str, inbox_prefix: str | None = None
) -> Client:
    settings = Settings.from_env(
        {
            "ACSP_NATS_URL": f"nats://127.0.0.1:{server.port}",
            "ACSP_NATS_USER": user,
            "ACSP_NATS_PASSWORD": password,
        }
    )
    return await connect_nats(settings, f"inbox-{user}", inbox_prefix=inbox_prefix)


async def test_inbox_prefix_receives_jetstream_acks(provider_server: NatsProcess) -> None:
    client = await connect_as(provider_server, "alpha", "alpha-pass", inbox_prefix="_INBOX.alpha")
    try:
        ack = await client.jetstream().publish("acsp.usage.alpha.r1.n1", b"sample", timeout=5)
        reply_inbox = client.new_inbox()
    finally:
        await close_nats(client)
    assert ack.stream == "USAGE_ALPHA"
    assert ack.seq == 1
    assert reply_inbox.startswith("_INBOX.alpha.")


async def test_default_inbox_gets_no_ack_under_provider_permissions(
    provider_server: NatsProcess,
) -> None:
    client = await connect_as(provider_server, "alpha", "alpha-pass")
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await client.jetstream().publish("acsp.usage.alpha.r1.n1", b"sample", timeout=1)
    finally:
        await close_nats(client)


@pytest.mark.parametrize("prefix", ["", "_INBOX.", "_INBOX.*", "_INBOX.>", "_INBOX. alpha"])
async def test_invalid_inbox_prefix_is_rejected(prefix: str) -> None:
    settings = Settings.from_env({"ACSP_NATS_URL": "nats://127.0.0.1:4222"})
    with pytest.raises(ValueError, match="inbox_prefix"):
        await connect_nats(settings, CLIENT_NAME, inbox_prefix=prefix)


async def test_service_connects_to_tls_nats_at_start(
    start_nats: StartNats, pki: dict[str, CertPaths], sample_factory: SampleFactory
) -> None:
    server = await start_nats(pki["nats"])
    sample = await sample_factory(
        ACSP_NATS_URL=f"tls://127.0.0.1:{server.port}", **service_tls(pki)
    )
    runtime = sample.service.runtime
    assert runtime is not None
    assert runtime.nats is not None
    await runtime.nats.flush(timeout=5)
    connection = await connection_named(server, "acsp-sample")
    assert connection.get("tls_version", "").startswith("1.")


def test_tls_ca_alone_points_to_nats_tls_ca(pki: dict[str, CertPaths]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"ACSP_NATS_URL": "tls://127.0.0.1:4222", "ACSP_TLS_CA": str(pki["nats"].ca)}
        )
    assert caught.value.variable == "ACSP_TLS_CERT"
    assert "ACSP_NATS_TLS_CA" in caught.value.fix
