"""The rendezvous fields of start commands, built without servers."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from acsp.rendezvous import DEFAULT_PORT_RANGE, rendezvous_port
from acsp.v1 import agent_pb2
from scheduler.service.agent_feed import node_from_inventory
from scheduler.service.commands import start_record
from scheduler.service.fleet import FleetView, NodeView
from scheduler.service.model import Job, JobSpec, TaskPlacement
from scheduler.service.rendezvous import NodeEndpoint, default_endpoint, rendezvous_fields

HOSTS = {"prov.reg.a": "10.0.0.1", "prov.reg.b": "10.0.0.2"}


def endpoint_of(key: str) -> NodeEndpoint:
    return NodeEndpoint(HOSTS[key], (40000, 40009))


def running_job(nodes: list[str], attempt: int = 1) -> Job:
    spec = JobSpec(
        name="train",
        project_id="proj",
        command=("true",),
        grant_id="g1",
        task_count=len(nodes),
        accelerator_millis_per_task=1000,
        wall_time_s=3600,
    )
    placement = tuple(
        TaskPlacement(index, "prov", "reg", node, (f"GPU-{index}",))
        for index, node in enumerate(nodes)
    )
    return Job(
        job_id="job-1",
        spec=spec,
        owner="alice",
        submitted_at=0.0,
        attempt=attempt,
        placement=placement,
    )


def decode(data: bytes) -> agent_pb2.AgentCommand:
    return agent_pb2.AgentCommand.FromString(data)


def test_gang_lists_each_node_once() -> None:
    job = running_job(["b", "a", "b", "a"])
    fields = decode(rendezvous_fields(job, endpoint_of))
    assert list(fields.node_hosts) == ["10.0.0.2", "10.0.0.1"]
    assert list(fields.task_node_indexes) == [0, 1, 0, 1]


def test_gang_port_from_task_zero_range() -> None:
    job = running_job(["b", "a"])
    fields = decode(rendezvous_fields(job, endpoint_of))
    assert fields.rendezvous_port == rendezvous_port("job-1", 1, 40000, 40009)
    assert 40000 <= fields.rendezvous_port <= 40009


def test_placement_order_does_not_matter() -> None:
    job = running_job(["b", "a", "a"])
    shuffled = replace(job, placement=tuple(reversed(job.placement)))
    assert rendezvous_fields(shuffled, endpoint_of) == rendezvous_fields(job, endpoint_of)


def test_one_task_job_gets_only_port() -> None:
    fields = decode(rendezvous_fields(running_job(["a"]), endpoint_of))
    assert not fields.node_hosts
    assert not fields.task_node_indexes
    assert fields.rendezvous_port != 0


def test_job_without_placement_gets_nothing() -> None:
    job = replace(running_job(["a"]), placement=())
    assert rendezvous_fields(job, endpoint_of) == b""


def test_port_changes_with_attempt() -> None:
    ports = {rendezvous_port("job-1", attempt, 40000, 49999) for attempt in range(1, 6)}
    assert len(ports) > 1


def test_start_record_carries_fields() -> None:
    job = running_job(["a", "b"])
    fields = rendezvous_fields(job, endpoint_of)
    record = start_record(job, job.placement[1], epoch=3, rendezvous=fields)
    command = decode(record.payload)
    assert command.task_id == "job-1/1/1"
    assert command.fencing_token == 3
    assert list(command.node_hosts) == ["10.0.0.1", "10.0.0.2"]
    assert list(command.task_node_indexes) == [0, 1]
    assert command.rendezvous_port == decode(fields).rendezvous_port


def test_fleet_endpoint_from_inventory() -> None:
    fleet = FleetView(heartbeat_timeout_s=15)
    node = NodeView("prov", "reg", "a", host="gpu-a.example", rendezvous_ports=(30000, 30010))
    fleet.apply_inventory(node, 0.0)
    assert fleet.endpoint("prov.reg.a") == NodeEndpoint("gpu-a.example", (30000, 30010))


def test_fleet_endpoint_defaults() -> None:
    fleet = FleetView(heartbeat_timeout_s=15)
    fleet.apply_inventory(NodeView("prov", "reg", "a"), 0.0)
    assert fleet.endpoint("prov.reg.a") == NodeEndpoint("a", DEFAULT_PORT_RANGE)
    assert fleet.endpoint("prov.reg.unseen") == default_endpoint("prov.reg.unseen")
    assert default_endpoint("prov.reg.unseen").host == "unseen"


def test_inventory_host_and_ports() -> None:
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="a"),
        host="gpu-a.example",
        rendezvous_port_min=30000,
        rendezvous_port_max=30010,
    )
    view = node_from_inventory(message)
    assert view.host == "gpu-a.example"
    assert view.rendezvous_ports == (30000, 30010)


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 0), (30010, 30000), (0, 30000), (30000, 70000), (80, 90), (1, 1023), (1023, 30000)],
)
def test_inventory_bad_ports_ignored(low: int, high: int) -> None:
    # The agent accepts only ports 1024 to 65535 in ACSP_AGENT_RENDEZVOUS_PORTS, so a range
    # below 1024 comes from an agent that skipped that check.
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="a"),
        rendezvous_port_min=low,
        rendezvous_port_max=high,
    )
    assert node_from_inventory(message).rendezvous_ports is None


@pytest.mark.parametrize(("low", "high"), [(1024, 1024), (1024, 65535), (65535, 65535)])
def test_inventory_edge_ports_kept(low: int, high: int) -> None:
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="a"),
        rendezvous_port_min=low,
        rendezvous_port_max=high,
    )
    assert node_from_inventory(message).rendezvous_ports == (low, high)


def test_inventory_bad_ports_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="low-ports"),
        rendezvous_port_min=80,
        rendezvous_port_max=90,
    )
    caplog.set_level(logging.WARNING, logger="scheduler.service.agent_feed")

    node_from_inventory(message)
    node_from_inventory(message)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "prov.reg.low-ports" in text
    assert "80-90" in text
    assert "1024 to 65535" in text
    assert "ACSP_AGENT_RENDEZVOUS_PORTS" in text
    assert f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}" in text


def test_inventory_without_ports_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Agents that predate the range report 0 for both ends.
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="no-ports")
    )
    caplog.set_level(logging.WARNING, logger="scheduler.service.agent_feed")

    assert node_from_inventory(message).rendezvous_ports is None
    assert caplog.records == []


@pytest.mark.parametrize("host", ["gpu-a\nevil", "x" * 101, "gpu a", "gpu-a/b"])
def test_inventory_bad_host_ignored(host: str) -> None:
    # The host goes into every gang member's hosts file, one line per task, and the start
    # command size limit counts hosts of at most 100 characters.
    message = agent_pb2.Inventory(
        node=agent_pb2.NodeRef(provider_id="prov", region_id="reg", node_id="a"),
        host=host,
    )
    assert node_from_inventory(message).host == ""
