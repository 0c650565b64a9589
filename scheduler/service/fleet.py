"""The scheduler's view of nodes, built from agent inventories and heartbeats (no I/O).

A node is ``up`` while heartbeats arrive within ``heartbeat_timeout_s``. When they stop it
becomes ``unknown``: nothing new is placed on it and its accelerators stay held until its
agent confirms the tasks stopped (a later inventory or heartbeat without them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from services.runtime.evolve import evolve

from .rendezvous import NodeEndpoint, default_endpoint

NodeStatus = Literal["up", "draining", "drained", "unknown", "down"]
NODE_STATUSES: Final[tuple[str, ...]] = ("up", "draining", "drained", "unknown", "down")
DrainSource = Literal["agent", "operator"]

AGENT_WITHDREW: Final = "agent withdrew its drain request"


@dataclass(frozen=True, slots=True)
class Drain:
    """The source, reason and time of a request that started or ended a node's drain."""

    source: DrainSource
    reason: str
    at: float
    """Unix seconds of the request. For the agent's requests and withdrawals this is the
    agent's clock, so that it is compared only with other times of the same agent."""


@dataclass(frozen=True, slots=True)
class AcceleratorView:
    """One accelerator as its node's inventory reported it."""

    accelerator_id: str
    model: str
    interconnect_domain: str = ""
    healthy: bool = True
    pci_bus_id: str = ""


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node: identity, inventory and the state the scheduler derives."""

    provider: str
    region: str
    node: str
    accelerators: tuple[AcceleratorView, ...] = ()
    software_stacks: tuple[str, ...] = ()
    status: NodeStatus = "up"
    status_reason: str = ""
    boot_id: str = ""
    last_heartbeat: float = 0.0
    drain: Drain | None = None
    """The drain in force, or None when the node does not drain."""
    running_task_ids: frozenset[str] = field(default_factory=frozenset)
    """Task ids the agent said it runs in its latest inventory or heartbeat."""
    max_jobs: int = 0
    """Jobs the node runs at once at most (the size of its agent's pool of task users), from
    its latest inventory; 0 is no limit."""
    host: str = ""
    """Address or hostname at which other nodes' tasks reach this node's tasks, from its
    latest inventory; empty from agents that do not report one."""
    rendezvous_ports: tuple[int, int] | None = None
    """Inclusive range of rendezvous ports from its latest inventory, or None when the agent
    reports none."""

    @property
    def key(self) -> str:
        return f"{self.provider}.{self.region}.{self.node}"

    @property
    def draining(self) -> bool:
        return self.drain is not None

    @property
    def agent_drained(self) -> bool:
        """Whether the node drains because its agent requested it, which the agent may undo."""
        return self.drain is not None and self.drain.source == "agent"

    @property
    def name(self) -> str:
        """``provider/region/node``, the node as the CLI and job messages show it."""
        return f"{self.provider}/{self.region}/{self.node}"

    @property
    def model(self) -> str:
        """The node's accelerator model; nodes carry one model, as the engine assumes."""
        return self.accelerators[0].model if self.accelerators else ""


@dataclass(frozen=True, slots=True)
class DrainChange:
    """A drain that started or ended, as ``scheduler.nodes`` stores it."""

    node_key: str
    draining: bool
    cause: Drain
    """The request that started or ended it."""


@dataclass(frozen=True, slots=True)
class NodeChange:
    """A node whose status changed, and why."""

    node: NodeView
    previous: NodeStatus | None
    """``None`` for a node seen for the first time."""
    reason: str


class FleetView:
    """Nodes by key; every method returns what changed so the caller can feed the engine."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._nodes: dict[str, NodeView] = {}
        self._seen: dict[str, float] = {}
        """Latest heartbeat time per node, updated without rebuilding the node's view."""
        self._loaded: set[str] = set()
        """Nodes loaded from storage that no inventory or heartbeat has reached since."""

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def endpoint(self, key: str) -> NodeEndpoint:
        """Return where other nodes' tasks reach the tasks of node ``key``.

        A node without a reported host is reached at its node id, and one without a port
        range uses the default range.
        """
        node = self._nodes.get(key)
        fallback = default_endpoint(key)
        if node is None:
            return fallback
        return NodeEndpoint(node.host or fallback.host, node.rendezvous_ports or fallback.ports)

    def get(self, key: str) -> NodeView | None:
        node = self._nodes.get(key)
        if node is None:
            return None
        return self._fresh(node)

    def nodes(self) -> list[NodeView]:
        return [self._fresh(node) for node in self._nodes.values()]

    def touch(self, key: str, now: float, drain_requested: bool | None = None) -> bool:
        """Record a heartbeat that changes nothing else, or return False if it needs the full
        path.

        The full path is needed for a node that is not up or draining, and for a heartbeat
        that may change the node's drain. ``drain_requested`` is True for a drain request,
        which drains a node that does not drain yet. It is False for a ready agent, which may
        end a drain that the agent requested, and None for any other state of the agent.
        """
        node = self._nodes.get(key)
        if node is None or node.status not in ("up", "draining"):
            return False
        if drain_requested is True and not node.draining:
            return False
        if drain_requested is False and node.agent_drained:
            return False
        self._seen[key] = max(now, self._seen.get(key, 0.0))
        return True

    def heard(self, key: str, now: float) -> None:
        """Record that an up or draining node sent a heartbeat, before the loop applies it.

        The loop may apply the heartbeat's task list seconds later, behind a backlog of other
        inputs. Recording the time here keeps that backlog from making a live node unknown.
        """
        node = self._nodes.get(key)
        if node is not None and node.status in ("up", "draining"):
            self._seen[key] = max(now, self._seen.get(key, 0.0))

    def _fresh(self, node: NodeView) -> NodeView:
        seen = self._seen.get(node.key, 0.0)
        return evolve(node, last_heartbeat=seen) if seen > node.last_heartbeat else node

    def apply_inventory(self, node: NodeView, now: float) -> NodeChange:
        """Record a node's inventory; a new or returning node is ``up`` unless drained."""
        old = self._nodes.get(node.key)
        drain = old.drain if old else node.drain
        status: NodeStatus = "draining" if drain else "up"
        updated = evolve(node, status=status, last_heartbeat=now, drain=drain)
        self._nodes[node.key] = updated
        self._seen[node.key] = now
        self._loaded.discard(node.key)
        return NodeChange(updated, old.status if old else None, "inventory received")

    def load(self, node: NodeView, now: float) -> NodeChange:
        """Record a node stored by an earlier leader, as heard from at ``now``.

        That time is used until :meth:`replay_heartbeat` sets the node's real last heartbeat.
        """
        change = self.apply_inventory(node, now)
        self._loaded.add(node.key)
        return change

    def apply_heartbeat(
        self, key: str, boot_id: str, running: frozenset[str], now: float
    ) -> NodeChange | None:
        """Record a heartbeat; return the change if an unknown node came back."""
        old = self._nodes.get(key)
        if old is None:
            return None
        status = old.status
        reason = old.status_reason
        if status in ("unknown", "down"):
            status = "draining" if old.draining else "up"
            # The reason of the missed heartbeats or of the down mark no longer applies.
            reason = "heartbeats resumed"
        updated = evolve(
            old,
            last_heartbeat=max(now, old.last_heartbeat),
            boot_id=boot_id or old.boot_id,
            running_task_ids=running,
            status=status,
            status_reason=reason,
        )
        self._nodes[key] = updated
        self._seen[key] = max(now, self._seen.get(key, 0.0))
        self._loaded.discard(key)
        if status != old.status:
            return NodeChange(updated, old.status, reason)
        return None

    def receive_heartbeat(
        self, key: str, boot_id: str, running: frozenset[str], received_at: float, now: float
    ) -> tuple[NodeChange | None, bool]:
        """Record a live heartbeat received at ``received_at`` and applied at ``now``.

        Return the change if an unknown node came back, and whether the heartbeat is a sign of
        life. One that waited longer than the heartbeat timeout before it was applied is not,
        so it changes nothing, as an overdue replayed heartbeat does. A ``received_at`` of
        0.0 counts as received at ``now``.
        """
        heard_at = min(received_at, now) if received_at > 0.0 else now
        if self.overdue(heard_at, now):
            return None, False
        return self.apply_heartbeat(key, boot_id, running, heard_at), True

    def overdue(self, heard_at: float, now: float) -> bool:
        """Return whether a node last heard from at ``heard_at`` has missed its heartbeats."""
        return heard_at < now - self.heartbeat_timeout_s

    def replay_heartbeat(
        self, key: str, boot_id: str, running: frozenset[str], sent_at: float, now: float
    ) -> NodeChange | None:
        """Record a stored heartbeat that a new leader's watch replays, as received at ``sent_at``.

        A node that :meth:`load` added and nothing has reached since takes ``sent_at`` as its
        last heartbeat, so :meth:`expire` marks it unknown if that is overdue. A ``sent_at`` of
        0.0 (not known) keeps the time it was loaded at. An overdue heartbeat brings no
        unknown node back, and no replayed one brings a down node back. Return the change if
        an unknown node came back.
        """
        old = self._nodes.get(key)
        if old is None or old.status == "down":
            return None
        sent_at = min(sent_at, now)
        if key in self._loaded and sent_at > 0.0:
            self._loaded.discard(key)
            self._nodes[key] = evolve(old, last_heartbeat=sent_at)
            self._seen[key] = sent_at
        if self.overdue(sent_at, now):
            return None
        heard_at = max(sent_at, self._seen.get(key, 0.0), self._nodes[key].last_heartbeat)
        return self.apply_heartbeat(key, boot_id, running, heard_at)

    def expire(self, now: float) -> list[NodeChange]:
        """Mark nodes whose last heartbeat is older than the timeout as ``unknown``."""
        changes: list[NodeChange] = []
        limit = now - self.heartbeat_timeout_s
        for key, node in self._nodes.items():
            seen = max(node.last_heartbeat, self._seen.get(key, 0.0))
            if node.status in ("up", "draining") and seen < limit:
                reason = f"no heartbeat for {now - seen:.1f} s"
                updated = evolve(node, status="unknown", status_reason=reason)
                self._nodes[key] = updated
                changes.append(NodeChange(updated, node.status, reason))
        return changes

    def set_down(self, key: str, reason: str) -> NodeChange | None:
        """Mark an ``unknown`` node ``down``, or return None if it is in another state.

        Raises ``KeyError`` for a key that names no node. A heartbeat makes the node up again.
        """
        old = self._fresh(self._nodes[key])
        if old.status != "unknown":
            return None
        updated = evolve(old, status="down", status_reason=reason, running_task_ids=frozenset())
        self._nodes[key] = updated
        return NodeChange(updated, old.status, reason)

    def remove(self, key: str) -> None:
        """Forget node ``key``, so that heartbeats under its key change nothing until an
        inventory adds it again as a new node."""
        self._nodes.pop(key, None)
        self._seen.pop(key, None)
        self._loaded.discard(key)

    def restore_down(self, key: str, reason: str) -> NodeView:
        """Mark a node down whatever its state, as a new leader does for a node stored as down.

        Raises ``KeyError`` for a key that names no node. A heartbeat makes the node up again.
        """
        old = self._fresh(self._nodes[key])
        updated = evolve(old, status="down", status_reason=reason, running_task_ids=frozenset())
        self._nodes[key] = updated
        return updated

    def operator_drain(
        self, key: str, draining: bool, reason: str, now: float
    ) -> DrainChange | None:
        """Start or end a drain for an operator, and return None if that changes nothing.

        An operator's drain replaces an agent's, so the agent can no longer withdraw it, and
        an operator's undrain ends either. Raises ``KeyError`` for an unknown node key.
        """
        old = self._fresh(self._nodes[key])
        cause = Drain("operator", reason, now)
        current = old.drain
        if draining:
            if current is not None and (current.source, current.reason) == ("operator", reason):
                return None
            self._set_drain(old, cause)
        else:
            if current is None:
                return None
            self._set_drain(old, None, reason)
        return DrainChange(key, draining, cause)

    def agent_drain(self, key: str, reason: str, sent_at: float) -> DrainChange | None:
        """Start a drain that a node's agent requested at ``sent_at`` by its own clock.

        Return None if the node already drains, because an operator's drain stays the
        operator's and an agent's keeps the time of its first request. Raises ``KeyError`` for
        an unknown node key.
        """
        old = self._fresh(self._nodes[key])
        if old.drain is not None:
            return None
        cause = Drain("agent", reason, sent_at)
        self._set_drain(old, cause)
        return DrainChange(key, True, cause)

    def agent_withdraw(self, key: str, sent_at: float) -> DrainChange | None:
        """End the drain a node's agent requested, because its heartbeat sent at ``sent_at``
        reports it ready. Return None if that changes nothing.

        Only an agent's drain ends, and only one requested before ``sent_at`` (or with no
        time), so an older heartbeat that reaches the scheduler after the request cannot undo
        it. Raises ``KeyError`` for an unknown node key.
        """
        old = self._fresh(self._nodes[key])
        drain = old.drain
        if drain is None or drain.source != "agent":
            return None
        if sent_at <= drain.at and drain.at != 0.0:
            return None
        self._set_drain(old, None, AGENT_WITHDREW)
        return DrainChange(key, False, Drain("agent", AGENT_WITHDREW, sent_at))

    def _set_drain(self, old: NodeView, drain: Drain | None, reason: str = "") -> None:
        status: NodeStatus = old.status
        if old.status in ("up", "draining", "drained"):
            status = "draining" if drain else "up"
        updated = evolve(
            old, drain=drain, status=status, status_reason=drain.reason if drain else reason
        )
        self._nodes[old.key] = updated
