"""An agent killed between spawning a batch's processes and saving its state runs each task once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from acsp import subjects
from agents.backends.simulated import SimulatedBackend
from agents.state import StateStore
from tests.agent.helpers import NODE
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.subprocess_agent import (
    COMMAND_ACK_WAIT_S,
    SPEC,
    poll,
    start_agent,
    start_command,
)

TASKS = [f"crash-{index}/1/0" for index in range(5)]
# Each task appends "<task id> <session id>" to the runs file, then runs long enough to be
# adopted. The agent records the session leader: the task's own process.
TASK_CODE = (
    "import os, sys, time\n"
    "with open(sys.argv[1], 'a') as runs:\n"
    "    runs.write(f\"{os.environ['ACSP_TASK_ID']} {os.getsid(0)}\\n\")\n"
    "time.sleep(float(sys.argv[2]))\n"
)
TASK_RUN_S = 6.0


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


def runs_of(runs: Path) -> list[tuple[str, int]]:
    if not runs.exists():
        return []
    lines = runs.read_text().splitlines()
    return [(task_id, int(pid)) for task_id, pid in (line.split() for line in lines)]


def commands_handled(state_dir: Path) -> int:
    try:
        return int(json.loads((state_dir / "stats.json").read_text())["commands_handled"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.timeout(120)
async def test_crash_after_spawn_runs_tasks_once(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    runs = tmp_path / "runs.txt"
    accelerators = [info.uuid for info in SimulatedBackend(SPEC).discover().accelerators]
    client = await nats.connect(nats_server.url)
    agent: asyncio.subprocess.Process | None = None
    try:
        js = client.jetstream()
        subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
        # Published before the agent starts, so the consumer delivers them as one batch.
        for task_id, accelerator in zip(TASKS, accelerators, strict=False):
            argv = [sys.executable, "-c", TASK_CODE, str(runs), str(TASK_RUN_S)]
            await js.publish(subject, start_command(task_id, accelerator, argv))

        crashing = await start_agent(nats_server.url, state_dir, "--crash-before-save")
        assert await asyncio.wait_for(crashing.wait(), 30) == -signal.SIGKILL
        crashed = StateStore(state_dir / "state.json").node(NODE.key)
        assert sorted(crashed.intents) == sorted(TASKS)
        assert crashed.tasks == {}
        await poll(lambda: len(runs_of(runs)) == len(TASKS), 10, "every task to run")

        agent = await start_agent(nats_server.url, state_dir)
        adopted = {pid for _task_id, pid in runs_of(runs)}
        await poll(
            lambda: (
                {r.pid for r in StateStore(state_dir / "state.json").node(NODE.key).tasks.values()}
                == adopted
            ),
            20,
            "the restarted agent to record the spawned processes",
        )
        # The unacknowledged commands come again after the ack wait, and change nothing.
        await poll(
            lambda: commands_handled(state_dir) >= len(TASKS),
            20 + COMMAND_ACK_WAIT_S,
            "the redelivered commands",
        )
        await poll(
            lambda: not StateStore(state_dir / "state.json").node(NODE.key).tasks,
            TASK_RUN_S + 20,
            "every task to end",
        )
        assert sorted(task_id for task_id, _pid in runs_of(runs)) == sorted(TASKS)
        final = StateStore(state_dir / "state.json").node(NODE.key)
        assert final.intents == {}

        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 10) == 0
        agent = None
    finally:
        await client.close()
        if agent is not None and agent.returncode is None:
            agent.kill()
            await agent.wait()
        for _task_id, pid in runs_of(runs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
