"""Usage reports are split so that each stays under USAGE_REPORT_MAX_BYTES."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from acsp.v1 import agent_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.model import TaskSpec, UsageSample
from agents.node import MAX_SAMPLE_US
from tests.agent.helpers import NODE, ManualClock, make_node

SPEC = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 8)


def sample(sequence: int) -> UsageSample:
    return UsageSample(
        sample_id=f"{NODE.key}/{sequence}",
        sequence=sequence,
        job_id="job",
        task_id="job/1/0",
        accelerator_uuid=f"GPU-{sequence % 8}",
        start_time=1_800_000_000.0,
        end_time=1_800_000_010.0,
        share_milli=1000,
        accelerator_seconds_us=10_000_000,
        utilization_percent=50.0,
        memory_used_bytes=1 << 30,
    )


def test_small_report_not_split() -> None:
    samples = [sample(i) for i in range(8)]
    reports = wire.usage_report_messages(NODE, "boot-1", samples, {})
    assert len(reports) == 1
    assert reports[0] == wire.usage_report_message(NODE, "boot-1", samples, {})


def test_large_report_split_in_order() -> None:
    samples = [sample(i) for i in range(500)]
    reports = wire.usage_report_messages(NODE, "boot-1", samples, {}, max_bytes=4096)
    assert len(reports) > 10
    for report in reports:
        assert report.ByteSize() <= 4096
        assert report.node == NODE.message()
        assert report.boot_id == "boot-1"
    sequences = [item.sequence for report in reports for item in report.samples]
    assert sequences == list(range(500))


def test_report_fills_up_to_limit() -> None:
    samples = [sample(i) for i in range(50)]
    whole = wire.usage_report_message(NODE, "boot-1", samples, {})
    reports = wire.usage_report_messages(NODE, "boot-1", samples, {}, whole.ByteSize())
    assert len(reports) == 1
    split = wire.usage_report_messages(NODE, "boot-1", samples, {}, whole.ByteSize() - 1)
    assert len(split) == 2


def test_oversize_sample_gets_own_report() -> None:
    samples = [sample(i) for i in range(3)]
    reports = wire.usage_report_messages(NODE, "boot-1", samples, {}, max_bytes=10)
    assert [len(report.samples) for report in reports] == [1, 1, 1]


def test_no_samples_no_report() -> None:
    assert wire.usage_report_messages(NODE, "boot-1", [], {}) == []


async def test_long_outage_usage_split(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    node, outbox, spool = make_node(SimulatedBackend(SPEC, clock), tmp_path, clock)
    sleeper = (sys.executable, "-c", "import time; time.sleep(60)")
    hours = 14 * 24
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        assert node.runner is not None
        uuids = tuple(a.uuid for a in node.backend.discover().accelerators)
        await node.runner.start(TaskSpec("job", "job/1/0", uuids, sleeper))
        # Two weeks without a report, as after an agent outage: one sample per GPU and hour.
        clock.advance(hours * MAX_SAMPLE_US / 1_000_000)
        assert node.report_usage() == 8 * hours
        outbox.flush_to_spool()
        await node.runner.stop("job/1/0", "cleanup")

    records = [r for r in spool.peek(10_000) if r.subject.startswith("acsp.usage.")]
    assert len(records) > 1
    samples: list[agent_pb2.UsageSample] = []
    for record in records:
        assert len(record.payload) <= wire.USAGE_REPORT_MAX_BYTES
        report = agent_pb2.UsageReport()
        report.ParseFromString(record.payload)
        assert record.msg_id == f"usage:{report.samples[0].sample_id}"
        samples.extend(report.samples)
    assert len(samples) == 8 * hours
    assert len({item.sample_id for item in samples}) == 8 * hours
    sequences = [item.sequence for item in samples]
    assert sequences == sorted(sequences)
