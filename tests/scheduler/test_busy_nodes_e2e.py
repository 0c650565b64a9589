"""Nodes whose pool of task users is in use, end to end with real agents and tasks.

Each agent process runs one node with a pool of one task user (``ACSP_AGENT_TASK_USERS``), so
its node runs one job at once. A task that no scheduler placed takes the user of node ``ra``,
so the agent there rejects starts as busy. The scheduler places the job again without counting
a failed start, and never sends node ``rb`` a second job while one runs there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.aio.client
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from agents.task_users import TASK_USERS_ENV, kill_user_processes
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, wait_for
from .test_accelerator_failure_e2e import Client
from .test_start_failures_e2e import stored_job

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to pool users needs root"),
]

# Uids without an entry in the user database, apart from those of the agent tests.
BUSY_UID = 64110
FREE_UID = 64111
NOGROUP = 65534
FOREIGN_TASK = "jforeign/1/0"


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
        await asyncio.to_thread(kill_user_processes, (BUSY_UID, FREE_UID))


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A folder for the agents' state that the pool users can search, unlike tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="acsp-busy-nodes-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_agent(stack: Stack, state_root: Path, region: str, uid: int) -> None:
    name = f"agents-{region}"
    (state_root / name).mkdir(mode=0o711)
    stack.start_agents(
        1,
        gpus=2,
        name=name,
        state_root=state_root,
        region=region,
        extra_env={TASK_USERS_ENV: f"{uid}:{NOGROUP}"},
    )


async def occupy(stack: Stack, accelerator_id: str, release: Path) -> None:
    """Start a task of no known job on node ra/n0 that runs until ``release`` exists."""
    command = agent_pb2.AgentCommand(
        command_id=f"{FOREIGN_TASK}/start",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=agent_pb2.NodeRef(provider_id="prov", region_id="ra", node_id="n0"),
        task_id=FOREIGN_TASK,
        job_id=FOREIGN_TASK.split("/", 1)[0],
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=accelerator_id, millis=1000)],
        command=["/bin/sh", "-c", f"while [ ! -e {release} ]; do sleep 0.1; done"],
        wall_time_seconds=3600,
    )
    command.time.FromNanoseconds(time.time_ns())
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        await client.jetstream().publish(
            subjects.command_subject("prov", "ra", "n0"),
            command.SerializeToString(),
            headers={"Nats-Msg-Id": command.command_id},
            timeout=10,
        )
    finally:
        await client.close()


async def heartbeat_lists(stack: Stack, task_id: str) -> bool:
    """Return whether node ra/n0's latest heartbeat lists ``task_id`` as running."""
    client = await nats.connect(stack.nats_url, connect_timeout=2)
    try:
        bucket = await client.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
        try:
            entry = await bucket.get("prov.ra.n0")
        except nats.js.errors.KeyNotFoundError:
            return False
    finally:
        await client.close()
    return task_id in agent_pb2.Heartbeat.FromString(entry.value or b"").running_task_ids


class Watch:
    """Start commands to and task events from both nodes, on core NATS subscriptions."""

    def __init__(self, client: nats.aio.client.Client) -> None:
        self.client = client
        self.starts: list[tuple[str, str]] = []
        """(region, job id) of each start command."""
        self.events: list[agent_pb2.TaskEvent] = []

    async def start(self) -> None:
        async def command(message: Msg) -> None:
            sent = agent_pb2.AgentCommand.FromString(message.data)
            if sent.kind == agent_pb2.COMMAND_KIND_START_TASK:
                self.starts.append((sent.node.region_id, sent.job_id))

        async def event(message: Msg) -> None:
            self.events.append(agent_pb2.TaskEvent.FromString(message.data))

        for region in ("ra", "rb"):
            await self.client.subscribe(subjects.command_subject("prov", region, "n0"), cb=command)
            await self.client.subscribe(subjects.task_subject("prov", region, "n0"), cb=event)
        await self.client.flush(timeout=10)

    def busy_rejections(self, job_id: str) -> int:
        return sum(
            1
            for event in self.events
            if event.job_id == job_id
            and event.state == agent_pb2.TASK_STATE_START_FAILED
            and event.start_rejection == agent_pb2.START_REJECTION_NODE_BUSY
        )


async def test_busy_node_rejection_not_failure(state_root: Path, stack: Stack) -> None:
    # state_root comes first, so that it is removed after the stack stopped its agents.
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    operator = metadata(stack.token("ops", Role.PROVIDER_OPERATOR, provider="prov"))
    client = Client(address, md, project, grant)
    watcher = await nats.connect(stack.nats_url, connect_timeout=2)
    release = state_root / "release"
    try:
        start_agent(stack, state_root, "ra", BUSY_UID)

        async def nodes() -> dict[str, scheduler_pb2.Node]:
            reply = await client.stub.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return {node.region_id: node for node in reply.nodes}

        busy_node = (await wait_for(nodes, 30, "node ra/n0 to report its inventory", 0.2))["ra"]
        # The scheduler takes a node's free accelerators first to last, so the foreign task
        # takes the last one, and the agent's accelerator check lets the job's start pass.
        await occupy(stack, busy_node.accelerators[-1].accelerator_id, release)
        await wait_for(lambda: heartbeat_lists(stack, FOREIGN_TASK), 30, "the foreign task", 0.2)
        watch = Watch(watcher)
        await watch.start()

        # Node ra has a free job slot as far as the scheduler knows, but its only user is
        # taken, so the agent rejects the start as busy.
        first = await client.submit("first", 1)
        await wait_for(lambda: watch.busy_rejections(first) >= 1, 60, "a busy rejection", 0.05)

        # The rejection counts as no failure, and the job starts on the next node to come.
        start_agent(stack, state_root, "rb", FREE_UID)
        job = await wait_for(lambda: client.running(first), 60, "the first job to run", 0.2)
        assert {p.region_id for p in job.placements} == {"rb"}
        assert job.attempt >= 2
        assert "node busy" in job.attempt_reason
        assert (await stored_job(stack, first))["start_failures"] == 0

        # Node rb runs one job, its limit, so the second job waits for node ra to free up,
        # however often ra rejects it.
        second = await client.submit("second", 1)
        await wait_for(lambda: watch.busy_rejections(second) >= 1, 60, "a busy rejection", 0.05)
        release.touch()
        job = await wait_for(lambda: client.running(second), 60, "the second job to run", 0.2)
        assert {p.region_id for p in job.placements} == {"ra"}
        assert (await stored_job(stack, second))["start_failures"] == 0
        assert ("rb", second) not in watch.starts
    finally:
        await watcher.close()
        await client.channel.close()
