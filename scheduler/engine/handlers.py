"""Handlers that apply each engine event to the engine's state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scheduler.engine import events as ev
from scheduler.engine.records import job_of
from scheduler.engine.spec import InvalidInputError, NodeState

if TYPE_CHECKING:
    from scheduler.engine.engine import Engine

logger = logging.getLogger(__name__)


def _on_node_added(engine: Engine, event: ev.NodeAdded) -> None:
    engine.add_node(event.node)


def _on_heartbeat(engine: Engine, event: ev.NodeHeartbeat) -> None:
    node = engine.fleet.node(event.node_id)
    if node.state in (NodeState.UNKNOWN, NodeState.DOWN):
        back = NodeState.DRAINING if node.draining else NodeState.UP
        logger.info("node %s is %s again after %s", event.node_id, back, node.state)
        engine.fleet.set_state(node, back)


def _on_missed(engine: Engine, event: ev.NodeMissedHeartbeats) -> None:
    node = engine.fleet.node(event.node_id)
    if node.state is NodeState.DOWN:
        return
    engine.fleet.set_state(node, NodeState.UNKNOWN)
    engine._lose_tasks(node, fence=True)


def _on_down(engine: Engine, event: ev.NodeDown) -> None:
    node = engine.fleet.node(event.node_id)
    engine.fleet.set_state(node, NodeState.DOWN)
    engine._lose_tasks(node, fence=False)
    for owner in list(node.fenced):
        engine.fleet.release_job(node, owner)


def _on_drain(engine: Engine, event: ev.NodeDrain) -> None:
    node = engine.fleet.node(event.node_id)
    node.draining = True
    if node.state is NodeState.UP:
        engine.fleet.set_state(node, NodeState.DRAINING)
    if event.evict:
        engine._lose_tasks(node, fence=False)


def _on_undrain(engine: Engine, event: ev.NodeUndrain) -> None:
    node = engine.fleet.node(event.node_id)
    node.draining = False
    if node.state is NodeState.DRAINING:
        engine.fleet.set_state(node, NodeState.UP)


def _on_tasks_stopped(engine: Engine, event: ev.TasksStopped) -> None:
    node = engine.fleet.node(event.node_id)
    for owner in sorted(node.fenced):
        if job_of(owner) == event.job_id:
            engine.fleet.release_job(node, owner)


def _on_accelerator_failed(engine: Engine, event: ev.AcceleratorFailed) -> None:
    node = engine.fleet.node(event.node_id)
    index = engine._accelerator_index(node, event.accelerator_id)
    if not event.event_id:
        raise InvalidInputError(
            f"accelerator {event.accelerator_id}: event_id is empty. Set it to the id of the "
            "health event."
        )
    if not engine.fleet.fail_accelerator(node, index, event.event_id):
        return
    logger.warning(
        "accelerator %s on node %s failed (health event %s): %s",
        event.accelerator_id,
        event.node_id,
        event.event_id,
        event.reason,
    )
    engine._fault_jobs_on(node, index, event.event_id, event.reason)


def _on_accelerator_recovered(engine: Engine, event: ev.AcceleratorRecovered) -> None:
    node = engine.fleet.node(event.node_id)
    index = engine._accelerator_index(node, event.accelerator_id)
    if engine.fleet.recover_accelerator(node, index):
        logger.info("accelerator %s on node %s recovered", event.accelerator_id, event.node_id)


def _on_job_ended(engine: Engine, event: ev.JobEnded) -> None:
    record = engine._job(event.job_id)
    if not record.running:
        raise InvalidInputError(f"job {event.job_id}: ended but it is not running")
    if event.outcome is ev.JobOutcome.PREEMPTED:
        engine._requeue(record, "preempted; back in the queue")
        return
    engine._release(record)
    engine.broken.discard(event.job_id)
    del engine.jobs[event.job_id]


def _on_job_requeued(engine: Engine, event: ev.JobRequeued) -> None:
    record = engine._job(event.job_id)
    if not record.running:
        raise InvalidInputError(f"job {event.job_id}: requeued but it is not running")
    engine._fence_tasks(record, event.stopping)
    if event.avoid_nodes:
        engine.avoid_nodes(record, event.avoid_nodes)
    engine._requeue(record, "requeued; back in the queue" if event.started else "")


def _on_pledge_added(engine: Engine, event: ev.PledgeAdded) -> None:
    engine.capacity.add_pledge(event.pledge)


def _on_pledge_removed(engine: Engine, event: ev.PledgeRemoved) -> None:
    engine.capacity.remove_pledge(event.pledge_id)


def _on_recall(engine: Engine, event: ev.RecallAnnounced) -> None:
    engine.capacity.add_recall(event)


def _on_recall_ended(engine: Engine, event: ev.RecallEnded) -> None:
    engine.capacity.recalls.pop(event.recall_id, None)


def _on_budget(engine: Engine, event: ev.BudgetChanged) -> None:
    key = (event.project, event.payer)
    if event.available:
        engine.no_budget.pop(key, None)
        engine.budget_blocks.pop(key, None)
        return
    blocked = engine.no_budget.get(key)
    if blocked is None or event.size <= blocked:
        engine.no_budget[key] = event.size
        engine.budget_blocks[key] = event


HANDLERS: dict[type, Callable[[Engine, Any], None]] = {
    ev.NodeAdded: _on_node_added,
    ev.NodeHeartbeat: _on_heartbeat,
    ev.NodeMissedHeartbeats: _on_missed,
    ev.NodeDown: _on_down,
    ev.NodeDrain: _on_drain,
    ev.NodeUndrain: _on_undrain,
    ev.TasksStopped: _on_tasks_stopped,
    ev.AcceleratorFailed: _on_accelerator_failed,
    ev.AcceleratorRecovered: _on_accelerator_recovered,
    ev.JobEnded: _on_job_ended,
    ev.JobRequeued: _on_job_requeued,
    ev.PledgeAdded: _on_pledge_added,
    ev.PledgeRemoved: _on_pledge_removed,
    ev.RecallAnnounced: _on_recall,
    ev.RecallEnded: _on_recall_ended,
    ev.BudgetChanged: _on_budget,
}
