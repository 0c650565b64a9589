"""The agent connects with the provider's NATS credentials, and only with them."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from tests.agent.natsserver import NatsServer, declare_agent_streams


def agent_with(
    tmp_path: Path, url: str, password: str, tls: ssl.SSLContext | None = None
) -> AgentProcess:
    directory = tmp_path / password
    state = StateStore(directory / "state.json")
    outbox = Outbox(Spool(directory / "spool"), retry_s=0.2, before_append=state.save_before_spool)
    spec = FleetNode("acme", "eu-1", "node-1", "T4", 1)
    node = NodeAgent(
        wire.NodeRef("acme", "eu-1", "node-1"),
        SimulatedBackend(spec),
        "simulated",
        state,
        directory,
        outbox,
        "boot-1",
        time.time,
    )
    options = ConnectionOptions(
        servers=[url], user="acme-agent", password=password, reconnect_wait_s=0.2, tls=tls
    )
    return AgentProcess([node], outbox, state, options, Intervals(heartbeat_s=0.2, read_s=0.2))


async def poll(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_agent_connects_only_with_valid_credentials(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", ("--user", "acme-agent", "--pass", "s3cret"))
    server.start()
    try:
        await declare_agent_streams(server.url, user="acme-agent", password="s3cret")
        good = agent_with(tmp_path, server.url, "s3cret")
        bad = agent_with(tmp_path, server.url, "wrong")
        stop = asyncio.Event()
        runs = [asyncio.create_task(good.run(stop)), asyncio.create_task(bad.run(stop))]
        await poll(lambda: good.counters.heartbeats_sent > 0, 20)
        assert good.connected
        assert good.counters.heartbeats_sent > 0
        assert not bad.connected
        assert bad.counters.heartbeats_sent == 0
        assert bad.counters.heartbeats_skipped > 0
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        server.stop()


@pytest.mark.timeout(60)
async def test_agent_rejects_plaintext_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The server would accept these credentials, so a connection proves they were sent.
    server = NatsServer(tmp_path / "js", ("--user", "acme-agent", "--pass", "s3cret"))
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        agent = agent_with(tmp_path, url, "s3cret", tls=ssl.create_default_context())
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        await poll(lambda: "does not offer TLS" in caplog.text, 20)
        await poll(lambda: agent.counters.heartbeats_skipped > 0, 20)
        assert not agent.connected
        assert agent.counters.heartbeats_sent == 0
        stop.set()
        await asyncio.wait_for(run, 30)
    finally:
        server.stop()
