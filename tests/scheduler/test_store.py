"""The job store against a real PostgreSQL: fenced writes, idempotent inserts, paging."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import pytest

from scheduler.service.leader import LeaderLease
from scheduler.service.model import Job, JobFilter, JobSpec, TaskPlacement, new_job_id
from scheduler.service.store import DispatchRecord, Fenced, JobStore, OutboxEvent


def make_job(name: str = "train", project: str = "p1") -> Job:
    spec = JobSpec(name=name, project_id=project, command=("true",), grant_id="g1")
    return Job(job_id=new_job_id(), spec=spec, owner="alice")


async def lead(dsn: str, holder: str) -> LeaderLease:
    lease = LeaderLease(dsn, "s0", holder, poll_interval_s=0.1)
    await lease.acquire()
    return lease


async def test_insert_then_get_round_trips(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    job = make_job()
    stored = await store.insert_jobs([job], ["r1"], lease.epoch or 0, "rpc:SubmitJob")
    assert stored["r1"].job_id == job.job_id
    got = await store.get_job(job.job_id)
    assert got is not None
    assert got.submitted_at == pytest.approx(job.submitted_at, abs=1e-5)
    assert replace(got, submitted_at=job.submitted_at) == job
    await lease.release()


async def test_insert_with_reused_request_id_returns_first_job(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    first, second = make_job(), make_job()
    await store.insert_jobs([first], ["r1"], lease.epoch or 0, "rpc")
    stored = await store.insert_jobs([second], ["r1"], lease.epoch or 0, "rpc")
    assert stored["r1"].job_id == first.job_id
    assert await store.get_job(second.job_id) is None
    await lease.release()


async def test_request_id_repeated_in_one_insert(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    first, copy = make_job(), make_job()
    stored = await store.insert_jobs([first, copy], ["r1", "r1"], lease.epoch or 0, "rpc")
    # The submission batcher recognises the job it inserted by identity.
    assert stored["r1"] is first
    assert await store.get_job(copy.job_id) is None
    await lease.release()


async def test_write_after_takeover_is_fenced(pool: asyncpg.Pool, database_dsn: str) -> None:
    old = await lead(database_dsn, "old")
    old_epoch = old.epoch or 0
    await old.release()
    new = await lead(database_dsn, "new")
    assert (new.epoch or 0) == old_epoch + 1
    store = JobStore(pool, "s0")
    with pytest.raises(Fenced):
        await store.insert_jobs([make_job()], [None], old_epoch, "rpc")
    with pytest.raises(Fenced):
        await store.record_dispatches(
            [DispatchRecord("j1", 1, 0, "start", "p.r.n", b"x")], old_epoch
        )
    await new.release()


async def test_dispatch_recorded_once(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    record = DispatchRecord(job.job_id, 1, 0, "start", "p.r.n", b"cmd")
    assert await store.record_dispatches([record], epoch) == [record]
    assert await store.record_dispatches([record], epoch) == []
    assert await store.unacked_dispatches() == [record]
    await store.ack_dispatches([record.key])
    assert await store.unacked_dispatches() == []
    await lease.release()


async def test_update_and_list_pages(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    jobs = [make_job(f"j{i}") for i in range(5)]
    await store.insert_jobs(jobs, [None] * 5, epoch, "rpc")
    placed = TaskPlacement(0, "p", "r", "n", ("GPU-1",), state="started")
    running = [replace(j, state="running", placement=(placed,)) for j in jobs[:2]]
    await store.update_jobs(running, epoch, ["task:started"] * 2)
    page, token = await store.list_jobs(JobFilter(states=("running",)), 1, "")
    assert [j.job_id for j in page] == [jobs[1].job_id]
    assert page[0].placement == (placed,)
    page2, token2 = await store.list_jobs(JobFilter(states=("running",)), 1, token)
    assert [j.job_id for j in page2] == [jobs[0].job_id]
    assert token2 == ""
    open_jobs = await store.load_open_jobs()
    assert len(open_jobs) == 5
    await lease.release()


async def test_commit_turn_writes_all_or_nothing(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    starting = replace(job, state="starting")
    record = DispatchRecord(job.job_id, 1, 0, "start", "p.r.n", b"cmd")
    event = OutboxEvent("acsp.events.job.admitted", f"{job.job_id}/1/admitted", b"event")

    fresh = await store.commit_turn([starting], ["hold"], [record], [event], epoch)

    assert fresh == [record]
    stored = await store.get_job(job.job_id)
    assert stored is not None
    assert stored.state == "starting"
    assert await store.unacked_dispatches() == [record]
    assert await store.unacked_events() == [event]
    repeated = await store.commit_turn([], [], [record], [event], epoch)
    assert repeated == []
    await store.ack_published([record.key], [event.msg_id])
    assert await store.unacked_dispatches() == []
    assert await store.unacked_events() == []
    await lease.release()

    takeover = await lead(database_dsn, "b")
    running = replace(job, state="running")
    second = DispatchRecord(job.job_id, 1, 0, "stop", "p.r.n", b"stop")
    with pytest.raises(Fenced):
        await store.commit_turn([running], ["task:started"], [second], [], epoch)
    fenced = await store.get_job(job.job_id)
    assert fenced is not None
    assert fenced.state == "starting"
    assert await store.unacked_dispatches() == []
    await takeover.release()
