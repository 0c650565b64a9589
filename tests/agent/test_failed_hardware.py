"""Tasks on an accelerator that failed end as FAILED_HARDWARE with the failing event's id."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from acsp.v1 import agent_pb2, scheduler_pb2
from agents.backends.fleet import FaultInterval, FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.model import TaskSpec
from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.helpers import NODE, ManualClock, make_node, published_health

SLOT = 2
"""Accelerator position the injected fault hits."""


def published_tasks(outbox: Outbox, spool: Spool) -> list[agent_pb2.TaskEvent]:
    outbox.flush_to_spool()
    events = []
    for record in spool.peek(10_000):
        if record.subject.startswith("acsp.task."):
            events.append(agent_pb2.TaskEvent.FromString(record.payload))
    return events


def played(task_id: str, uuid: str) -> TaskSpec:
    return TaskSpec(
        job_id=task_id.split("/")[0],
        task_id=task_id,
        accelerators=(uuid,),
        command=(),
        simulated_run_time_s=3600.0,
    )


async def test_stop_on_failed_accelerator_is_hardware(tmp_path: Path) -> None:
    clock = ManualClock()
    fault = FaultInterval("server-1", "fault_gpu_lost", "GPU Lost", 10.0, math.inf, SLOT)
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 4)
    backend = SimulatedBackend(spec, clock, faults=[fault])
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        assert node.runner is not None
        uuids = [info.uuid for info in backend.discover().accelerators]
        await node.runner.start(played("job/1/0", uuids[SLOT]))
        await node.runner.start(played("job/1/1", uuids[0]))

        clock.advance(20.0)
        await node.sample()
        (failure,) = [e for e in published_health(outbox, spool) if not e.cleared]
        await node.runner.stop("job/1/0", "accelerator failed")
        await node.runner.stop("job/1/1", "accelerator failed")

    ended = {e.task_id: e for e in published_tasks(outbox, spool) if e.state not in (0, 1)}
    assert failure.accelerator_id == uuids[SLOT]
    assert failure.health == scheduler_pb2.HEALTH_STATE_FAILED
    assert list(failure.task_ids) == ["job/1/0"]
    assert ended["job/1/0"].state == agent_pb2.TASK_STATE_FAILED_HARDWARE
    assert ended["job/1/0"].health_event_id == failure.event_id
    assert ended["job/1/1"].state == agent_pb2.TASK_STATE_STOPPED
    assert ended["job/1/1"].health_event_id == ""


async def test_failed_accelerator_task_runs_until_stopped(tmp_path: Path) -> None:
    clock = ManualClock()
    fault = FaultInterval("server-1", "fault_gpu_lost", "GPU Lost", 10.0, math.inf, SLOT)
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 4)
    backend = SimulatedBackend(spec, clock, faults=[fault])
    node, outbox, spool = make_node(backend, tmp_path, clock, backend_name="simulated")
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        assert node.runner is not None
        uuids = [info.uuid for info in backend.discover().accelerators]
        await node.runner.start(played("job/1/0", uuids[SLOT]))
        clock.advance(20.0)
        await node.sample()
        running = [record.task_id for record in node.runner.running]
        await node.runner.start(played("other/1/0", uuids[SLOT]))

    rejected = [e for e in published_tasks(outbox, spool) if e.task_id == "other/1/0"]
    assert running == ["job/1/0"]
    assert [e.state for e in rejected] == [agent_pb2.TASK_STATE_START_FAILED]
