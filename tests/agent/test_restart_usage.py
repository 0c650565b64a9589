"""Usage across an agent restart: a task that kept running is charged for the downtime once."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from acsp.v1 import agent_pb2
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.model import TaskSpec
from agents.spool import Spool
from tests.agent.helpers import ManualClock, make_node

SPEC = FleetNode("acme", "eu-1", "node-1", "A100-SXM4-80GB", 8)


def usage_samples(spool: Spool) -> list[agent_pb2.UsageSample]:
    samples: list[agent_pb2.UsageSample] = []
    for record in spool.peek(10_000):
        if record.subject.startswith("acsp.usage."):
            report = agent_pb2.UsageReport()
            report.ParseFromString(record.payload)
            samples.extend(report.samples)
    return samples


async def test_restart_reports_downtime_usage_once(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    first, outbox, spool = make_node(SimulatedBackend(SPEC, clock), tmp_path, clock)
    sleeper = (sys.executable, "-c", "import time; time.sleep(60)")
    async with asyncio.TaskGroup() as group:
        await first.start(group)
        assert first.runner is not None
        uuid = first.backend.discover().accelerators[0].uuid
        await first.runner.start(TaskSpec("job", "job/1/0", (uuid,), sleeper))
        clock.advance(10)
        assert first.report_usage() == 1
        outbox.flush_to_spool()
        # The agent dies: its supervisors stop, the task's process goes on.
        for task in first.runner._tasks.values():
            assert task.supervisor is not None
            task.supervisor.cancel()
    pid = first.runner.running[0].pid
    spool.close()

    clock.advance(100)
    second, outbox2, spool2 = make_node(
        SimulatedBackend(SPEC, clock), tmp_path, clock, boot_id="boot-2"
    )
    async with asyncio.TaskGroup() as group:
        await second.start(group)
        assert second.runner is not None
        assert [r.pid for r in second.runner.running] == [pid]
        clock.advance(10)
        assert second.report_usage() == 1
        outbox2.flush_to_spool()
        # Leaving the task group waits for the stopped process to exit.
        await second.runner.stop("job/1/0", "cleanup")
    assert second.runner.running == []

    samples = usage_samples(spool2)
    assert len(samples) == 2
    before, after = samples
    assert after.start_time == before.end_time
    assert after.end_time.ToSeconds() - after.start_time.ToSeconds() == 110
    assert after.accelerator_seconds.value == "110.000000"
    assert after.sequence > before.sequence
    assert before.sample_id != after.sample_id


async def _report_one_sample(
    directory: Path, clock: ManualClock, task_id: str
) -> agent_pb2.UsageSample:
    node, outbox, spool = make_node(SimulatedBackend(SPEC, clock), directory, clock)
    sleeper = (sys.executable, "-c", "import time; time.sleep(60)")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        assert node.runner is not None
        uuid = node.backend.discover().accelerators[0].uuid
        await node.runner.start(TaskSpec("job", task_id, (uuid,), sleeper))
        clock.advance(10)
        assert node.report_usage() == 1
        outbox.flush_to_spool()
        await node.runner.stop(task_id, "cleanup")
    (sample,) = usage_samples(spool)
    spool.close()
    return sample


async def test_lost_state_reuses_no_sample_id(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    before = await _report_one_sample(tmp_path / "first", clock, "job/1/0")
    # The operator moves the damaged state away and starts again; the spool was already sent.
    after = await _report_one_sample(tmp_path / "second", clock, "job/2/0")
    assert after.sequence == before.sequence
    assert before.sample_id != after.sample_id
