"""WatchJobs streams: what a watch of a job array's parent id sends, how a long initial state
is sent, who may open one, and how many one caller may have open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import scheduler_pb2
from scheduler.service.api import INITIAL_PAGE_SIZE, _hold_latest, _sent_already
from scheduler.service.model import Job, JobSpec
from scheduler.service.watch import TooManyWatches, Watcher, WatchHub, WatchOverflow
from services.runtime.auth import Role
from services.runtime.evolve import evolve

from .harness import Stack, fund_grant, metadata, scheduler_stub
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


async def test_array_parent_watch_streams_elements(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    stranger = metadata(stack.token("stranger", Role.RESEARCHER))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # No node is up, so every element waits until it is cancelled.
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, array_size=2)
            ),
            metadata=md,
            timeout=10,
        )
        parent_id = submitted.job.job_id
        stream = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=parent_id, send_initial=True),
            metadata=md,
            timeout=30,
        )
        initial = [await stream.read(), await stream.read()]
        await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=parent_id), metadata=md, timeout=10
        )
        cancelled: set[str] = set()
        while len(cancelled) < 2:
            change = await stream.read()
            assert change is not grpc.aio.EOF
            if change.state == scheduler_pb2.JOB_STATE_CANCELLED:
                cancelled.add(change.job_id)
        stream.cancel()
        denied = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=parent_id), metadata=stranger, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await denied.read()

    assert sorted(job.job_id for job in initial) == sorted(submitted.array_job_ids)
    assert {job.array_job_id for job in initial} == {parent_id}
    assert cancelled == set(submitted.array_job_ids)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_initial_state_sends_every_open_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    # More open jobs than one page of the initial state; no node is up, so all wait.
    size = INITIAL_PAGE_SIZE + INITIAL_PAGE_SIZE // 5
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, array_size=size)
            ),
            metadata=md,
            timeout=30,
        )

        stream = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(project_id=project, send_initial=True),
            metadata=md,
            timeout=60,
        )
        initial = [await stream.read() for _ in range(size)]
        stream.cancel()

    assert all(job is not grpc.aio.EOF for job in initial)
    assert sorted(job.job_id for job in initial) == sorted(submitted.array_job_ids)


def test_take_queued_empties_queue() -> None:
    hub = WatchHub(queue_size=2)
    watcher = hub.subscribe(project_id="p1")
    hub.publish([job_of("j1", "p1"), job_of("j2", "p1")])

    first_take = watcher.take_queued()
    again = watcher.take_queued()
    hub.publish([job_of("j3", "p1"), job_of("j4", "p1"), job_of("j5", "p1")])

    assert [job.job_id for job in first_take] == ["j1", "j2"]
    assert again == []
    with pytest.raises(WatchOverflow):
        watcher.take_queued()


def test_repeated_changes_take_one_place() -> None:
    hub = WatchHub(queue_size=2)
    watcher = hub.subscribe(project_id="p1")
    first = job_of("j1", "p1")

    hub.publish([first, job_of("j2", "p1"), evolve(first, state="running")])
    queued = watcher.take_queued()

    assert [job.job_id for job in queued] == ["j1", "j2"]
    assert queued[0].state == "running"
    assert not watcher.overflowed


async def test_next_sends_queue_then_overflow() -> None:
    hub = WatchHub(queue_size=1)
    watcher = hub.subscribe(project_id="p1")

    idle = await watcher.next(0.01)
    hub.publish([job_of("j1", "p1"), job_of("j2", "p1")])
    queued = await watcher.next(0.01)
    with pytest.raises(WatchOverflow):
        await watcher.next(0.01)

    assert idle is None
    assert queued is not None
    assert queued.job_id == "j1"


async def test_next_wakes_on_change() -> None:
    hub = WatchHub()
    watcher = hub.subscribe(project_id="p1")

    waiting = asyncio.create_task(watcher.next(10))
    await asyncio.sleep(0)
    hub.publish([job_of("j1", "p1")])
    change = await asyncio.wait_for(waiting, 5)

    assert change is not None
    assert change.job_id == "j1"


def test_held_changes_keep_latest() -> None:
    latest_changes: dict[str, Job] = {}
    first = job_of("j1", "p1")
    latest = evolve(first, state="running")

    _hold_latest(latest_changes, [first, job_of("j2", "p1")], limit=2)
    _hold_latest(latest_changes, [latest], limit=2)

    assert list(latest_changes) == ["j2", "j1"]
    assert latest_changes["j1"].state == "running"
    with pytest.raises(WatchOverflow):
        _hold_latest(latest_changes, [job_of("j3", "p1")], limit=2)


def test_change_sent_in_initial_state_skipped() -> None:
    sent_at: dict[str, float | None] = {"j1": 20.0, "j2": None}

    older = evolve(job_of("j1", "p1"), updated_at=10.0)
    same = evolve(job_of("j1", "p1"), updated_at=20.0)
    newer = evolve(job_of("j1", "p1"), updated_at=30.0)
    unknown_time = evolve(job_of("j2", "p1"), updated_at=30.0)
    not_sent = evolve(job_of("j3", "p1"), updated_at=10.0)

    assert _sent_already(older, sent_at)
    assert _sent_already(same, sent_at)
    assert not _sent_already(newer, sent_at)
    assert not _sent_already(unknown_time, sent_at)
    assert not _sent_already(not_sent, sent_at)


def test_watches_limited_per_caller() -> None:
    hub = WatchHub(max_per_caller=2)
    first = hub.subscribe(subject="alice")
    hub.subscribe(subject="alice")
    with pytest.raises(TooManyWatches) as error:
        hub.subscribe(subject="alice")
    hub.subscribe(subject="bob")
    hub.unsubscribe(first)
    hub.subscribe(subject="alice")

    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'alice' already has 2 open WatchJobs streams" in error.value.message


def job_of(job_id: str, project: str, array_id: str = "") -> Job:
    spec = JobSpec(name="w", project_id=project, command=("true",))
    return Job(job_id=job_id, spec=spec, owner="alice", array_id=array_id)


def drained(watcher: Watcher) -> list[str]:
    try:
        return [job.job_id for job in watcher.take_queued()]
    except WatchOverflow:
        return ["end"]


def test_hub_routes_changes_by_filter() -> None:
    hub = WatchHub()
    everything = hub.subscribe()
    by_job = hub.subscribe(job_id="j1")
    by_array = hub.subscribe(job_id="a1")
    by_project = hub.subscribe(project_id="p2")
    both = hub.subscribe(job_id="j1", project_id="p2")
    hub.publish([job_of("j1", "p1"), job_of("a1-0", "p2", "a1"), job_of("j3", "p3")])

    assert drained(everything) == ["j1", "a1-0", "j3"]
    assert drained(by_job) == ["j1"]
    assert drained(by_array) == ["a1-0"]
    assert drained(by_project) == ["a1-0"]
    assert drained(both) == []


def test_hub_forgets_closed_watchers() -> None:
    hub = WatchHub(queue_size=1)
    slow = hub.subscribe(project_id="p1")
    closed = hub.subscribe(job_id="j1")
    hub.unsubscribe(closed)
    hub.publish([job_of("j1", "p1"), job_of("j2", "p1"), job_of("j3", "p1")])
    hub.unsubscribe(slow)

    assert drained(slow) == ["end"]
    assert drained(closed) == []
    assert hub._by_job == {}
    assert hub._by_project == {}
