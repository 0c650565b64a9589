"""The simulated backend: the real fleet files and traces, and a whole fleet in one process."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pytest

from acsp.v1 import agent_pb2
from agents.backends.fleet import (
    DEFAULT_FAULT_TRACE,
    DEFAULT_FLEETS,
    DEFAULT_UTILIZATION_TRACE,
    FleetNode,
    assign_faults,
    load_fault_trace,
    load_fleet,
    load_utilization_trace,
)
from agents.backends.simulated import SimulatedBackend
from agents.main import add_arguments, build_process, settings_from
from agents.model import DeviceEventKind, TaskSpec
from agents.simulated_inputs import SimulatedInputError
from tests.agent.helpers import ManualClock, make_node, published_health


def test_real_node_lists_load() -> None:
    openb = load_fleet(*DEFAULT_FLEETS[0])
    spot = load_fleet(*DEFAULT_FLEETS[1])
    assert len(openb) == 1213
    assert sum(n.accelerators for n in openb) == 6212
    assert {n.model for n in openb} == {"G2", "T4", "P100", "V100M16", "V100M32", "G3", "A10"}
    assert len(spot) == 4278
    assert sum(n.accelerators for n in spot) == 10412
    assert "H800" in {n.model for n in spot}
    assert len({n.node for n in openb + spot}) == len(openb) + len(spot)


def test_unknown_fleet_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("host,gpus\nx,1\n")
    with pytest.raises(ValueError, match="expected the openb node list"):
        load_fleet(path, "p", "r")


def test_fleet_memory_comes_from_catalog(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("node,model,accelerators\nmi-1,MI300X,8\ncpu-1,,0\n")
    (node,) = load_fleet(path, "p", "r")
    assert node.memory_bytes == 192 << 30


def test_fleet_model_outside_catalog_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("node,model,accelerators\nn1,T4,2\nn2,B200,8\n")
    with pytest.raises(ValueError, match=r"fleet\.csv, line 3: model 'B200' is not in") as caught:
        load_fleet(path, "p", "r")
    assert "MI300X" in str(caught.value)
    with pytest.raises(ValueError, match="not in the catalog"):
        FleetNode("p", "r", "n", "B200", 8)


def test_agent_exits_on_fleet_outside_catalog(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("node,model,accelerators\nn1,B200,8\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--backend", "simulated", "--fleet", f"{path}:p:r", "--state-dir", str(tmp_path)]
    )
    with pytest.raises(SimulatedInputError, match=r"^fleet file .*'B200' is not in the catalog"):
        build_process(settings_from(args), args)


@pytest.mark.parametrize(
    ("content", "node"),
    [
        ("sn,cpu_milli,memory_mib,gpu,model\nd1,1,1,2,T4\nd1,1,1,2,T4\n", "d1"),
        ("node,model,accelerators\nn-1,T4,2\nn2,T4,1\nn 1,T4,4\n", "n-1"),
        ("gpu_model,gpu_capacity_num,cpu_num,node_name\nT4,1,8,7\nT4,2,8,7\n", "spot-7"),
    ],
)
def test_repeated_fleet_node_is_rejected(tmp_path: Path, content: str, node: str) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        load_fleet(path, "acme", "eu-3")
    message = str(caught.value)
    assert f"fleet.csv, line {content.count(chr(10))}: node {node} of acme/eu-3" in message
    assert "is already on line 2" in message
    assert "give each node its own name" in message


def test_rows_of_other_regions_may_share_a_name(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("node,model,accelerators,provider,region\nn1,T4,2,a,r1\nn1,T4,2,a,r2\n")
    nodes = load_fleet(path, "p", "r")
    assert [(n.region, n.node) for n in nodes] == [("r1", "n1"), ("r2", "n1")]


def test_agent_exits_on_node_in_two_fleet_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("node,model,accelerators\nn1,T4,2\n")
    second.write_text("node,model,accelerators\nn2,T4,2\nn1,T4,2\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fleets = ["--fleet", f"{first}:p:r", "--fleet", f"{second}:p:r"]
    args = parser.parse_args(
        ["--backend", "simulated", *fleets, "--state-dir", str(tmp_path / "state")]
    )
    with pytest.raises(SimulatedInputError) as caught:
        build_process(settings_from(args), args)
    message = str(caught.value)
    assert f"fleet files {first} and {second} both list node n1 of p/r" in message
    assert "--fleet FILE:PROVIDER:REGION" in message


def test_agent_exits_on_fleet_file_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("node,model,accelerators\nn1,T4,2\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fleets = ["--fleet", f"{path}:p:r", "--fleet", f"{path}:p:r"]
    args = parser.parse_args(
        ["--backend", "simulated", *fleets, "--state-dir", str(tmp_path / "state")]
    )
    with pytest.raises(SimulatedInputError, match="both list node n1 of p/r"):
        build_process(settings_from(args), args)


def test_fault_trace_pairs_starts_and_ends() -> None:
    intervals = load_fault_trace(DEFAULT_FAULT_TRACE)
    assert len(intervals) == 584
    assert all(i.end_s >= i.start_s for i in intervals)
    causes = {i.cause for i in intervals}
    assert "fault_gpu_dbe_over_threshold" in causes
    assert "fault_node_hardware" in causes
    gpu_faults = [i for i in intervals if i.cause.startswith("fault_gpu")]
    assert all(i.accelerator_slot is not None for i in gpu_faults)
    assigned = assign_faults(intervals, 5000)
    assert sum(len(v) for v in assigned.values()) == 584
    assert assign_faults(intervals, 5000) == assigned


def test_utilization_trace_loads_from_archive() -> None:
    trace = load_utilization_trace(DEFAULT_UTILIZATION_TRACE)
    assert trace.series_count == 143
    values = [trace.utilization(f"task-{i}", 600.0 * i) for i in range(200)]
    assert all(0.0 <= v <= 100.0 for v in values)
    assert max(values) > 0.0


def test_replayed_fault_starts_and_ends() -> None:
    clock = ManualClock(0.0)
    spec = FleetNode("p", "r", "n", "H800", 8)
    faults = [i for i in load_fault_trace(DEFAULT_FAULT_TRACE) if i.cause == "fault_gpu_lost"]
    first = faults[0]
    backend = SimulatedBackend(spec, clock, speed=86_400.0, faults=[first])
    clock.now = (first.start_s + 1) / 86_400.0
    started = backend.poll_events()
    assert [e.kind for e in started] == [DeviceEventKind.FAULT_START]
    assert started[0].uuid in {a.uuid for a in backend.discover().accelerators}
    clock.now = (first.end_s + 1) / 86_400.0
    assert [e.kind for e in backend.poll_events()] == [DeviceEventKind.FAULT_END]


async def test_played_task_finishes_at_compressed_time(tmp_path: Path) -> None:
    clock = ManualClock()
    spec = FleetNode("acme", "eu-1", "node-1", "A100-SXM4-80GB", 8)
    backend = SimulatedBackend(spec, clock)
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    node._play_speed = 60.0
    backend.set_busy(node.busy)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = backend.discover().accelerators[0].uuid
        assert node.runner is not None
        await node.runner.start(TaskSpec("j", "j/1/0", (uuid,), (), simulated_run_time_s=600))
    clock.advance(9)
    node.runner.tick()
    assert [r.task_id for r in node.runner.running] == ["j/1/0"]
    clock.advance(2)
    node.runner.tick()
    assert node.runner.running == []
    assert node.report_usage() == 1
    assert published_health(outbox, spool) == []


async def test_fleet_of_5000_nodes_runs_in_one_process(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--backend", "simulated", "--nodes", "5000", "--state-dir", str(tmp_path)]
    )
    process = build_process(settings_from(args), args)
    assert len(process.nodes) == 5000
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for node in process.nodes:
            await node.start(group)
        await process._read_all()
        await process._usage_all()
        payloads = [node.heartbeat_payload() for node in process.nodes]
    elapsed = time.monotonic() - started
    assert len(payloads) == 5000
    fleet = load_fleet(*DEFAULT_FLEETS[0]) + load_fleet(*DEFAULT_FLEETS[1])
    expected = sum(spec.accelerators for spec in fleet[:5000])
    assert sum(len(n.accelerator_health()) for n in process.nodes) == expected
    # One round over the fleet must fit well inside a 5 s heartbeat period on one core.
    assert elapsed < 20, f"one round over 5,000 nodes took {elapsed:.1f} s"


async def test_shared_accelerator_usage_counts_each_share(tmp_path: Path) -> None:
    clock = ManualClock()
    spec = FleetNode("acme", "eu-1", "node-1", "T4", 2)
    backend = SimulatedBackend(spec, clock)
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    backend.set_busy(node.busy)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        assert node.runner is not None
        uuid = backend.discover().accelerators[0].uuid
        for name, millis in (("a", 500), ("b", 400), ("c", 200)):
            task = TaskSpec(
                name,
                f"{name}/1/0",
                (uuid,),
                (),
                simulated_run_time_s=3600,
                accelerator_millis=(millis,),
            )
            await node.runner.start(task)
    assert sorted(r.task_id for r in node.runner.running) == ["a/1/0", "b/1/0"]

    clock.advance(10)
    assert node.report_usage() == 2
    outbox.flush_to_spool()
    usage = [r for r in spool.peek(100) if r.subject.startswith("acsp.usage.")]
    report = agent_pb2.UsageReport()
    report.ParseFromString(usage[-1].payload)
    by_task = {s.task_id: s for s in report.samples}
    assert by_task["a/1/0"].share_millis == 500
    assert by_task["a/1/0"].accelerator_seconds.value == "5.000000"
    assert by_task["b/1/0"].share_millis == 400
    assert by_task["b/1/0"].accelerator_seconds.value == "4.000000"
