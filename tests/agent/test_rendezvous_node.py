"""A node agent's hosts files and rendezvous variables, for tasks it runs as processes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from acsp.v1 import agent_pb2, scheduler_pb2
from agents import wire
from agents.backends.fleet import FleetNode
from agents.backends.simulated import SimulatedBackend
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.rendezvous import HostFiles
from agents.spool import Spool
from tests.agent.helpers import NODE, ManualClock, make_node

pytestmark = pytest.mark.timeout(60)

TASK = "job-1/1/2"

# Copies its ACSP_ variables and its hosts file to argv[1], then exits.
SCRIPT = """
import os, pathlib, sys
hosts = pathlib.Path(os.environ["ACSP_TASK_HOSTS_FILE"]).read_text()
names = sorted(k for k in os.environ if k.startswith("ACSP_"))
lines = [f"{k}={os.environ[k]}" for k in names]
pathlib.Path(sys.argv[1]).write_text("\\n".join(lines) + "\\n--\\n" + hosts)
"""


def start_command(uuid: str, out: Path, command: list[str] | None = None) -> wire.Command:
    message = agent_pb2.AgentCommand(
        command_id="c1",
        kind=agent_pb2.COMMAND_KIND_START_TASK,
        node=NODE.message(),
        task_id=TASK,
        job_id="job-1",
        accelerators=[scheduler_pb2.AcceleratorShare(accelerator_id=uuid, millis=1000)],
        command=command or [sys.executable, "-c", SCRIPT, str(out)],
        node_hosts=["h-a", "h-b"],
        task_node_indexes=[1, 0, 0],
        rendezvous_port=29555,
        time=wire.timestamp(START_TIME),
    )
    return wire.parse_command(message.SerializeToString())


START_TIME = 1_700_000_000.0
"""Issue time of the start command, which orders it before the host updates."""

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def hosts_command(
    task_id: str, hosts: list[str], issued_at: float, version: int = 0
) -> wire.Command:
    """Return an UPDATE_HOSTS command that moves task 1 of ``TASK``'s job to ``hosts[1]``."""
    message = agent_pb2.AgentCommand(
        command_id=f"{task_id}/hosts:1:{version}:{issued_at}",
        kind=agent_pb2.COMMAND_KIND_UPDATE_HOSTS,
        node=NODE.message(),
        task_id=task_id,
        job_id="job-1",
        node_hosts=hosts,
        task_node_indexes=[0, 1, 0],
        rendezvous_port=29555,
        time=wire.timestamp(issued_at),
        placement_version=version,
    )
    return wire.parse_command(message.SerializeToString())


def stop_command(task_id: str) -> wire.Command:
    message = agent_pb2.AgentCommand(
        command_id=f"{task_id}/stop",
        kind=agent_pb2.COMMAND_KIND_STOP_TASK,
        node=NODE.message(),
        task_id=task_id,
        job_id="job-1",
        grace_seconds=1,
    )
    return wire.parse_command(message.SerializeToString())


def ended(outbox: Outbox, spool: Spool) -> bool:
    outbox.flush_to_spool()
    return any(
        agent_pb2.TaskEvent.FromString(record.payload).state == agent_pb2.TASK_STATE_EXITED
        for record in spool.peek(10_000)
        if record.subject.startswith("acsp.task.")
    )


async def poll(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def file_exists(path: str) -> bool:
    return os.path.exists(path)


def make(tmp_path: Path) -> tuple[NodeAgent, Outbox, Spool]:
    clock = ManualClock()
    spec = FleetNode(NODE.provider, NODE.region, NODE.node, "A100-SXM4-80GB", 2)
    return make_node(SimulatedBackend(spec, clock), tmp_path, clock, backend_name="simulated")


async def test_task_gets_env_and_hosts(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    out = tmp_path / "task-env.txt"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, out))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        assert node.runner is not None
        await node.runner.launches_settled()

    variables, hosts = out.read_text().split("--\n")
    env = dict(line.split("=", 1) for line in variables.splitlines())
    assert env["ACSP_TASK_INDEX"] == "2"
    assert env["ACSP_TASK_COUNT"] == "3"
    assert env["ACSP_LOCAL_TASK_INDEX"] == "1"
    assert env["ACSP_LOCAL_TASK_COUNT"] == "2"
    assert env["ACSP_RENDEZVOUS_HOST"] == "h-b"
    assert env["ACSP_RENDEZVOUS_PORT"] == "29555"
    assert hosts == "h-b\nh-a\nh-a\n"
    assert not file_exists(env["ACSP_TASK_HOSTS_FILE"])


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of each file and folder that ``os.fsync`` flushes from now on."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def test_start_syncs_hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node, outbox, spool = make(tmp_path)
    folder = tmp_path / "hosts"
    synced = record_fsyncs(monkeypatch)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        started = list(synced)
        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )

    # The file before its rename, then the folder that records the rename.
    assert str(folder / "job-1_1_2.hosts.tmp") in started
    assert str(folder) in started
    assert started.index(str(folder / "job-1_1_2.hosts.tmp")) < started.index(str(folder))


async def test_hosts_sync_leaves_loop_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk takes 0.2 s for each fsync of the hosts folder's files, as a loaded one may. The
    # agent's other work (heartbeats, the other nodes' commands) must not wait for them.
    node, outbox, spool = make(tmp_path)
    folder = str(tmp_path / "hosts")
    real_fsync = os.fsync

    def slow_fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(folder):
            time.sleep(0.2)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        # Long enough for the ticker to record the gap that a blocked loop left.
        await asyncio.sleep(0.05)
        ticker.cancel()
        written = (tmp_path / "hosts" / "job-1_1_2.hosts").read_text()
        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )

    assert written == "h-b\nh-a\nh-a\n"
    assert max(gaps) < 0.2, gaps


async def test_played_start_skips_hosts_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, _outbox, _spool = make(tmp_path)
    folder = tmp_path / "hosts"
    synced = record_fsyncs(monkeypatch)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        command = start_command(uuid, tmp_path / "unused", SLEEPER)
        assert command.spec is not None
        played = replace(command, spec=replace(command.spec, simulated_run_time_s=60.0))
        await node.handle(played)

    assert (folder / "job-1_1_2.hosts").read_text() == "h-b\nh-a\nh-a\n"
    assert [path for path in synced if path.startswith(str(folder))] == []


async def test_redelivered_start_leaves_no_file(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    out = tmp_path / "task-env.txt"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, out))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        out.unlink()
        await node.handle(start_command(uuid, out))
        assert node.runner is not None
        await node.runner.launches_settled()

    assert not out.exists()
    assert list((tmp_path / "hosts").iterdir()) == []


def task_state(outbox: Outbox, spool: Spool, state: int) -> bool:
    outbox.flush_to_spool()
    return any(
        agent_pb2.TaskEvent.FromString(record.payload).state == state
        for record in spool.peek(10_000)
        if record.subject.startswith("acsp.task.")
    )


async def test_host_update_rewrites_running_task(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    hosts_file = tmp_path / "hosts" / "job-1_1_2.hosts"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        assert hosts_file.read_text() == "h-b\nh-a\nh-a\n"

        await node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20))
        moved = hosts_file.read_text()
        # A redelivered command and one issued before it change nothing.
        await node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20))
        redelivered = hosts_file.read_text()
        await node.handle(hosts_command(TASK, ["h-a", "h-d"], START_TIME + 10))
        older = hosts_file.read_text()
        leftovers = sorted(p.name for p in hosts_file.parent.iterdir())

        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )
        # The copy has ended, so a later command no longer makes a file for it.
        await node.handle(hosts_command(TASK, ["h-a", "h-e"], START_TIME + 30))
        assert node.runner is not None
        await node.runner.launches_settled()

    assert moved == "h-a\nh-c\nh-a\n"
    assert redelivered == moved
    assert older == moved
    assert leftovers == ["job-1_1_2.hosts"]
    assert not hosts_file.exists()


async def test_host_update_orders_by_version(tmp_path: Path) -> None:
    node, outbox, spool = make(tmp_path)
    hosts_file = tmp_path / "hosts" / "job-1_1_2.hosts"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )

        # A leader whose clock is behind the last one still sends the later placement.
        await node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME - 50, version=2))
        second = hosts_file.read_text()
        await node.handle(hosts_command(TASK, ["h-a", "h-d"], START_TIME + 50, version=1))
        after_older = hosts_file.read_text()

        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )
        assert node.runner is not None
        await node.runner.launches_settled()

    assert second == "h-a\nh-c\nh-a\n"
    assert after_older == second
    assert list(hosts_file.parent.iterdir()) == []


async def test_host_update_skips_unknown_task(tmp_path: Path) -> None:
    node, _outbox, _spool = make(tmp_path)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        await node.handle(hosts_command("job-1/1/0", ["h-a", "h-c"], START_TIME + 20))

    assert not (tmp_path / "hosts" / "job-1_1_0.hosts").exists()


def slow_hosts_fsyncs(monkeypatch: pytest.MonkeyPatch, folder: Path, delays_s: list[float]) -> None:
    """Make the fsyncs of files in ``folder`` take ``delays_s`` in turn, then none."""
    real_fsync = os.fsync
    remaining = list(delays_s)

    def slow_fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(folder)) and remaining:
            time.sleep(remaining.pop(0))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", slow_fsync)


async def test_host_update_leaves_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, outbox, spool = make(tmp_path)
    hosts_file = tmp_path / "hosts" / "job-1_1_2.hosts"
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        # From now on each fsync of the hosts folder's files takes 0.2 s, as on a loaded disk.
        slow_hosts_fsyncs(monkeypatch, hosts_file.parent, [0.2] * 3)
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        await node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20, version=1))
        await asyncio.sleep(0.05)
        ticker.cancel()
        moved = hosts_file.read_text()
        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )

    assert moved == "h-a\nh-c\nh-a\n"
    assert max(gaps) < 0.2, gaps


async def test_host_updates_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, outbox, spool = make(tmp_path)
    hosts_file = tmp_path / "hosts" / "job-1_1_2.hosts"
    steps: list[str] = []
    real_update = HostFiles.update

    def slow_first_update(
        files: HostFiles, task_id: str, hosts: list[str], issued_at_ns: int, version: int = 0
    ) -> bool:
        # The first rewrite is slow, as on a loaded disk, so a second one that did not wait
        # for it would check the version on disk too early and finish first.
        steps.append(f"begin {version}")
        if version == 1:
            time.sleep(0.3)
        written = real_update(files, task_id, hosts, issued_at_ns, version)
        steps.append(f"end {version}")
        return written

    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        monkeypatch.setattr(HostFiles, "update", slow_first_update)
        await asyncio.gather(
            node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20, version=1)),
            node.handle(hosts_command(TASK, ["h-a", "h-d"], START_TIME + 30, version=2)),
        )
        latest = hosts_file.read_text()
        version = hosts_file.with_name("job-1_1_2.hosts-version").read_text()
        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )

    assert steps == ["begin 1", "end 1", "begin 2", "end 2"]
    assert latest == "h-a\nh-d\nh-a\n"
    assert version == "2\n"


async def test_task_end_during_update_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, outbox, spool = make(tmp_path)
    folder = tmp_path / "hosts"
    hosts_file = folder / "job-1_1_2.hosts"
    trigger = tmp_path / "exit-now"
    # Exits as soon as the trigger file appears.
    waiter = [
        sys.executable,
        "-c",
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)",
        str(trigger),
    ]
    real_fsync = os.fsync

    def fsync_after_task_end(descriptor: int) -> None:
        # The rewrite's first fsync lets the task exit and waits until its end has deleted
        # the old file, so the rename that follows brings the file back.
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(folder)):
            if not trigger.exists():
                trigger.touch()
                deadline = time.monotonic() + 10.0
                while hosts_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        real_fsync(descriptor)

    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", waiter))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        monkeypatch.setattr(os, "fsync", fsync_after_task_end)
        await node.handle(hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20, version=1))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        assert node.runner is not None
        await node.runner.launches_settled()

    assert sorted(path.name for path in folder.iterdir()) == []


async def test_one_task_start_skips_hosts_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-task job's file names only this node, and no UPDATE_HOSTS rewrites it, so a node
    # that starts many such jobs must not wait for fsyncs at each start.
    node, outbox, spool = make(tmp_path)
    folder = tmp_path / "hosts"
    out = tmp_path / "task-env.txt"
    synced = record_fsyncs(monkeypatch)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        command = start_command(uuid, out)
        assert command.spec is not None
        alone = replace(command.spec, task_id="job-1/1/0", node_hosts=(), task_node_indexes=())
        await node.handle(replace(command, task_id="job-1/1/0", spec=alone))
        await poll(lambda: ended(outbox, spool), "the task to exit")
        assert node.runner is not None
        await node.runner.launches_settled()

    variables, hosts = out.read_text().split("--\n")
    env = dict(line.split("=", 1) for line in variables.splitlines())
    assert env["ACSP_TASK_COUNT"] == "1"
    assert env["ACSP_TASK_HOSTS_FILE"] == str(folder / "job-1_1_0.hosts")
    assert hosts == f"{NODE.node}\n"
    assert [path for path in synced if path.startswith(str(folder))] == []


def record_hosts_writes(
    monkeypatch: pytest.MonkeyPatch, folder: Path
) -> tuple[threading.Event, threading.Event]:
    """Make the first fsync in ``folder`` wait, and return (fsync began, write ended).

    The write is :meth:`HostFiles.write`, which an UPDATE_HOSTS rewrite calls too.
    """
    began = threading.Event()
    finished = threading.Event()
    real_fsync = os.fsync
    real_write = HostFiles.write

    def slow_fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}").startswith(str(folder)):
            if not began.is_set():
                began.set()
                time.sleep(0.3)
        real_fsync(descriptor)

    def write(files: HostFiles, *args: Any, **kwargs: Any) -> Path:
        try:
            return real_write(files, *args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(HostFiles, "write", write)
    return began, finished


async def wait_for_event(event: threading.Event, what: str) -> None:
    await poll(event.is_set, what)


async def test_cancelled_start_leaves_no_hosts_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent stops while a start syncs its hosts file. The task never starts, so the write
    # must end before the cancellation does, and its file must be deleted.
    node, _outbox, _spool = make(tmp_path)
    folder = tmp_path / "hosts"
    began, finished = record_hosts_writes(monkeypatch, folder)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        handling = asyncio.create_task(node.handle(start_command(uuid, tmp_path / "u", SLEEPER)))
        await wait_for_event(began, "the hosts file's fsync")
        handling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handling
        finished_at_cancel = finished.is_set()
        await wait_for_event(finished, "the hosts file's write to end")
        assert node.runner is not None
        running = list(node.runner.running)

    assert finished_at_cancel
    assert running == []
    assert sorted(path.name for path in folder.iterdir()) == []


async def test_cancelled_update_ends_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent stops while an UPDATE_HOSTS rewrite syncs the file. The rewrite lock and the
    # stop must both wait for the write, or a later rewrite or the end of the task could
    # act on the file while the cancelled one still writes it.
    node, outbox, spool = make(tmp_path)
    hosts_file = tmp_path / "hosts" / "job-1_1_2.hosts"
    async with asyncio.TaskGroup() as group:
        await node.start(group)
        uuid = node.backend.discover().accelerators[0].uuid
        await node.handle(start_command(uuid, tmp_path / "unused", SLEEPER))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STARTED), "the task to start"
        )
        began, finished = record_hosts_writes(monkeypatch, hosts_file.parent)
        update = hosts_command(TASK, ["h-a", "h-c"], START_TIME + 20, version=1)
        handling = asyncio.create_task(node.handle(update))
        await wait_for_event(began, "the rewrite's fsync")
        handling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handling
        finished_at_cancel = finished.is_set()
        await wait_for_event(finished, "the rewrite to end")
        moved = hosts_file.read_text()
        await node.handle(stop_command(TASK))
        await poll(
            lambda: task_state(outbox, spool, agent_pb2.TASK_STATE_STOPPED), "the task to stop"
        )

    assert finished_at_cancel
    assert moved == "h-a\nh-c\nh-a\n"
    assert not hosts_file.exists()
