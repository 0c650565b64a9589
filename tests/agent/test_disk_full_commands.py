"""Commands that arrive while the agent cannot write its state wait for redelivery, run once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from acsp import subjects
from agents.backends.simulated import SimulatedBackend
from tests.agent.helpers import NODE
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.agent.subprocess_agent import SPEC, build, poll, start_command

RUN_CODE = (
    "import os, sys, time\n"
    "with open(sys.argv[1], 'a') as runs:\n"
    "    runs.write(f'{os.getpid()}\\n')\n"
    "time.sleep(30)\n"
)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


@pytest.mark.timeout(60)
async def test_start_waits_out_full_disk(tmp_path: Path, nats_server: NatsServer) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    runs = tmp_path / "runs.txt"
    process = build(nats_server.url, state_dir, stop_tasks_on_exit=True)
    state = process._state
    save_intents = state.save_intents
    failures = []

    def full_disk() -> None:
        if len(failures) < 2:
            failures.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        save_intents()

    state.save_intents = full_disk  # type: ignore[method-assign]
    stop = asyncio.Event()
    agent = asyncio.create_task(process.run(stop))
    client = await nats.connect(nats_server.url)
    try:
        accelerator = SimulatedBackend(SPEC).discover().accelerators[0].uuid
        subject = subjects.command_subject(NODE.provider, NODE.region, NODE.node)
        argv = [sys.executable, "-c", RUN_CODE, str(runs)]
        await client.jetstream().publish(subject, start_command("full/1/0", accelerator, argv))
        await poll(lambda: len(failures) >= 1, 20, "a failed save")
        assert not runs.exists()
        await poll(
            lambda: agent.done() or (runs.exists() and runs.read_text() != ""),
            30,
            "the redelivered start",
        )
        assert not agent.done(), "the agent stopped on the disk error"
        await poll(lambda: process.counters.commands_handled >= 1, 10, "the handled command")
        assert len(runs.read_text().splitlines()) == 1
        assert process.counters.command_batches_failed == 2
        stop.set()
        await asyncio.wait_for(agent, 20)
    finally:
        await client.close()
        if not agent.done():
            agent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent
        if runs.exists():
            for pid in runs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pid), signal.SIGKILL)
