"""The variables that a node agent sets for a task are the ones the scheduler reserves."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from acsp.task_environment import ARRAY_INDEX, RESERVED_VARIABLES, VISIBLE_DEVICES
from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.outbox import Outbox
from agents.spool import Spool
from tests.agent.helpers import NODE, ManualClock, make_node

pytestmark = pytest.mark.timeout(60)

JOB_VALUE = "set-by-the-job"
# Writes the task's ACSP_ variables and its accelerators' variable to argv[1] as JSON.
SCRIPT = f"""
import json, os, pathlib, sys
names = [k for k in os.environ if k.startswith("ACSP_") or k == {VISIBLE_DEVICES!r}]
pathlib.Path(sys.argv[1]).write_text(json.dumps({{k: os.environ[k] for k in names}}))
"""


async def wait_for_exit(outbox: Outbox, spool: Spool, timeout_s: float = 20.0) -> None:
    """Poll the spool until the agent has published the task's exit."""
    deadline = time.monotonic() + timeout_s
    while True:
        outbox.flush_to_spool()
        events = [
            agent_pb2.TaskEvent.FromString(record.payload)
            for record in spool.peek(10_000)
            if record.subject.startswith("acsp.task.")
        ]
        if any(event.state == agent_pb2.TASK_STATE_EXITED for event in events):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for the task to exit")
        await asyncio.sleep(0.02)


async def test_agent_sets_only_reserved_variables(tmp_path: Path) -> None:
    clock = ManualClock()
    fleet = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    node, outbox, spool = make_node(
        SimulatedBackend(fleet, clock), tmp_path, clock, backend_name="simulated"
    )
    out = tmp_path / "task-env.json"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        # A resumed task of a two-task gang, so that every variable applies.
        message = agent_pb2.AgentCommand(
            command_id="c1",
            kind=agent_pb2.COMMAND_KIND_START_TASK,
            node=NODE.message(),
            task_id="job-1/2/1",
            job_id="job-1",
            accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)],
            command=[sys.executable, "-c", SCRIPT, str(out)],
            environment={name: JOB_VALUE for name in RESERVED_VARIABLES},
            checkpoint_reference="step-100",
            node_hosts=["h-a", "h-b"],
            task_node_indexes=[1, 0],
            rendezvous_port=29555,
            time=wire.timestamp(1_700_000_000.0),
        )
        await node.handle(wire.parse_command(message.SerializeToString()))
        await wait_for_exit(outbox, spool)
        assert node.runner is not None
        await node.runner.launches_settled()

    seen = json.loads(out.read_text())
    # A variable that the agent sets and the list lacks fails here until it is added.
    assert set(seen) - set(RESERVED_VARIABLES) == set()
    # The scheduler, not the agent, sets an array element's index, so the job's value stays.
    assert seen[ARRAY_INDEX] == JOB_VALUE
    replaced = {name for name, value in seen.items() if value != JOB_VALUE}
    assert replaced == set(RESERVED_VARIABLES) - {ARRAY_INDEX}
