"""The start command fields that let a job's tasks find each other, and the ports they use.

Every task of a job gets the same fields: the hosts of the job's nodes, each task's node, and
the port that task 0 listens on. They are serialized once per job and appended to each task's
serialized command, which protobuf parses as one message, so a gang of N tasks builds the
host list once instead of N times. :class:`RendezvousPorts` chooses the port so that no two
started attempts on one node share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from acsp.rendezvous import DEFAULT_PORT_RANGE, rendezvous_port
from acsp.v1 import agent_pb2

from .model import Job

logger = logging.getLogger(__name__)


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

    The port is ``job.rendezvous_port``, or the hashed port of task 0's range for a job that
    stored none. A one-task job gets only its port, so its commands grow by a few bytes.
    """
    tasks = sorted(job.placement, key=lambda task: task.task_index)
    if not tasks:
        return b""
    port = job.rendezvous_port
    if not port:
        low, high = endpoint_of(tasks[0].node_key).ports
        port = rendezvous_port(job.job_id, job.attempt, low, high)
    message = agent_pb2.AgentCommand(rendezvous_port=port)
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


class RendezvousPorts:
    """The rendezvous ports reserved on each node for task 0 copies that may still run.

    The caller reserves a port when an attempt's start commands go out and releases it once
    that attempt's task 0 copy is known to have stopped. Copies may share a port, when the
    range is full or as stored, and the port stays reserved until the last of them releases
    it. Each call costs a few dictionary operations, except that :meth:`reserve` probes past
    reserved ports, at most once per port of the range.
    """

    def __init__(self) -> None:
        self._reservations: dict[str, dict[int, list[str]]] = {}
        """Node key to port to the task ids of the copies it is reserved for, first holder
        first."""
        self._ports: dict[tuple[str, str], int] = {}
        """Node key and task id to the port reserved for the copy there."""
        self._exhausted: set[str] = set()
        """Nodes whose whole range was reserved at the last reservation there, warned about
        once until a port there is released."""

    def reserve(
        self, node_key: str, task_id: str, job_id: str, attempt: int, ports: tuple[int, int]
    ) -> int:
        """Reserve a port of the range ``ports`` on ``node_key`` for the copy ``task_id``.

        Probing starts at the hashed port of ``job_id`` and ``attempt`` and moves up through
        the range, wrapping around, to the first port not reserved. When every port of the
        range is reserved, the hashed port is shared with the copies that reserved it, and a
        warning names the node, because the attempt's task 0 may then fail to bind it.
        """
        reserved = self._ports.get((node_key, task_id))
        if reserved is not None:
            return reserved
        low, high = ports
        size = high - low + 1
        first = rendezvous_port(job_id, attempt, low, high)
        reservations = self._reservations.setdefault(node_key, {})
        for step in range(size):
            port = low + (first - low + step) % size
            if port not in reservations:
                reservations[port] = [task_id]
                self._ports[(node_key, task_id)] = port
                return port
        if node_key not in self._exhausted:
            self._exhausted.add(node_key)
            logger.warning(
                "every rendezvous port %d-%d of node %s is reserved, so task %s shares port %d"
                " with another job's task 0; widen ACSP_AGENT_RENDEZVOUS_PORTS on the node",
                low,
                high,
                node_key,
                task_id,
                first,
            )
        reservations[first].append(task_id)
        self._ports[(node_key, task_id)] = first
        return first

    def claim(self, node_key: str, task_id: str, port: int) -> None:
        """Record ``port`` on ``node_key`` as reserved for the copy ``task_id``, as stored.

        A port reserved for another copy is shared with it, because attempts started before
        ports were stored, or on a full range, may share one.
        """
        if (node_key, task_id) in self._ports:
            return
        holders = self._reservations.setdefault(node_key, {}).setdefault(port, [])
        holders.append(task_id)
        self._ports[(node_key, task_id)] = port

    def release(self, node_key: str, task_id: str) -> None:
        """Free the port reserved for the copy ``task_id`` on ``node_key``, if there is one,
        unless other copies share it."""
        port = self._ports.pop((node_key, task_id), None)
        if port is None:
            return
        reservations = self._reservations[node_key]
        holders = reservations[port]
        holders.remove(task_id)
        if holders:
            return
        del reservations[port]
        if not reservations:
            del self._reservations[node_key]
        self._exhausted.discard(node_key)

    def port_of(self, node_key: str, task_id: str) -> int:
        """Return the port reserved on ``node_key`` for the copy ``task_id``, or 0 for none."""
        return self._ports.get((node_key, task_id), 0)

    def reserved_for(self, node_key: str, port: int) -> str | None:
        """Return the task id of the first copy that ``port`` on ``node_key`` is reserved for,
        or None."""
        holders = self._reservations.get(node_key, {}).get(port)
        return holders[0] if holders else None
