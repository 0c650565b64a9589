"""The job store against a real PostgreSQL: fenced writes, idempotent inserts, paging."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import asyncpg
import pytest

from scheduler.service.engine_adapter import AcceleratorHealth
from scheduler.service.fleet import Drain, DrainChange
from scheduler.service.leader import LeaderLease
from scheduler.service.model import Job, JobFilter, JobSpec, TaskPlacement, new_job_id
from scheduler.service.node_store import NodeStore
from scheduler.service.store import DispatchRecord, Fenced, JobStore, Orphan, OutboxEvent

STALE_DRAIN = Drain("operator", "stale drain", 100.0)


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
    assert got.updated_at == pytest.approx(job.submitted_at, abs=1e-5)
    assert replace(got, submitted_at=job.submitted_at, updated_at=None) == job
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


async def test_replacement_commands_keep_their_own_keys(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    first = DispatchRecord(job.job_id, 1, 0, "start", "p.r.a", b"start")
    await store.commit_turn([], [], [first], [], epoch)
    stop_old = DispatchRecord(job.job_id, 1, 0, "stop:p.r.a", "p.r.a", b"stop")
    start_new = DispatchRecord(job.job_id, 1, 0, "start:p.r.b", "p.r.b", b"start")

    fresh = await store.commit_turn([], [], [start_new, stop_old], [], epoch)

    assert sorted(r.kind for r in fresh) == ["start:p.r.b", "stop:p.r.a"]
    unacked = await store.unacked_dispatches()
    assert [r.kind for r in unacked] == ["start", "stop:p.r.a", "start:p.r.b"]
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


async def test_update_time_is_the_turns_clock(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    turn = job.submitted_at + 42.5

    await store.commit_turn(
        [replace(job, state="starting", updated_at=turn)], ["hold"], [], [], epoch
    )

    starting = await store.get_job(job.job_id)
    assert starting is not None
    assert starting.updated_at == pytest.approx(turn, abs=1e-5)
    before = time.time()
    await store.update_jobs([replace(job, state="running")], epoch, ["task:started"])
    running = await store.get_job(job.job_id)
    assert running is not None
    assert running.updated_at is not None
    # A change without a time of its own gets the database's clock.
    assert before - 5 < running.updated_at < time.time() + 5
    await lease.release()


async def test_writes_behind_takeover_are_fenced(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    record = DispatchRecord(job.job_id, 1, 0, "start", "p.r.n", b"cmd")
    event = OutboxEvent("acsp.events.job.admitted", f"{job.job_id}/1/admitted", b"event")
    takeover = await asyncpg.connect(database_dsn)
    try:
        # A new leader's epoch bump is in flight. Both writes wait for it on the leaders row,
        # then find the new epoch and write nothing.
        async with takeover.transaction():
            await takeover.execute("UPDATE scheduler.leaders SET epoch = epoch + 1")
            turn = asyncio.create_task(
                store.commit_turn(
                    [replace(job, state="starting")], ["hold"], [record], [event], epoch
                )
            )
            insert = asyncio.create_task(store.insert_jobs([make_job()], ["r1"], epoch, "rpc"))
            done, _ = await asyncio.wait([turn, insert], timeout=0.5)
            assert done == set()
        with pytest.raises(Fenced):
            await asyncio.wait_for(turn, timeout=10)
        with pytest.raises(Fenced):
            await asyncio.wait_for(insert, timeout=10)
    finally:
        await takeover.close()

    stored = await store.get_job(job.job_id)
    assert stored is not None
    assert stored.state == "pending"
    assert await store.unacked_dispatches() == []
    assert await store.unacked_events() == []
    assert await pool.fetchval("SELECT count(*) FROM scheduler.jobs") == 1
    await lease.release()


async def test_commit_turn_marks_published_records(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    record = DispatchRecord(job.job_id, 1, 0, "start", "p.r.n", b"cmd")
    event = OutboxEvent("acsp.events.job.admitted", f"{job.job_id}/1/admitted", b"event")
    await store.commit_turn([], [], [record], [event], epoch)

    # The next turn carries the marks alone, as an idle loop's turn does.
    fresh = await store.commit_turn([], [], [], [], epoch, [record.key], [event.msg_id])

    assert fresh == []
    assert await store.unacked_dispatches() == []
    assert await store.unacked_events() == []
    await lease.release()


async def test_deposed_leader_writes_no_node(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"first")])
    await lease.release()
    takeover = await lead(database_dsn, "b")

    with pytest.raises(Fenced):
        await nodes.upsert_inventories([("p", "r", "n1", b"stale"), ("p", "r", "n2", b"new")])
    with pytest.raises(Fenced):
        await nodes.record_accelerator_health([AcceleratorHealth("p.r.n1", "GPU-0", True, "e1")])
    with pytest.raises(Fenced):
        await JobStore(pool, "s0").commit_turn(
            [], [], [], [], lease.epoch or 0, drains=[DrainChange("p.r.n1", True, STALE_DRAIN)]
        )

    assert await nodes.load() == [(b"first", None, "")]
    assert await nodes.load_failed_accelerators() == []
    await takeover.release()


async def test_stop_outcome_round_trips(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    preempted = replace(job, state="stopping", stop_outcome="requeue")

    await store.commit_turn([preempted], ["recall:rc-1"], [], [], epoch)

    (loaded,) = await store.load_open_jobs()
    assert loaded.stop_outcome == "requeue"
    await store.update_jobs([replace(preempted, stop_outcome="failed")], epoch, ["task:failed"])
    stored = await store.get_job(job.job_id)
    assert stored is not None
    assert stored.stop_outcome == "failed"
    await lease.release()


async def test_paying_grant_is_stored(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    unnamed = replace(job, spec=replace(job.spec, grant_id=""))
    await store.insert_jobs([unnamed], [None], epoch, "rpc")
    starting = replace(unnamed, state="starting", spec=replace(unnamed.spec, grant_id="g9"))

    await store.commit_turn([starting], ["hold:h1"], [], [], epoch)

    stored = await store.get_job(job.job_id)
    assert stored is not None
    assert stored.spec.grant_id == "g9"
    assert stored.grant_picked
    await lease.release()


async def test_pending_job_names_no_picked_grant(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    unnamed = replace(job, spec=replace(job.spec, grant_id=""))
    await store.insert_jobs([unnamed], [None], epoch, "rpc")
    # A requeued job stored with the grant picked for its previous attempt's hold.
    requeued = replace(unnamed, attempt=2, spec=replace(unnamed.spec, grant_id="g9"))

    await store.commit_turn([requeued], ["engine:requeue"], [], [], epoch)

    stored = await store.get_job(job.job_id)
    assert stored is not None
    assert stored.spec.grant_id == ""
    assert not stored.grant_picked
    await lease.release()


async def test_commit_turn_keeps_orphans_until_confirmed(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    lost = Orphan("p.r.n0", "j1/1/0", ("GPU-0", "GPU 1"), 1000, rendezvous_port=29517)
    shared = Orphan("p.r.n1", "j2/3/1", ("GPU-7",), 250)

    await store.commit_turn([], [], [], [], epoch, orphans=[lost, shared])
    assert await store.load_orphans() == [lost, shared]
    await store.commit_turn([], [], [], [], epoch, confirmed=[("p.r.n0", "j1/1/0")])
    assert await store.load_orphans() == [shared]
    assert await JobStore(pool, "s1").load_orphans() == []
    await lease.release()

    takeover = await lead(database_dsn, "b")
    with pytest.raises(Fenced):
        await store.commit_turn([], [], [], [], epoch, orphans=[lost])
    assert await store.load_orphans() == [shared]
    await takeover.release()


async def age_acks(pool: asyncpg.Pool, table: str, seconds: float) -> None:
    """Move every acknowledgement in ``table`` ``seconds`` into the past."""
    await pool.execute(
        f"UPDATE scheduler.{table} SET acked_at = acked_at - make_interval(secs => $1)"
        " WHERE acked_at IS NOT NULL",
        seconds,
    )


async def test_purge_deletes_only_old_acked_events(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    old, recent, unacked = (
        OutboxEvent("acsp.events.job.ended", f"j{i}/1/ended", b"event") for i in range(3)
    )
    await store.record_events([old, unacked], epoch)
    await pool.execute(
        "INSERT INTO scheduler.outbox (event_id, shard, subject, payload, acked_at)"
        " VALUES ('other/1/ended', 's1', 'acsp.events.job.ended', '', now())"
    )
    await store.ack_events([old.msg_id])
    await age_acks(pool, "outbox", 7200)
    await pool.execute("UPDATE scheduler.outbox SET created_at = now() - interval '3 hours'")
    await store.record_events([recent], epoch)
    await store.ack_events([recent.msg_id])

    assert await store.purge_acked(3600) == (0, 1)

    left = {row[0] for row in await pool.fetch("SELECT event_id FROM scheduler.outbox")}
    assert old.msg_id not in left
    assert recent.msg_id in left
    assert unacked.msg_id in left
    assert "other/1/ended" in left, "another shard's events belong to its own leader"
    assert await store.unacked_events() == [unacked]
    await lease.release()


async def test_purge_keeps_commands_of_open_jobs(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    ended, running = make_job("ended"), make_job("running")
    await store.insert_jobs([ended, running], [None, None], epoch, "rpc")
    await store.update_jobs(
        [replace(ended, state="completed"), replace(running, state="running")],
        epoch,
        ["task:ended", "task:started"],
    )
    start = DispatchRecord(ended.job_id, 1, 0, "start", "p.r.n", b"start")
    stop = DispatchRecord(ended.job_id, 1, 0, "stop", "p.r.n", b"stop")
    unacked = DispatchRecord(ended.job_id, 1, 1, "stop", "p.r.n", b"stop")
    open_start = DispatchRecord(running.job_id, 1, 0, "start", "p.r.n", b"start")
    await store.record_dispatches([start, stop, unacked, open_start], epoch)
    await store.ack_dispatches([start.key, open_start.key])
    await age_acks(pool, "dispatches", 7200)
    await store.ack_dispatches([stop.key])

    assert await store.purge_acked(3600) == (1, 0)

    keys = await store.dispatched_keys([ended.job_id, running.job_id])
    assert start.key not in keys
    assert stop.key in keys, "acked within the retention"
    assert unacked.key in keys
    assert open_start.key in keys, "the command of an open job is its dedupe record"
    assert await store.unacked_dispatches() == [unacked]
    await lease.release()


async def test_purge_leaves_other_shards_commands(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = LeaderLease(database_dsn, "s1", "b", poll_interval_s=0.1)
    epoch = await lease.acquire()
    other = JobStore(pool, "s1")
    job = make_job()
    await other.insert_jobs([job], [None], epoch, "rpc")
    await other.update_jobs([replace(job, state="cancelled")], epoch, ["rpc:CancelJob"])
    record = DispatchRecord(job.job_id, 1, 0, "stop", "p.r.n", b"stop")
    await other.record_dispatches([record], epoch)
    await other.ack_dispatches([record.key])
    await age_acks(pool, "dispatches", 7200)

    assert await JobStore(pool, "s0").purge_acked(3600) == (0, 0)
    assert await other.purge_acked(3600) == (1, 0)
    await lease.release()


async def test_purge_deletes_in_chunks(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    await store.update_jobs([replace(job, state="failed")], epoch, ["task:failed"])
    records = [DispatchRecord(job.job_id, 1, i, "start", "p.r.n", b"x") for i in range(5)]
    events = [OutboxEvent("acsp.events.job.ended", f"e{i}", b"x") for i in range(4)]
    await store.commit_turn([], [], records, events, epoch)
    await store.ack_published([r.key for r in records], [e.msg_id for e in events])

    # The four events take three statements, because the second one deletes a full chunk.
    assert await store.purge_acked(0, chunk=2) == (5, 4)
    assert await store.purge_acked(0, chunk=2) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM scheduler.dispatches") == 0
    assert await pool.fetchval("SELECT count(*) FROM scheduler.outbox") == 0
    await lease.release()


async def test_ended_jobs_keeps_task_states(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    ended, running = make_job("ended"), make_job("running")
    await store.insert_jobs([ended, running], [None, None], epoch, "rpc")
    task = TaskPlacement(0, "p", "r", "n1", ("GPU-0",), state="stopping")
    cancelled = replace(ended, state="cancelled", placement=(task,))
    await store.update_jobs(
        [cancelled, replace(running, state="running")], epoch, ["rpc:CancelJob", "task:started"]
    )

    loaded = await store.ended_jobs([running.job_id, ended.job_id, "j-missing"])

    assert [job.job_id for job in loaded] == [ended.job_id]
    assert loaded[0].placement == (task,)
    assert await store.ended_jobs([]) == []
    await lease.release()


async def test_start_failures_round_trip(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    loaded = await store.get_job(job.job_id)
    assert loaded is not None
    assert loaded.start_failures == 0

    requeued = replace(job, attempt=3, start_failures=2)
    await store.commit_turn([requeued], ["task:start_failed"], [], [], epoch)
    (reloaded,) = await store.load_open_jobs()
    assert reloaded.start_failures == 2

    await store.update_jobs(
        [replace(requeued, state="running", start_failures=0)], epoch, ["task:started"]
    )
    loaded = await store.get_job(job.job_id)
    assert loaded is not None
    assert loaded.start_failures == 0
    await lease.release()


async def test_avoided_nodes_round_trip(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    inserted = await store.get_job(job.job_id)

    requeued = replace(job, attempt=2, avoid_nodes=("prov.reg.n1",))
    await store.commit_turn([requeued], ["task:start_failed"], [], [], epoch)
    (reloaded,) = await store.load_open_jobs()
    again = replace(requeued, attempt=3, avoid_nodes=("prov.reg.n1", "prov.reg.n2"))
    await store.update_jobs([again], epoch, ["task:start_failed"])
    loaded = await store.get_job(job.job_id)

    assert inserted is not None
    assert inserted.avoid_nodes == ()
    assert reloaded.avoid_nodes == ("prov.reg.n1",)
    assert loaded is not None
    assert loaded.avoid_nodes == ("prov.reg.n1", "prov.reg.n2")
    await lease.release()


async def test_attempt_reason_round_trip(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    inserted = await store.get_job(job.job_id)

    requeued = replace(job, attempt=2, attempt_reason="node prov/reg/n1 stopped answering")
    await store.commit_turn([requeued], ["node:missed"], [], [], epoch)
    (reloaded,) = await store.load_open_jobs()
    again = replace(requeued, attempt=3, attempt_reason="task 0 failed to start")
    await store.update_jobs([again], epoch, ["task:start_failed"])
    loaded = await store.get_job(job.job_id)

    assert inserted is not None
    assert inserted.attempt_reason == ""
    assert reloaded.attempt_reason == "node prov/reg/n1 stopped answering"
    assert loaded is not None
    assert loaded.attempt_reason == "task 0 failed to start"
    await lease.release()


async def test_rendezvous_port_round_trip(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    inserted = await store.get_job(job.job_id)

    starting = replace(job, state="starting", rendezvous_port=29517)
    await store.commit_turn([starting], ["hold:h1"], [], [], epoch)
    (reloaded,) = await store.load_open_jobs()
    requeued = replace(starting, state="pending", attempt=2, rendezvous_port=0)
    await store.update_jobs([requeued], epoch, ["engine:requeue"])
    loaded = await store.get_job(job.job_id)

    assert inserted is not None
    assert inserted.rendezvous_port == 0
    assert reloaded.rendezvous_port == 29517
    assert loaded is not None
    assert loaded.rendezvous_port == 0
    await lease.release()


async def test_replacement_count_round_trip(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    job = make_job()
    await store.insert_jobs([job], [None], epoch, "rpc")
    inserted = await store.get_job(job.job_id)

    running = replace(job, state="running", replacements=2)
    await store.commit_turn([running], ["node:p.r.a"], [], [], epoch)
    (reloaded,) = await store.load_open_jobs()
    await store.update_jobs([replace(running, replacements=3)], epoch, ["node:p.r.b"])
    loaded = await store.get_job(job.job_id)

    assert inserted is not None
    assert inserted.replacements == 0
    assert reloaded.replacements == 2
    assert loaded is not None
    assert loaded.replacements == 3
    await lease.release()


async def test_awaited_jobs_only_of_own_shard(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = LeaderLease(database_dsn, "s1", "b", poll_interval_s=0.1)
    epoch = await lease.acquire()
    other = JobStore(pool, "s1")
    single = make_job()
    element = replace(make_job(), array_id="a-other", array_index=0)
    await other.insert_jobs([single, element], [None, None], epoch, "rpc")
    own = JobStore(pool, "s0")

    # The leader of s0 never learns how a job of s1 ends, so none may be awaited there.
    assert await own.awaited_jobs([single.job_id, "a-other"]) == []
    assert await own.job_states([single.job_id]) == {}
    assert sorted(await other.awaited_jobs([single.job_id, "a-other"])) == sorted(
        [(single.job_id, "", "p1", "pending"), (element.job_id, "a-other", "p1", "pending")]
    )
    assert await other.job_states([single.job_id]) == {single.job_id: "pending"}
    await lease.release()
