"""Node deletion: which nodes an operator may delete, and the record that each deletion leaves.

The scheduler keeps a node's accelerators from other jobs until every task copy there is
confirmed stopped. A deleted node has no such copy, so no record of it is needed to keep that
promise, and heartbeats under its key change nothing until its agent sends an inventory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fleet import FleetView, NodeView
from .node_proto import node_to_proto, shown_status

if TYPE_CHECKING:
    from .jobbook import JobBook

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeDeletion:
    """A deleted node, as ``scheduler.node_deletions`` records it."""

    node_key: str
    request_id: str
    """The request id of the DeleteNode call, empty for a call that sent none."""
    reason: str
    deleted_by: str
    """The subject of the caller."""
    node_message: bytes
    """The serialized ``acsp.v1.Node`` that the call returns: the node as it was."""


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """The result of a DeleteNode request in the scheduling loop."""

    node: NodeView | None
    """The node as it was before the request, or None for a key that names no node."""
    status: str = ""
    """The node's status as node lists show it."""
    jobs: tuple[str, ...] = ()
    """Jobs that may still run a task on the node, which keep it from being deleted."""
    deletion: NodeDeletion | None = None
    """The deletion, or None when the node was not deleted."""


def delete_node(
    fleet: FleetView, book: JobBook, key: str, reason: str, request_id: str, deleted_by: str
) -> DeleteOutcome:
    """Delete node ``key`` from ``fleet`` and the engine if it was drained, by its operator or
    at its agent's request, or marked down, and no job may still run a task on it.

    Jobs count while a task of theirs there is assigned or started, and while a copy there
    waits for its stop to be confirmed. A drained node whose agent stopped, which shows as
    unknown, can be deleted too, because nothing runs there that a stop must still reach.
    Otherwise, and for a key that names no node, nothing changes.
    """
    node = fleet.get(key)
    if node is None:
        return DeleteOutcome(None)
    jobs = tuple(book.jobs_by_node().get(key, ()))
    status = shown_status(node, {key: list(jobs)})
    if not jobs:
        # The engine's allocations are checked too, so that none that it keeps for a job
        # disappears with the node.
        jobs = tuple(book.engine.jobs_on_node(key))
    if jobs or not (node.draining or node.status == "down"):
        return DeleteOutcome(node, status, jobs)
    engine = book.engine
    failures = {
        (failure.node_key, failure.accelerator_id): failure
        for failure in engine.failed_accelerators()
        if failure.node_key == key
    }
    message = node_to_proto(node, failures, {})
    engine.remove_node(key)
    fleet.remove(key)
    logger.info(
        "node %s deleted by %s (request %s): %s",
        key,
        deleted_by or "an unnamed caller",
        request_id or "without id",
        reason or "no reason given",
    )
    deletion = NodeDeletion(key, request_id, reason, deleted_by, message.SerializeToString())
    return DeleteOutcome(node, status, (), deletion)
