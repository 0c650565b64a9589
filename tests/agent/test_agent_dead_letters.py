"""An agent whose usage reports JetStream rejects for good moves them aside and goes on."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agents import wire
from agents.backends.fleet import load_fleet
from agents.backends.simulated import SimulatedBackend
from agents.dead_letters import DeadLetters
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import STATS_FILE_NAME, AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.test_outage import poll, send_start_commands


def build_process(state_dir: Path, url: str) -> AgentProcess:
    fleet_file = state_dir.parent / "fleet.csv"
    fleet_file.write_text("node,model,accelerators\nn1,A100-SXM4-80GB,8\nn2,H800,8\n")
    state = StateStore(state_dir / "state.json")
    outbox = Outbox(
        Spool(state_dir / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.2,
        before_append=state.save_before_spool,
        max_rejections=2,
        rejection_spacing_s=0.2,
    )
    nodes = []
    for spec in load_fleet(fleet_file, "acme", "eu-1"):
        backend = SimulatedBackend(spec)
        node = NodeAgent(
            wire.NodeRef(spec.provider, spec.region, spec.node),
            backend,
            "simulated",
            state,
            state_dir,
            outbox,
            "boot-1",
            time.time,
        )
        backend.set_busy(node.busy)
        nodes.append(node)
    return AgentProcess(
        nodes,
        outbox,
        state,
        ConnectionOptions(servers=[url], reconnect_wait_s=0.2),
        Intervals(heartbeat_s=0.5, read_s=0.2, usage_s=0.3, state_flush_s=0.2),
        per_provider_consumers=True,
    )


def read_stats(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATS_FILE_NAME
    return dict(json.loads(path.read_text())) if path.exists() else {}


@pytest.mark.timeout(120)
async def test_usage_without_stream_moves_aside(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    # No usage stream: every usage report goes to a subject that no stream captures.
    await declare_agent_streams(server.url, usage=False)
    state_dir = tmp_path / "agent"
    process = build_process(state_dir, server.url)
    stop = asyncio.Event()
    agent = asyncio.create_task(process.run(stop))
    try:
        await asyncio.wait_for(process.started.wait(), 30)
        await poll(lambda: process.connected, 10, "the agent to connect")
        await send_start_commands(server.url, process)
        await poll(
            lambda: read_stats(state_dir).get("outbox", {}).get("dead_lettered", 0) >= 4,
            60,
            "four usage reports in the dead letters",
        )
    finally:
        stop.set()
        await asyncio.wait_for(agent, 30)
        server.stop()

    stats = read_stats(state_dir)
    outbox = stats["outbox"]
    # The clean stop drained the spool: every spooled message was stored or moved aside.
    assert stats["outbox_pending"] == 0
    assert outbox["published"] + outbox["dead_lettered"] == outbox["spooled"]
    assert outbox["published"] > 0
    letters = DeadLetters(state_dir / "dead_letters.jsonl").read()
    assert len(letters) == outbox["dead_lettered"]
    assert all(letter.subject.startswith("acsp.usage.acme.eu-1.") for letter in letters)
    assert all("no JetStream stream captures subject" in d.reason for d in letters)
    assert len({letter.message_id for letter in letters}) == len(letters)
    assert stats["usage_samples"] > 0
