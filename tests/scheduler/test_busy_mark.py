"""The mark that keeps jobs off a node whose task user pool rejected a start.

The mark ends when a task of the node ends, or :data:`BUSY_RETRY_S` after the rejection, and
no other heartbeat or event ends it. The scheduling loop applies inputs to a real job book and
fleet here, without its store, NATS or grant service, which :meth:`SchedulingLoop._apply` does
not use.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.engine_adapter import BUSY_RETRY_S, EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.inputs import HeartbeatReceived, Input, TaskReported
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.loop import LoopSettings, SchedulingLoop

NOW = 1_800_000_000.0
NODE = "prov.reg.n1"
RUNNING = frozenset({"j1/1/0", "j2/1/0"})
"""Tasks that the node's last heartbeat lists."""


def make_loop() -> SchedulingLoop:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    accelerators = tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB") for i in range(8))
    change = fleet.apply_inventory(NodeView("prov", "reg", "n1", accelerators), NOW)
    adapter.add_node(change.node)
    fleet.apply_heartbeat(NODE, "boot-1", RUNNING, NOW)
    unused = cast(Any, None)
    return SchedulingLoop(
        book=JobBook(adapter, epoch=7),
        fleet=fleet,
        store=unused,
        nodes=unused,
        admission=unused,
        rates=unused,
        publisher=unused,
        watchers=unused,
        settings=LoopSettings(),
        inbox=asyncio.Queue(),
    )


def is_busy(loop: SchedulingLoop) -> bool:
    return loop.book.engine.engine.fleet.by_id[NODE].busy


def apply(loop: SchedulingLoop, item: Input) -> None:
    loop._apply(item, Effects(NOW + 1), [], [], [])


def heartbeat(running: frozenset[str], **fields: Any) -> HeartbeatReceived:
    return HeartbeatReceived(NODE, "boot-1", running, received_at=NOW + 1, **fields)


def task_event(task_id: str, state: str) -> TaskReported:
    return TaskReported(NODE, task_id, state, 0, state)


@pytest.mark.parametrize(
    "item",
    [
        heartbeat(RUNNING | {"j3/1/0"}),
        heartbeat(RUNNING, replayed=True, sent_at=NOW + 1),
        heartbeat(RUNNING, drain_requested=True),
        heartbeat(RUNNING, drain_requested=False),
        task_event("j3/1/0", "started"),
        task_event("j1/1/0", "checkpointed"),
        task_event("j3/1/0", "start_failed"),
    ],
    ids=[
        "task-started",
        "replayed",
        "drain-requested",
        "drain-withdrawn",
        "started-event",
        "checkpoint-event",
        "start-failed-event",
    ],
)
def test_busy_mark_outlives_other_inputs(item: Input) -> None:
    loop = make_loop()
    loop.book.engine.mark_busy(NODE, NOW)

    apply(loop, item)

    assert is_busy(loop)


@pytest.mark.parametrize(
    "item",
    [
        heartbeat(frozenset({"j1/1/0"})),
        heartbeat(frozenset({"j1/1/0", "j3/1/0"})),
        task_event("j2/1/0", "exited"),
        task_event("j2/1/0", "stopped"),
        task_event("j2/1/0", "timed_out"),
        task_event("j2/1/0", "lost"),
        task_event("j2/1/0", "failed_hardware"),
    ],
    ids=[
        "heartbeat-drops-task",
        "heartbeat-replaces-task",
        "exited",
        "stopped",
        "timed-out",
        "lost",
        "failed-hardware",
    ],
)
def test_busy_mark_ends_with_task(item: Input) -> None:
    loop = make_loop()
    loop.book.engine.mark_busy(NODE, NOW)

    apply(loop, item)

    assert not is_busy(loop)


def test_busy_mark_expires_after_retry() -> None:
    loop = make_loop()
    loop.book.engine.mark_busy(NODE, NOW)

    loop.book.engine.expire_busy(NOW + BUSY_RETRY_S - 0.1)
    assert is_busy(loop)

    loop.book.engine.expire_busy(NOW + BUSY_RETRY_S)
    assert not is_busy(loop)
