"""Nodes as ``acsp.v1.Node`` messages, for the fleet RPCs and the record of a deleted node."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from acsp.v1 import common_pb2, scheduler_pb2

from .engine_adapter import AcceleratorHealth, EngineAdapter
from .fleet import AcceleratorView, NodeView


def failures_by_accelerator(
    engine: EngineAdapter,
) -> dict[tuple[str, str], AcceleratorHealth]:
    """Index the leader's failed accelerators by node key and accelerator id."""
    return {(f.node_key, f.accelerator_id): f for f in engine.failed_accelerators()}


def _accelerator_to_proto(
    node: NodeView, acc: AcceleratorView, failures: Mapping[tuple[str, str], AcceleratorHealth]
) -> scheduler_pb2.Accelerator:
    """Convert one accelerator, failed if the leader keeps it out of placement.

    The leader's failure list wins over the inventory: a failure stays until the agent
    reports the condition cleared, even when a later inventory calls the device healthy.
    """
    msg = scheduler_pb2.Accelerator(
        accelerator_id=acc.accelerator_id,
        pci_bus_id=acc.pci_bus_id,
        model=acc.model,
        interconnect_domain=acc.interconnect_domain,
        health=scheduler_pb2.HEALTH_STATE_OK if acc.healthy else scheduler_pb2.HEALTH_STATE_FAILED,
    )
    failure = failures.get((node.key, acc.accelerator_id))
    if failure is not None:
        msg.health = scheduler_pb2.HEALTH_STATE_FAILED
        trigger = "inventory" if failure.event_id.startswith("inventory:") else "event:health"
        msg.health_cause.CopyFrom(
            common_pb2.Cause(trigger=trigger, reference_id=failure.event_id, reason=failure.reason)
        )
    return msg


def node_to_proto(
    node: NodeView,
    failures: Mapping[tuple[str, str], AcceleratorHealth],
    jobs: Mapping[str, list[str]],
) -> scheduler_pb2.Node:
    msg = scheduler_pb2.Node(
        node_id=node.node,
        provider_id=node.provider,
        region_id=node.region,
        state=scheduler_pb2.NodeState.Value(f"NODE_STATE_{shown_status(node, jobs).upper()}"),  # type: ignore[arg-type]
        accelerators=[_accelerator_to_proto(node, acc, failures) for acc in node.accelerators],
        software_stacks=node.software_stacks,
        state_cause=_state_cause(node),
        job_ids=jobs.get(node.key, ()),
    )
    if node.last_heartbeat:
        msg.last_heartbeat_time.FromNanoseconds(int(node.last_heartbeat * 1e9))
    return msg


def shown_status(node: NodeView, jobs: Mapping[str, list[str]]) -> str:
    """Return the status that node lists show: a draining node that runs nothing is drained.

    ``jobs`` maps node keys to the jobs that may still run a task there, including copies
    whose stop is not yet confirmed, so a node is drained only once every stop is confirmed.
    """
    if node.status == "draining" and not jobs.get(node.key):
        return "drained"
    return node.status


DRAIN_TRIGGERS: Final[Mapping[str, str]] = {
    "operator": "rpc:DrainNode",
    "agent": "agent:drain_requested",
}
"""The trigger of a draining node's state cause, by who requested the drain."""


def _state_cause(node: NodeView) -> common_pb2.Cause:
    """Return the cause of ``node``'s state. For a draining node it names who requested the
    drain, and when."""
    drain = node.drain
    if drain is None or node.status not in ("draining", "drained"):
        return common_pb2.Cause(reason=node.status_reason)
    cause = common_pb2.Cause(trigger=DRAIN_TRIGGERS[drain.source], reason=drain.reason)
    if drain.at:
        cause.time.FromNanoseconds(int(drain.at * 1e9))
    return cause
