"""A drain that a node's agent requests, across a new leader, end to end: real grant,
metering, NATS, PostgreSQL, scheduler and simulated agent processes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client
from .test_node_states_e2e import DRAINED, UP, Operator, assert_not_placed, heartbeat_age

pytestmark = pytest.mark.timeout(300)

FAULT_AT_S = 3.0
"""Seconds after the agent process starts at which its node-wide fault begins."""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        await stack.start_metering()
        yield stack
    finally:
        await stack.close()


def node_fault_trace(path: Path) -> Path:
    """Write a trace with one node hardware fault that never ends.

    Its health rule degrades the node and requests a drain, but fails no accelerator, so only
    the drain keeps jobs off the node.
    """
    event = {
        "node_id": "server-0",
        "event_type": "fault_start",
        "event_time": FAULT_AT_S / 86_400,
        "fault_type": {"Class": "Node", "Level": "Hardware Failure", "Desc": "ECC memory"},
    }
    path.write_text(json.dumps([event]))
    return path


async def stored_drain(stack: Stack) -> tuple[bool, str, str]:
    """Return the draining flag, source and reason stored in ``scheduler.nodes`` for n0."""
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT draining, drain_source, drain_reason FROM scheduler.nodes"
            " WHERE provider = 'prov' AND region = 'r1' AND node = 'n0'",
            timeout=10,
        )
    finally:
        await conn.close()
    assert row is not None
    return (row["draining"], row["drain_source"], row["drain_reason"])


async def test_agent_drain_survives_new_leader(stack: Stack, tmp_path: Path) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    operator = Operator(stack, client)
    try:
        faults = node_fault_trace(tmp_path / "faults.json")
        agent = stack.start_agents(1, gpus=1, name="agents-r1", region="r1", faults=faults)
        await operator.wait_state(DRAINED, "n0 to drain at its agent's request")
        node = await operator.get()
        assert node is not None
        request_cause = node.state_cause
        assert request_cause.trigger == "agent:drain_requested"
        assert request_cause.time.seconds > 0

        async def stored() -> bool:
            return (await stored_drain(stack))[:2] == (True, "agent")

        await wait_for(stored, 10, "the agent's drain in scheduler.nodes", 0.2)

        # Wait for a heartbeat sent after the request, which the new leader's watch replays
        # first. A leader that forgot the drain would take it as a new request, with its later
        # time.
        requested_at = request_cause.time.ToNanoseconds() / 1e9

        async def later_heartbeat() -> bool:
            return time.time() - await heartbeat_age(stack, "prov.r1.n0") > requested_at + 0.5

        await wait_for(later_heartbeat, 10, "a heartbeat of n0 after its request", 0.2)

        # The new leader loads the drain with the cause and time of the first request.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        operator = Operator(stack, client)
        node = await operator.get()
        assert node is not None
        assert node.state == DRAINED
        loaded = node.state_cause
        assert (loaded.trigger, loaded.reason) == (request_cause.trigger, request_cause.reason)
        # PostgreSQL stores the time in microseconds.
        assert abs(loaded.time.ToNanoseconds() - request_cause.time.ToNanoseconds()) < 1000
        waiting = await assert_not_placed(client, "while-agent-drains")

        # The agent comes back without the fault, so its heartbeats withdraw the request.
        agent.kill()
        stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
        await operator.wait_state(UP, "n0 up once its agent withdrew the drain")
        node = await operator.get()
        assert node is not None
        assert node.state_cause.reason == "agent withdrew its drain request"
        running = await wait_for(
            lambda: client.running(waiting), 60, "the waiting job to run on n0", 0.2
        )
        assert [p.node_id for p in running.placements] == ["n0"]
        draining, source, reason = await stored_drain(stack)
        assert draining is False
        assert source == "agent"
        assert reason == "agent withdrew its drain request"
    finally:
        await client.channel.close()


async def test_agent_cannot_end_operator_drain(stack: Stack, tmp_path: Path) -> None:
    scheduler_process, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    client = Client(address, md, project, grant)
    operator = Operator(stack, client)
    try:
        faults = node_fault_trace(tmp_path / "faults.json")
        agent = stack.start_agents(1, gpus=1, name="agents-r1", region="r1", faults=faults)
        await operator.wait_state(DRAINED, "n0 to drain at its agent's request")
        # The operator takes the drain over, so a withdrawal of the agent's request leaves it.
        drained = await operator.drain()
        assert drained.state_cause.trigger == "rpc:DrainNode"
        assert (await stored_drain(stack)) == (True, "operator", "drained by operator")

        # The new leader loads the operator's drain, which the heartbeats of an agent back
        # without the fault leave in force.
        await client.channel.close()
        scheduler_process.kill()
        _, address = await stack.start_scheduler("scheduler-restarted")
        client = Client(address, md, project, grant)
        operator = Operator(stack, client)
        agent.kill()
        stack.start_agents(1, gpus=1, name="agents-r1", region="r1")
        started_at = time.time()

        async def heard_again() -> bool:
            node = await operator.get()
            last_heard_at = 0.0 if node is None else node.last_heartbeat_time.ToNanoseconds() / 1e9
            return last_heard_at > started_at + 2

        await wait_for(heard_again, 60, "heartbeats of n0's new agent", 0.2)
        node = await operator.get()
        assert node is not None
        assert node.state == DRAINED
        assert node.state_cause.trigger == "rpc:DrainNode"
        waiting = await assert_not_placed(client, "while-operator-drains")

        assert (await operator.drain(undrain=True)).state == UP
        await wait_for(lambda: client.running(waiting), 60, "the waiting job to run on n0", 0.2)
        assert (await stored_drain(stack)) == (False, "operator", "undrained")
    finally:
        await client.channel.close()
