"""Real agent processes under the production NATS permissions, over TLS.

Provider alpha's simulated agent connects to alpha's leaf node as the region's ``agent`` user,
provider beta's to the hub as user ``beta`` (``tests/deploy/nats_mesh.py``). The scheduler user
publishes start commands on ``acsp.cmd.<provider>...`` and reads what the agents report.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from scheduler.service.task_output import TaskLocation, request_output
from tests.deploy.nats_mesh import AGENT_PASSWORD, PASSWORDS, ErrorList, Mesh, connect

FLEET_HEADER = "node,model,accelerators\n"


@dataclass
class AgentRun:
    """One ``python -m agents`` child process and its state folder."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    log: Path

    def stats(self) -> dict[str, object]:
        path = self.state_dir / "stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _start_agent(
    tmp: Path, provider: str, nodes: list[str], url: str, user: str, password: str, ca: Path
) -> AgentRun:
    fleet = tmp / f"fleet-{provider}.csv"
    fleet.write_text(FLEET_HEADER + "".join(f"{node},A100-SXM4-80GB,2\n" for node in nodes))
    state_dir = tmp / f"agent-{provider}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
    env.update(
        ACSP_NATS_URL=url,
        ACSP_NATS_USER=user,
        ACSP_NATS_PASSWORD=password,
        ACSP_NATS_TLS_CA=str(ca),
        ACSP_LOG_LEVEL="INFO",
    )
    log = tmp / f"agent-{provider}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "agents", "--backend", "simulated"),
                *("--fleet", f"{fleet}:{provider}:r1", "--faults", "none"),
                *("--utilization", "none", "--state-dir", str(state_dir)),
                *("--heartbeat-s", "0.5", "--usage-s", "0.5", "--read-s", "0.5"),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return AgentRun(process, state_dir, log)


@pytest.fixture
def agents(tmp_path: Path, mesh: Mesh) -> Iterator[tuple[AgentRun, AgentRun]]:
    alpha = _start_agent(
        tmp_path, "alpha", ["a1", "a2", "a3"], mesh.leaf_url, "agent", AGENT_PASSWORD, mesh.ca_file
    )
    beta = _start_agent(
        tmp_path, "beta", ["b1"], mesh.hub_urls[0], "beta", PASSWORDS["beta"], mesh.ca_file
    )
    try:
        yield alpha, beta
    finally:
        alpha.stop()
        beta.stop()


def _handled(agent: AgentRun, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return agent.stats().get("commands_handled") == count

    return check


async def _scheduler(mesh: Mesh) -> Client:
    return await connect(mesh, mesh.hub_urls, "scheduler", PASSWORDS["scheduler"], "_INBOX")


async def _messages(hub: Client, stream: str, subject: str) -> list[Msg]:
    """Return every message stored on ``subject``, read through a short-lived consumer."""
    js = hub.jetstream(timeout=5)
    subscription = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    found: list[Msg] = []
    retries = 20
    try:
        while True:
            try:
                found.extend(await subscription.fetch(64, timeout=0.5))
            except TimeoutError:
                return found
            except APIError:
                # On a loaded machine a pull from a consumer just created has come back with
                # a 5xx status once; a later pull reads the messages.
                retries -= 1
                if retries == 0:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await subscription.unsubscribe()


async def _poll(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


async def _inventory(hub: Client, provider: str, node: str) -> agent_pb2.Inventory:
    async def stored() -> bool:
        try:
            await hub.jetstream().get_last_msg(
                subjects.AGENT_STREAM, subjects.inventory_subject(provider, "r1", node)
            )
        except NotFoundError:
            return False
        return True

    await _poll(stored, 60, f"the inventory of {provider}.r1.{node}")
    message = await hub.jetstream().get_last_msg(
        subjects.AGENT_STREAM, subjects.inventory_subject(provider, "r1", node)
    )
    inventory = agent_pb2.Inventory()
    inventory.ParseFromString(message.data or b"")
    return inventory


def _start(
    provider: str, node: str, task_id: str, accelerator: str, argv: list[str], fencing: int
) -> bytes:
    return agent_pb2.AgentCommand(
        command_id=f"start-{task_id}",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=agent_pb2.NodeRef(provider_id=provider, region_id="r1", node_id=node),
        task_id=task_id,
        job_id=task_id.split("/")[0],
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=accelerator, millis=1000)],
        command=argv,
        wall_time_seconds=60,
        grace_seconds=5,
        fencing_token=fencing,
    ).SerializeToString()


async def _task_states(hub: Client, provider: str, node: str, task_id: str) -> list[int]:
    messages = await _messages(
        hub, subjects.AGENT_STREAM, subjects.task_subject(provider, "r1", node)
    )
    states: list[int] = []
    for message in messages:
        event = agent_pb2.TaskEvent()
        event.ParseFromString(message.data)
        if event.task_id == task_id:
            states.append(event.state)
    return states


async def _final_event(hub: Client, provider: str, node: str, task_id: str) -> agent_pb2.TaskEvent:
    messages = await _messages(
        hub, subjects.AGENT_STREAM, subjects.task_subject(provider, "r1", node)
    )
    events = []
    for message in messages:
        event = agent_pb2.TaskEvent()
        event.ParseFromString(message.data)
        if event.task_id == task_id:
            events.append(event)
    return events[-1]


async def _all_acked(hub: Client, consumer: str) -> bool:
    info = await hub.jetstream().consumer_info(subjects.COMMAND_STREAM, consumer)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def _usage_task_ids(hub: Client, provider: str, node: str) -> set[str]:
    messages = await _messages(
        hub, subjects.USAGE_STREAM, subjects.usage_subject(provider, "r1", node)
    )
    task_ids: set[str] = set()
    for message in messages:
        report = agent_pb2.UsageReport()
        report.ParseFromString(message.data)
        task_ids.update(sample.task_id for sample in report.samples)
    return task_ids


@pytest.mark.timeout(180)
async def test_agents_run_only_own_commands(mesh: Mesh, agents: tuple[AgentRun, AgentRun]) -> None:
    alpha, beta = agents
    hub = await _scheduler(mesh)
    try:
        alpha_inventory = await _inventory(hub, "alpha", "a2")
        beta_inventory = await _inventory(hub, "beta", "b1")
        js = hub.jetstream(timeout=5)
        work = [sys.executable, "-c", "import time; time.sleep(1.5); print('ran')"]

        # The same start twice (a redelivered command), then a start from an older epoch.
        alpha_gpu = alpha_inventory.accelerators[0].accelerator_id
        alpha_command = subjects.command_subject("alpha", "r1", "a2")
        start = _start("alpha", "a2", "ja/1/0", alpha_gpu, work, fencing=7)
        await js.publish(alpha_command, start)
        await js.publish(alpha_command, start)
        stale = _start("alpha", "a2", "stale/1/0", alpha_gpu, work, fencing=3)
        await js.publish(alpha_command, stale)
        beta_gpu = beta_inventory.accelerators[0].accelerator_id
        await js.publish(
            subjects.command_subject("beta", "r1", "b1"),
            _start("beta", "b1", "jb/1/0", beta_gpu, work, fencing=1),
        )

        exited = agent_pb2.TASK_STATE_EXITED

        async def both_exited() -> bool:
            return exited in await _task_states(
                hub, "alpha", "a2", "ja/1/0"
            ) and exited in await _task_states(hub, "beta", "b1", "jb/1/0")

        await _poll(both_exited, 60, "both tasks to exit")
        assert "ran" in (await _final_event(hub, "alpha", "a2", "ja/1/0")).output_tail

        # The scheduler reads each task's output from its agent, alpha's through its leaf node.
        for provider, node, task_id in (("alpha", "a2", "ja/1/0"), ("beta", "b1", "jb/1/0")):
            job_id, attempt, index = task_id.split("/")
            location = TaskLocation(job_id, int(index), int(attempt), provider, "r1", node)
            reply = await request_output(hub, location, 1024, timeout_s=10)
            assert reply.status == agent_pb2.TASK_OUTPUT_STATUS_OK, reply.message
            assert reply.output == b"ran\n"
        started = agent_pb2.TASK_STATE_STARTED
        assert (await _task_states(hub, "alpha", "a2", "ja/1/0")).count(started) == 1
        assert await _task_states(hub, "alpha", "a2", "stale/1/0") == []

        async def usage_reported() -> bool:
            return "ja/1/0" in await _usage_task_ids(hub, "alpha", "a2")

        await _poll(usage_reported, 30, "alpha's usage of its task")
        kv = await js.key_value(subjects.HEARTBEAT_BUCKET)
        heartbeat = agent_pb2.Heartbeat()
        heartbeat.ParseFromString((await kv.get("alpha.r1.a2")).value or b"")
        assert heartbeat.node.provider_id == "alpha"
        assert len(heartbeat.accelerator_health) == 2

        # Beta's agent handled its own command only; alpha's agent all three of its own.

        await _poll(_handled(alpha, 3), 10, "alpha's command count")
        await _poll(_handled(beta, 1), 10, "beta's command count")
        assert alpha.stats().get("commands_rejected") == 0
        assert beta.stats().get("commands_rejected") == 0
        await _poll(lambda: _all_acked(hub, "fleet-alpha-r1"), 10, "alpha's acks at the hub")
    finally:
        await hub.close()


@pytest.mark.timeout(60)
async def test_beta_cannot_subscribe_to_alpha_deliveries(mesh: Mesh) -> None:
    errors: ErrorList = []
    beta = await connect(mesh, mesh.hub_urls, "beta", PASSWORDS["beta"], "_INBOX.beta", errors)
    received: list[Msg] = []

    async def keep(message: Msg) -> None:
        received.append(message)

    try:
        for deliver in ("acsp.deliver.alpha.r1.a1", "acsp.deliver.alpha.r1.fleet.all"):
            await beta.subscribe(deliver, cb=keep)
        await beta.flush(timeout=2)
        deadline = time.monotonic() + 5
        while not any("acsp.deliver.alpha.r1.fleet.all" in error for error in errors):
            assert time.monotonic() < deadline, errors
            await asyncio.sleep(0.05)
        assert any("acsp.deliver.alpha.r1.a1" in error for error in errors), errors
    finally:
        await beta.close()
    assert received == []


@pytest.mark.timeout(90)
async def test_node_agent_uses_push_consumer(tmp_path: Path, mesh: Mesh) -> None:
    # One node with its own consumer, as the NVML agent runs, through alpha's leaf node.
    ref = wire.NodeRef("alpha", "r1", "n20")
    state = StateStore(tmp_path / "state.json")
    outbox = Outbox(Spool(tmp_path / "spool"), retry_s=0.2, before_append=state.save_before_spool)
    backend = SimulatedBackend(FleetNode("alpha", "r1", "n20", "A100-SXM4-80GB", 2))
    node = NodeAgent(ref, backend, "simulated", state, tmp_path, outbox, "boot-1", time.time)
    backend.set_busy(node.busy)
    options = ConnectionOptions(
        servers=[mesh.leaf_url],
        user="agent",
        password=AGENT_PASSWORD,
        reconnect_wait_s=0.2,
        tls=ssl.create_default_context(cafile=str(mesh.ca_file)),
        inbox_prefix="_INBOX.alpha",
    )
    intervals = Intervals(0.5, 0.5, 0.5, command_heartbeat_s=1.0)
    process = AgentProcess([node], outbox, state, options, intervals)
    assert [c.deliver_subject for c in process.command_consumers()] == [
        subjects.command_deliver_subject("alpha", "r1", "n20")
    ]
    stop = asyncio.Event()
    run = asyncio.create_task(process.run(stop))
    hub = await _scheduler(mesh)
    try:
        inventory = await _inventory(hub, "alpha", "n20")
        gpu = inventory.accelerators[1].accelerator_id
        work = [sys.executable, "-c", "print('node ran')"]
        await hub.jetstream().publish(
            subjects.command_subject("alpha", "r1", "n20"),
            _start("alpha", "n20", "jn/1/0", gpu, work, fencing=1),
        )

        async def exited() -> bool:
            states = await _task_states(hub, "alpha", "n20", "jn/1/0")
            return agent_pb2.TASK_STATE_EXITED in states

        await _poll(exited, 30, "the node's task to exit")
        assert "node ran" in (await _final_event(hub, "alpha", "n20", "jn/1/0")).output_tail
        await _poll(lambda: _all_acked(hub, "agent-alpha-r1-n20"), 10, "the node's ack")
        info = await hub.jetstream().consumer_info(subjects.COMMAND_STREAM, "agent-alpha-r1-n20")
        assert info.config.deliver_subject == "acsp.deliver.alpha.r1.n20"
        assert info.config.filter_subject == "acsp.cmd.alpha.r1.n20"

        # Beta cannot take the consumer over by its name while the node is subscribed.
        beta = await connect(mesh, mesh.hub_urls, "beta", PASSWORDS["beta"], "_INBOX.beta")
        try:
            with pytest.raises(BadRequestError, match="already in use"):
                await beta.jetstream(timeout=5).add_consumer(
                    subjects.COMMAND_STREAM,
                    ConsumerConfig(
                        name="agent-alpha-r1-n20",
                        durable_name="agent-alpha-r1-n20",
                        filter_subject="acsp.cmd.beta.r1.taken",
                        deliver_subject="acsp.deliver.beta.r1.taken",
                        ack_policy=AckPolicy.EXPLICIT,
                        idle_heartbeat=1.0,
                    ),
                )
        finally:
            await beta.close()

        # A consumer deleted on the server: the agent misses its heartbeats and declares it
        # again, then runs the next command.
        await hub.jetstream().delete_consumer(subjects.COMMAND_STREAM, "agent-alpha-r1-n20")

        async def declared_again() -> bool:
            try:
                await hub.jetstream().consumer_info(subjects.COMMAND_STREAM, "agent-alpha-r1-n20")
            except NotFoundError:
                return False
            return True

        await _poll(declared_again, 20, "the agent to declare its consumer again")
        await hub.jetstream().publish(
            subjects.command_subject("alpha", "r1", "n20"),
            _start("alpha", "n20", "jn/2/0", gpu, work, fencing=1),
        )

        async def second_exited() -> bool:
            states = await _task_states(hub, "alpha", "n20", "jn/2/0")
            return agent_pb2.TASK_STATE_EXITED in states

        await _poll(second_exited, 30, "the second task to exit")
    finally:
        await hub.close()
        stop.set()
        await asyncio.wait_for(run, 30)


async def test_rejected_password_is_named(tmp_path: Path, mesh: Mesh) -> None:
    run = _start_agent(
        tmp_path, "alpha", ["a1"], mesh.leaf_url, "agent", "not-the-password", mesh.ca_file
    )
    try:

        async def named() -> bool:
            lines = run.log.read_text(errors="replace").splitlines()
            failures = [line for line in lines if "cannot connect to NATS" in line]
            return any("Authorization Violation" in line for line in failures)

        await _poll(named, 60, "the connect failure to name the rejected password")
    finally:
        run.stop()
