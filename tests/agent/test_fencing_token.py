"""A restarted agent still ignores commands of older scheduler leaders."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agents import wire
from agents.model import TaskSpec
from agents.task_process import TaskLauncher
from tests.agent.helpers import NODE, ManualClock
from tests.agent.test_crash_reports import make_node, task_events
from tests.agent.test_runner import wait_for


def saved_token(directory: Path) -> int:
    document = json.loads((directory / "state.json").read_text())
    return int(document["nodes"][NODE.key]["fencing_token"])


async def test_token_survives_restart(tmp_path: Path) -> None:
    clock = ManualClock(time.time())
    launcher = TaskLauncher()
    first, _outbox, spool, _state = make_node(tmp_path, clock, launcher, "boot-1")
    try:
        async with asyncio.TaskGroup() as group:
            await first.start(group)
            stop = wire.Command("c1", "stop", NODE, task_id="gone/1/0", fencing_token=5)
            await first.handle(stop)
    finally:
        launcher.close()
    spool.close()
    assert first.fencing_token == 5
    assert saved_token(tmp_path) == 5

    second_launcher = TaskLauncher()
    second, outbox, spool2, state = make_node(tmp_path, clock, second_launcher, "boot-2")
    try:
        async with asyncio.TaskGroup() as group:
            await second.start(group)
            assert second.fencing_token == 5
            assert second.runner is not None
            uuid = second.backend.discover().accelerators[0].uuid
            spec = TaskSpec("old", "old/1/0", (uuid,), ("true",))
            await second.handle(wire.Command("c2", "start", NODE, fencing_token=4, spec=spec))
            spec = TaskSpec("new", "new/1/0", (uuid,), ("true",))
            await second.handle(wire.Command("c3", "start", NODE, fencing_token=5, spec=spec))
            await wait_for(lambda: "new/1/0" in second.runner._finished)  # type: ignore[union-attr]
            outbox.flush_to_spool()
            state.save()
    finally:
        second_launcher.close()
    started = {event.task_id for event in task_events(spool2)}
    assert "new/1/0" in started
    assert "old/1/0" not in started
