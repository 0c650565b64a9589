"""The placement engine: a pure, deterministic scheduler over a federated accelerator fleet.

Build an :class:`Engine` with an :class:`EngineConfig`, add nodes and pledges, submit jobs,
apply events, and call :meth:`Engine.schedule` with the current time to get decisions
(place, replace a lost task, preempt, requeue, reserve) and the reason every pending job
waits. The engine reads no clock and does no I/O.
"""

from scheduler.engine.catalog import DEFAULT_CATALOG, AcceleratorModel, Catalog
from scheduler.engine.decisions import (
    Cause,
    Decision,
    Place,
    Preempt,
    ReasonCode,
    ReplaceTask,
    Requeue,
    Reserve,
    ScheduleResult,
    TaskPlacement,
    Waiting,
)
from scheduler.engine.engine import Engine
from scheduler.engine.events import (
    BudgetChanged,
    Event,
    JobEnded,
    JobOutcome,
    NodeAdded,
    NodeDown,
    NodeDrain,
    NodeHeartbeat,
    NodeMissedHeartbeats,
    PledgeAdded,
    PledgeRemoved,
    RecallAnnounced,
    RecallEnded,
    TasksStopped,
)
from scheduler.engine.fairshare import Level
from scheduler.engine.spec import (
    MILLIS_PER_ACCELERATOR,
    EngineConfig,
    InvalidInputError,
    JobSpec,
    Limit,
    LimitScope,
    ModelConstraint,
    NodeSpec,
    NodeState,
    Pledge,
    PriorityClass,
    Topology,
)

__all__ = [
    "DEFAULT_CATALOG",
    "MILLIS_PER_ACCELERATOR",
    "AcceleratorModel",
    "BudgetChanged",
    "Catalog",
    "Cause",
    "Decision",
    "Engine",
    "EngineConfig",
    "Event",
    "InvalidInputError",
    "JobEnded",
    "JobOutcome",
    "JobSpec",
    "Level",
    "Limit",
    "LimitScope",
    "ModelConstraint",
    "NodeAdded",
    "NodeDown",
    "NodeDrain",
    "NodeHeartbeat",
    "NodeMissedHeartbeats",
    "NodeSpec",
    "NodeState",
    "Place",
    "Pledge",
    "PledgeAdded",
    "PledgeRemoved",
    "Preempt",
    "PriorityClass",
    "ReasonCode",
    "RecallAnnounced",
    "RecallEnded",
    "ReplaceTask",
    "Requeue",
    "Reserve",
    "ScheduleResult",
    "TaskPlacement",
    "TasksStopped",
    "Topology",
    "Waiting",
]
