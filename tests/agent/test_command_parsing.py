"""Commands that would break the node's accounting or its tasks' files are rejected when parsed."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.v1 import agent_pb2, scheduler_pb2
from agents.wire import InvalidCommand, parse_command
from tests.agent.helpers import NODE


def _start(*shares: tuple[str, int], run_s: float = 0.0) -> bytes:
    return agent_pb2.AgentCommand(
        command_id="start-1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id="job/1/0",
        job_id="job",
        accelerators=[
            scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=millis)
            for uuid, millis in shares
        ],
        simulated_run_seconds=run_s,
    ).SerializeToString()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_start(("GPU-1", 1000), ("GPU-1", 1000)), r"lists GPU-1 more than once"),
        (_start(("GPU-1", 400), ("GPU-2", 0), ("GPU-1", 400)), r"lists GPU-1 more than once"),
        (_start(("", 1000)), r"entry without accelerator_id"),
        (_start(("GPU-1", 1000), run_s=float("nan")), r"simulated_run_seconds nan is not"),
        (_start(("GPU-1", 1000), run_s=float("inf")), r"simulated_run_seconds inf is not"),
        (_start(("GPU-1", 1000), run_s=-1.0), r"simulated_run_seconds -1.0 is not"),
    ],
)
def test_start_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        parse_command(data)


def test_distinct_shares_accepted() -> None:
    command = parse_command(_start(("GPU-1", 500), ("GPU-2", 0), run_s=3.5))
    assert command.spec is not None
    assert command.spec.accelerators == ("GPU-1", "GPU-2")
    assert command.spec.accelerator_millis == (500, 1000)
    assert command.spec.simulated_run_time_s == 3.5


def _hosts(hosts: list[str], indexes: list[int], task_id: str = "job/1/1") -> bytes:
    return agent_pb2.AgentCommand(
        command_id="hosts-1",
        kind=agent_pb2.COMMAND_KIND_UPDATE_HOSTS,
        node=NODE.message(),
        task_id=task_id,
        job_id="job",
        node_hosts=hosts,
        task_node_indexes=indexes,
        time=Timestamp(seconds=1_700_000_000, nanos=5000),
        placement_version=3,
    ).SerializeToString()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_hosts([], []), r"node_hosts and task_node_indexes are required for UPDATE_HOSTS"),
        (_hosts(["h-a"], []), r"node_hosts and task_node_indexes are required"),
        (_hosts(["h-a"], [0, 1]), r"task_node_indexes refers to node 1, but node_hosts has 1"),
        (_hosts(["h-a"], [0]), r"task index 1 is beyond the 1 tasks"),
        (_hosts(["h-a"], [0, 0], task_id=""), r"task_id is required"),
    ],
)
def test_hosts_update_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        parse_command(data)


def test_hosts_update_accepted() -> None:
    command = parse_command(_hosts(["h-a", "h-b"], [0, 1]))
    assert command.kind == "hosts"
    assert command.task_id == "job/1/1"
    assert command.placement is not None
    assert command.placement.task_hosts("own") == ["h-a", "h-b"]
    assert command.issued_at_ns == 1_700_000_000_000_005_000
    assert command.placement_version == 3
