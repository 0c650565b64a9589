"""The start command fields that let a job's tasks find each other.

Every task of a job gets the same fields: the hosts of the job's nodes, each task's node, and
the port that task 0 listens on. They are serialized once per job and appended to each task's
serialized command, which protobuf parses as one message, so a gang of N tasks builds the
host list once instead of N times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from acsp.rendezvous import DEFAULT_PORT_RANGE, rendezvous_port
from acsp.v1 import agent_pb2

from .model import Job


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """The host and rendezvous ports by which other nodes' tasks reach a node's tasks."""

    host: str
    """Address or hostname."""
    ports: tuple[int, int]
    """Inclusive range of the node's rendezvous ports."""


EndpointOf = Callable[[str], NodeEndpoint]
"""Returns the endpoint of a node key (``provider.region.node``)."""


def default_endpoint(node_key: str) -> NodeEndpoint:
    """Return the endpoint of a node whose agent reported none: its node id and the default
    port range."""
    return NodeEndpoint(node_key.split(".", 2)[-1], DEFAULT_PORT_RANGE)


def rendezvous_fields(job: Job, endpoint_of: EndpointOf) -> bytes:
    """Serialize the rendezvous fields of ``job``'s current placement as ``AgentCommand`` bytes.

    A one-task job gets only its port, so its commands grow by a few bytes.
    """
    tasks = sorted(job.placement, key=lambda task: task.task_index)
    if not tasks:
        return b""
    low, high = endpoint_of(tasks[0].node_key).ports
    message = agent_pb2.AgentCommand(
        rendezvous_port=rendezvous_port(job.job_id, job.attempt, low, high)
    )
    if len(tasks) > 1:
        positions: dict[str, int] = {}
        hosts: list[str] = []
        indexes: list[int] = []
        for task in tasks:
            position = positions.get(task.node_key)
            if position is None:
                position = positions[task.node_key] = len(hosts)
                hosts.append(endpoint_of(task.node_key).host)
            indexes.append(position)
        message.node_hosts.extend(hosts)
        message.task_node_indexes.extend(indexes)
    return message.SerializeToString(deterministic=True)
