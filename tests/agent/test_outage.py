"""A NATS outage while jobs run: every usage sample arrives exactly once, in order per node."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from acsp import subjects
from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import load_fleet
from agents.backends.simulated import SimulatedBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.process import AgentProcess, ConnectionOptions, Intervals
from agents.spool import Spool
from agents.state import StateStore
from tests.agent.natsserver import NatsServer, declare_agent_streams

OUTAGE_S = 10.0


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


def build_fleet_process(tmp_path: Path, url: str) -> AgentProcess:
    fleet_file = tmp_path / "fleet.csv"
    fleet_file.write_text("node,model,accelerators\nn1,A100-SXM4-80GB,8\nn2,H800,8\n")
    state = StateStore(tmp_path / "agent" / "state.json")
    outbox = Outbox(
        Spool(tmp_path / "agent" / "spool"),
        ack_timeout_s=1.0,
        retry_s=0.2,
        before_append=state.save_before_spool,
    )
    nodes = []
    for spec in load_fleet(fleet_file, "acme", "eu-1"):
        backend = SimulatedBackend(spec)
        node = NodeAgent(
            wire.NodeRef(spec.provider, spec.region, spec.node),
            backend,
            "simulated",
            state,
            tmp_path / "agent",
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
        Intervals(heartbeat_s=0.5, read_s=0.2, usage_s=0.3),
        per_provider_consumers=True,
    )


async def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def send_start_commands(url: str, process: AgentProcess) -> list[str]:
    client = await nats.connect(url)
    task_ids = []
    try:
        js = client.jetstream()
        for index in range(10):
            node = process.nodes[index % 2]
            assert node.inventory is not None
            accelerator = node.inventory.accelerators[index // 2].uuid
            task_id = f"job-{index}/1/0"
            command = agent_pb2.AgentCommand(
                command_id=f"cmd-{index}",
                kind=agent_pb2.COMMAND_KIND_START_TASK,
                node=node.ref.message(),
                task_id=task_id,
                job_id=f"job-{index}",
                accelerators=[
                    scheduler_pb2.AcceleratorShare(accelerator_id=accelerator, millis=1000)
                ],
                simulated_run_seconds=3600,
            )
            subject = subjects.command_subject(node.ref.provider, node.ref.region, node.ref.node)
            headers = {"Nats-Msg-Id": f"cmd-{index}"}
            await js.publish(subject, command.SerializeToString(), headers=headers)
            task_ids.append(task_id)
    finally:
        await client.close()
    return task_ids


async def read_usage(url: str) -> list[agent_pb2.UsageReport]:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        total = (await js.stream_info(subjects.USAGE_STREAM)).state.messages
        subscription = await js.pull_subscribe(
            "acsp.usage.>",
            stream=subjects.USAGE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE),
        )
        reports: list[agent_pb2.UsageReport] = []
        while len(reports) < total:
            for message in await subscription.fetch(256, timeout=5):
                report = agent_pb2.UsageReport()
                report.ParseFromString(message.data)
                reports.append(report)
        return reports
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_outage_loses_and_duplicates_no_usage_sample(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    process = build_fleet_process(tmp_path, nats_server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(process.run(stop))
    await asyncio.wait_for(process.started.wait(), 30)
    await poll(lambda: process.connected, 10, "the agent to connect")
    task_ids = await send_start_commands(nats_server.url, process)
    running = lambda: sum(len(n.runner.running) for n in process.nodes if n.runner)  # noqa: E731
    await poll(lambda: running() == 10, 15, "ten running tasks")
    await poll(lambda: process.counters.usage_samples >= 20, 10, "usage before the outage")

    nats_server.stop()
    outage_started = time.monotonic()
    samples_before = process.counters.usage_samples
    await poll(lambda: process._outbox.pending > 20, OUTAGE_S, "usage spooled in the outage")
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
    assert not runner.done()
    assert process.counters.usage_samples > samples_before
    spooled = process._outbox.pending
    nats_server.start()
    await poll(lambda: process._outbox.pending == 0, 30, "the spool to replay")
    assert running() == 10
    stop.set()
    await asyncio.wait_for(runner, 30)

    reports = await read_usage(nats_server.url)
    samples = [(report.node.node_id, sample) for report in reports for sample in report.samples]
    sample_ids = [sample.sample_id for _, sample in samples]
    assert len(sample_ids) == len(set(sample_ids)), "a usage sample arrived twice"
    assert len(sample_ids) >= process.counters.usage_samples
    assert spooled > 20
    for node in ("n1", "n2"):
        sequences = [sample.sequence for node_id, sample in samples if node_id == node]
        assert sequences == list(range(1, len(sequences) + 1)), f"gap or reorder on {node}"
    # The intervals of each task on each accelerator follow each other without gap or overlap.
    by_task: dict[tuple[str, str], list[agent_pb2.UsageSample]] = {}
    for _, sample in samples:
        by_task.setdefault((sample.task_id, sample.accelerator_id), []).append(sample)
    assert {task for task, _ in by_task} == set(task_ids)
    for intervals in by_task.values():
        for before, after in itertools.pairwise(intervals):
            assert before.end_time == after.start_time
