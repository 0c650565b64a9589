"""Building node agents for tests, and reading back what they published."""

from __future__ import annotations

import asyncio
from pathlib import Path

from acsp.v1 import agent_pb2
from agents import wire
from agents.backends.base import Backend
from agents.health import HealthSettings
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.spool import Spool
from agents.state import StateStore

NODE = wire.NodeRef("acme", "eu-1", "node-1")


class ManualClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_node(
    backend: Backend,
    directory: Path,
    clock: ManualClock,
    backend_name: str = "nvml",
    boot_id: str = "boot-1",
    clear_after_s: float = 300.0,
) -> tuple[NodeAgent, Outbox, Spool]:
    spool = Spool(directory / "spool")
    state = StateStore(directory / "state.json")
    outbox = Outbox(spool, before_append=state.save_before_spool)
    node = NodeAgent(
        NODE,
        backend,
        backend_name,
        state,
        directory,
        outbox,
        boot_id,
        clock,
        HealthSettings(clear_after_s=clear_after_s),
    )
    return node, outbox, spool


async def started(node: NodeAgent, group: asyncio.TaskGroup) -> NodeAgent:
    await node.start(group)
    return node


def published_health(outbox: Outbox, spool: Spool) -> list[agent_pb2.HealthEvent]:
    outbox.flush_to_spool()
    events = []
    for record in spool.peek(10_000):
        if record.subject.startswith("acsp.health."):
            message = agent_pb2.HealthEvent()
            message.ParseFromString(record.payload)
            events.append(message)
    return events
