"""Messages the scheduling loop receives from the gRPC handlers, NATS consumers and itself."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .admission import HoldOutcome
from .engine_adapter import AcceleratorHealth
from .fleet import NodeView
from .model import Job
from .node_deletion import DeleteOutcome
from .pledges import PledgeRecord, RecallRecord
from .providers import ProviderRecord

Ack = Callable[[], Awaitable[None]]
"""Acknowledges a NATS message; the loop calls it after the effects are committed."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """Jobs already stored by the submission batcher."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True, slots=True)
class CancelRequested:
    job_id: str
    reason: str
    cause: str
    reply: asyncio.Future[Job | None]


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """An operator's drain or undrain of a node."""

    node_key: str
    draining: bool
    reason: str
    reply: asyncio.Future[NodeView | None]
    """Resolved after the change is stored, with the node, or None for an unknown key."""


@dataclass(frozen=True, slots=True)
class AgentDrainRequested:
    """A drain that a node's agent requested in a health event."""

    node_key: str
    reason: str
    sent_at: float
    """The event's time by the agent's clock, in Unix seconds; 0.0 when it carries none."""
    ack: Ack | None = None


@dataclass(frozen=True, slots=True)
class NodeDownRequested:
    node_key: str
    reason: str
    reply: asyncio.Future[NodeView | None]
    """Resolved with the node as it is after the request, or None for an unknown key."""


@dataclass(frozen=True, slots=True)
class NodeDeleteRequested:
    """An operator's request to delete a node."""

    node_key: str
    reason: str
    request_id: str
    deleted_by: str
    """The subject of the caller."""
    reply: asyncio.Future[DeleteOutcome]
    """Resolved after the commit of the turn after the one that takes the request, because
    that turn applies it and stores the deletion."""


@dataclass(frozen=True, slots=True)
class InventoryReceived:
    node: NodeView
    payload: bytes
    """The serialized ``acsp.v1.Inventory``, stored so a new leader knows the node."""
    ack: Ack | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    node_key: str
    boot_id: str
    running: frozenset[str]
    drain_requested: bool | None = None
    """True when the agent requests a drain, False when it is ready (which withdraws a drain
    it requested), None for any other state, e.g. while it stops."""
    replayed: bool = False
    """True for the bucket's stored value that a new watch delivers first, which may have been
    sent before the node was marked down, or long ago by a node that is gone."""
    sent_at: float = 0.0
    """Epoch seconds at which a replayed heartbeat was stored, or 0.0 when that is not known.
    Live heartbeats leave it 0.0 and carry ``received_at``."""
    agent_time: float = 0.0
    """The time the heartbeat carries, by the agent's clock, in Unix seconds; 0.0 when it
    carries none. It is compared only with the time of the agent's drain request."""
    received_at: float = 0.0
    """Epoch seconds at which this process received a live heartbeat, or 0.0 to count it as
    received when the loop applies it."""


@dataclass(frozen=True, slots=True)
class TaskReported:
    node_key: str
    task_id: str
    state: str
    """``acsp.v1.TaskState`` name in lower case without its prefix, e.g. ``started``."""
    exit_code: int
    message: str
    ack: Ack | None = None
    checkpoint_ref: str = ""
    """Checkpoint reference the event carries; empty when it reports none."""
    checkpoint_at: float | None = None
    """When the agent read ``checkpoint_ref``, in Unix seconds."""
    node_busy: bool = False
    """Whether a ``start_failed`` task was rejected because its node ran as many jobs as it
    can, which does not count as a failed start."""


@dataclass(frozen=True, slots=True)
class AcceleratorHealthReported:
    """An accelerator that failed or recovered, from an agent's health event."""

    change: AcceleratorHealth
    ack: Ack | None = None


@dataclass(frozen=True, slots=True)
class PledgeChanged:
    """A pledge stored by the API, to apply to the engine."""

    pledge: PledgeRecord


@dataclass(frozen=True, slots=True)
class RecallAdded:
    """A recall stored by the API, with the pledge it draws on."""

    recall: RecallRecord
    pledge: PledgeRecord


@dataclass(frozen=True, slots=True)
class ProviderRegistered:
    """A provider registration stored by the API, to use when building engine inputs."""

    provider: ProviderRecord
    applied: asyncio.Future[None] | None = None
    """Resolved once the loop uses the registration, so the RPC returns after that."""


@dataclass(frozen=True, slots=True)
class HoldDone:
    job_id: str
    attempt: int
    outcome: HoldOutcome


@dataclass(frozen=True, slots=True)
class DependencyStates:
    """Stored states of jobs that others wait for, read because the loop did not know them."""

    states: tuple[tuple[str, str], ...]
    """Job id and state; ``not_found`` for an id the store does not hold."""


Input = (
    Submitted
    | CancelRequested
    | DrainRequested
    | AgentDrainRequested
    | NodeDownRequested
    | NodeDeleteRequested
    | InventoryReceived
    | HeartbeatReceived
    | TaskReported
    | AcceleratorHealthReported
    | HoldDone
    | PledgeChanged
    | RecallAdded
    | ProviderRegistered
    | DependencyStates
)
