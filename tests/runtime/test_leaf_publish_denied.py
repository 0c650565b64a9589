"""Publishes that a leaf node's user on the hub may not make are rejected for good.

The network tests run a hub nats-server with JetStream and a leaf node of their own. The
leaf's user on the hub may not publish to one subject that a stream captures, while the
clients' user on the leaf may publish anywhere, so the client sees no permissions violation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import nats
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from agents.dead_letters import DeadLetters
from agents.outbox import Outbox
from agents.spool import Spool
from services.runtime import denied_subjects
from services.runtime.denied_subjects import (
    DeniedSubjects,
    dropped_reason,
    dropped_streams,
)
from services.runtime.jetstream import Publisher
from services.runtime.nats import TlsCheckingClient
from services.runtime.publish_errors import Message
from tests.agent.natsserver import NatsServer, free_port, stored_message_ids

pytestmark = pytest.mark.timeout(120)

STREAM = "FENCED"
ALLOWED = "fenced.open"
DENIED = "fenced.closed"
DOMAIN = "hub"


# Without network.


def test_denied_subject_logged_once_per_spacing(caplog: pytest.LogCaptureFixture) -> None:
    counts = DeniedSubjects(log_spacing_s=3600.0)
    caplog.set_level(logging.WARNING, denied_subjects.__name__)
    reason = dropped_reason(DENIED, STREAM)

    counts.record(DENIED, reason, 2)
    counts.record(DENIED, reason, 3)
    counts.record(ALLOWED, "another reason", 1)

    assert counts.total == 6
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(f"2 messages on {DENIED} rejected for good")
    assert f"publish permission for {DENIED}" in lines[0]
    assert f"stream {STREAM}" in lines[0]
    assert lines[1].startswith(f"1 messages on {ALLOWED} rejected for good")
    assert lines[1].endswith("another reason")


def test_denied_subject_logs_again_after_spacing(caplog: pytest.LogCaptureFixture) -> None:
    counts = DeniedSubjects(log_spacing_s=0.0)
    caplog.set_level(logging.WARNING, denied_subjects.__name__)

    counts.record(DENIED, "a reason", 1)
    counts.record(DENIED, "a reason", 1)

    assert len(caplog.records) == 2


def test_denied_subjects_keep_newest() -> None:
    counts = DeniedSubjects(log_spacing_s=3600.0, max_subjects=1)

    counts.record(DENIED, "a reason", 1)
    counts.record(ALLOWED, "a reason", 1)

    assert list(counts._reports) == [ALLOWED]


# With a hub and a leaf node.


@dataclass(frozen=True)
class LeafMesh:
    hub: NatsServer
    leaf: NatsServer


def write_configs(directory: Path, leaf_port: int) -> tuple[Path, Path]:
    """Write the hub's and the leaf's configuration, with the leaf's user denied DENIED."""
    directory.mkdir(parents=True, exist_ok=True)
    hub = directory / "hub.conf"
    store = json.dumps(str(directory / "jetstream"))
    hub.write_text(
        f'jetstream {{ store_dir: {store}, domain: "{DOMAIN}" }}\n'
        f'leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}\n'
        "accounts { ACSP { jetstream: enabled, users: [\n"
        "  { user: admin, password: admin }\n"
        "  { user: leaf, password: leaf, permissions: "
        f'{{ publish: {{ allow: [">"], deny: ["{DENIED}"] }}, subscribe: ">" }} }}\n'
        "] } }\n"
    )
    leaf = directory / "leaf.conf"
    leaf.write_text(
        f'leafnodes {{ remotes: [ {{ url: "nats-leaf://leaf:leaf@127.0.0.1:{leaf_port}", '
        "account: ACSP } ] }\n"
        "accounts { ACSP {\n"
        f'  mappings: {{ "$JS.API.>": "$JS.{DOMAIN}.API.>" }}\n'
        "  users: [ { user: agent, password: agent } ]\n"
        "} }\n"
    )
    return hub, leaf


async def wait_for_stream_through(client: Client, timeout_s: float) -> None:
    """Poll until JetStream's API replies through the leaf, once the leaf has joined the hub."""
    js = client.jetstream(timeout=1.0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await js.stream_info(STREAM)
            return
        except (NatsError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def leaf_mesh(tmp_path: Path) -> AsyncIterator[LeafMesh]:
    hub_conf, leaf_conf = write_configs(tmp_path, free_port())
    hub = NatsServer(tmp_path / "unused", ("-c", str(hub_conf)), jetstream=False)
    leaf = NatsServer(tmp_path / "unused", ("-c", str(leaf_conf)), jetstream=False)
    hub.start()
    try:
        admin = await nats.connect(hub.url, user="admin", password="admin", connect_timeout=5)
        try:
            await admin.jetstream().add_stream(
                StreamConfig(name=STREAM, subjects=["fenced.>"], duplicate_window=120.0)
            )
        finally:
            await admin.close()
        leaf.start()
        try:
            yield LeafMesh(hub, leaf)
        finally:
            leaf.stop()
    finally:
        hub.stop()


async def connect_to_leaf(mesh: LeafMesh) -> TlsCheckingClient:
    """Connect to the leaf as an agent does, and wait until the hub's JetStream replies."""
    client = TlsCheckingClient(require_tls=False)
    await client.connect(
        servers=[mesh.leaf.url],
        connect_timeout=5,
        user="agent",
        password="agent",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    await wait_for_stream_through(client, 30)
    return client


async def hub_message_ids(mesh: LeafMesh) -> list[str]:
    admin = await nats.connect(mesh.hub.url, user="admin", password="admin", connect_timeout=5)
    try:
        return await stored_message_ids(admin.jetstream(), STREAM)
    finally:
        await admin.close()


async def test_leaf_denied_message_rejected(
    leaf_mesh: LeafMesh, denied: DeniedSubjects, caplog: pytest.LogCaptureFixture
) -> None:
    batch: list[Message] = [(ALLOWED, b"x", "m1"), (DENIED, b"x", "m2"), (ALLOWED, b"x", "m3")]
    caplog.set_level(logging.WARNING, denied_subjects.__name__)
    client = await connect_to_leaf(leaf_mesh)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=2.0)
        outcomes = await publisher.publish_batch(batch)
        again = await publisher.publish_batch([(DENIED, b"y", "m4")])
    finally:
        await client.close()

    assert outcomes[0] is True
    assert outcomes[2] is True
    reason = outcomes[1]
    assert isinstance(reason, str)
    assert f"no responders on subject {DENIED}" in reason
    assert f"publish permission for {DENIED}" in reason
    assert f"m2 of 1 bytes on {DENIED}" in reason
    assert isinstance(again[0], str)
    assert denied.total == 2
    assert await hub_message_ids(leaf_mesh) == ["m1", "m3"]
    # Two rejected messages on one subject within the log spacing make one line.
    lines = [r.getMessage() for r in caplog.records if r.name == denied_subjects.__name__]
    assert len([line for line in lines if DENIED in line]) == 1


async def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_leaf_denied_sample_dead_lettered(leaf_mesh: LeafMesh, tmp_path: Path) -> None:
    outbox = Outbox(
        Spool(tmp_path / "agent" / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.1,
        dead_letters=DeadLetters(tmp_path / "agent" / "dead_letters.jsonl"),
        max_rejections=3,
        rejection_spacing_s=0.2,
    )
    outbox.add(ALLOWED, "m1", b"sample 1")
    outbox.add(DENIED, "m2", b"sample 2")
    outbox.add(ALLOWED, "m3", b"sample 3")
    client = await connect_to_leaf(leaf_mesh)
    sender = asyncio.create_task(outbox.run(lambda: client))
    try:
        await poll(lambda: outbox.pending == 0, 30, "an empty spool")
    finally:
        outbox.close()
        await asyncio.wait_for(sender, 10)
        await client.close()

    assert await hub_message_ids(leaf_mesh) == ["m1", "m3"]
    # The denied sample is kept, with the reason and the fix, instead of being retried forever.
    letters = DeadLetters(tmp_path / "agent" / "dead_letters.jsonl").read()
    assert [letter.message_id for letter in letters] == ["m2"]
    assert letters[0].subject == DENIED
    assert letters[0].payload == b"sample 2"
    assert f"publish permission for {DENIED}" in letters[0].reason
    assert outbox.counters.rejections == 3
    assert outbox.counters.dead_lettered == 1


@dataclass
class StubJetStream:
    """Stands in for a JetStream context: ``stream_info`` returns a stream with ``leader``."""

    leader: str | None

    async def stream_info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(cluster=SimpleNamespace(leader=self.leader))


@pytest.mark.parametrize(("leader", "dropped"), [("hub-1", True), (None, False)])
async def test_leaderless_stream_not_dropped(leader: str | None, dropped: bool) -> None:
    # During an election no stream replies either, and those messages must be retried.
    js = cast(JetStreamContext, StubJetStream(leader))

    found = await dropped_streams(js, {DENIED: STREAM}, 1.0)

    assert (found == {DENIED: STREAM}) is dropped
