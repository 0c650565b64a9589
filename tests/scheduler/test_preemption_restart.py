"""Priority preemption across a restart: a new leader loads the stopping victims from
PostgreSQL and its engine waits for them as the old one did."""

from __future__ import annotations

import asyncpg

from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job
from scheduler.service.store import JobStore
from services.runtime.evolve import evolve
from tests.scheduler.test_preemption_book import (
    NOW,
    finish_preemption,
    full_book,
    make_book,
    make_job,
    preempted_jobs,
    report_all,
    run_pass,
)
from tests.scheduler.test_store import lead


async def commit(store: JobStore, fx: Effects, epoch: int) -> None:
    """Write the job changes of ``fx`` as the loop does at the end of a turn."""
    jobs = [job for job, _ in fx.changed.values()]
    causes = [cause for _, cause in fx.changed.values()]
    await store.commit_turn(jobs, causes, [], [], epoch)


async def preempting_book(store: JobStore, epoch: int) -> tuple[JobBook, Job, list[str]]:
    """Store a full fleet of preemptible jobs, then an interactive gang whose first pass
    preempts two of them. Returns the book, the gang and the victims."""
    book, _ = full_book()
    running = list(book.jobs.values())
    await store.insert_jobs(running, [None] * len(running), epoch, "test")
    gang = make_job("interactive", tasks=2, submitted_at=NOW + 1)
    await store.insert_jobs([gang], [None], epoch, "test")
    book.add([gang], NOW + 1)
    fx = run_pass(book, NOW + 1)
    await commit(store, fx, epoch)
    return book, gang, preempted_jobs(fx)


async def restart(store: JobStore, now: float) -> JobBook:
    """Load every open job into a new book, as a new leader does at start."""
    book = make_book()
    book.add(await store.load_open_jobs(), now)
    book.settle_reloaded(Effects(now))
    return book


async def test_stop_stores_preemptor_id(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    _, gang, victims = await preempting_book(store, lease.epoch or 0)

    stored = [await store.get_job(job_id) for job_id in victims]

    assert len(victims) == 2
    assert [job.preemptor_id for job in stored if job is not None] == [gang.job_id] * 2
    await lease.release()


async def test_restart_waits_for_cancelled_victims(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, epoch)
    # A cancel replaces the victims' stop reason, but their stops still free the gang's room.
    fx = Effects(NOW + 2)
    for job_id in victims:
        book.cancel(job_id, "cancelled by owner", "rpc:CancelJob", fx)
    await commit(store, fx, epoch)
    jobs = {job.job_id: job for job in book.jobs.values()}

    restarted = await restart(store, NOW + 3)
    after_restart = preempted_jobs(run_pass(restarted, NOW + 3))
    later = finish_preemption(restarted, jobs, list(victims), gang, NOW + 4)

    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[gang.job_id].placement) == 2
    await lease.release()


async def test_restart_reads_rows_without_preemptor_id(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, lease.epoch or 0)
    jobs = {job.job_id: job for job in book.jobs.values()}
    # Rows written before the column existed name the preemptor in the stop reason alone.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE scheduler.jobs SET preemptor_id = NULL WHERE job_id = ANY($1::text[])",
            victims,
        )

    restarted = await restart(store, NOW + 2)
    loaded = [restarted.jobs[job_id].preemptor_id for job_id in victims]
    after_restart = preempted_jobs(run_pass(restarted, NOW + 2))
    later = finish_preemption(restarted, jobs, list(victims), gang, NOW + 3)

    # The book takes the preemptor from the reason, so that its next write stores it.
    assert loaded == [gang.job_id, gang.job_id]
    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[gang.job_id].placement) == 2
    await lease.release()


async def test_second_restart_keeps_parsed_preemptor(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, epoch)
    jobs = {job.job_id: job for job in book.jobs.values()}
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE scheduler.jobs SET preemptor_id = NULL WHERE job_id = ANY($1::text[])",
            victims,
        )
    first = await restart(store, NOW + 2)
    # After the upgrade a cancel replaces the reason, the only place the old row named the
    # preemptor.
    fx = Effects(NOW + 2)
    for job_id in victims:
        first.cancel(job_id, "cancelled by owner", "rpc:CancelJob", fx)
    await commit(store, fx, epoch)

    second = await restart(store, NOW + 3)
    loaded = [second.jobs[job_id].preemptor_id for job_id in victims]
    after_restart = preempted_jobs(run_pass(second, NOW + 3))
    later = finish_preemption(second, jobs, list(victims), gang, NOW + 4)

    assert loaded == [gang.job_id, gang.job_id]
    assert after_restart == []
    assert later == []
    assert len(second.jobs[gang.job_id].placement) == 2
    await lease.release()


async def test_restart_keeps_victims_of_cancelled_preemptor(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, epoch)
    fx = Effects(NOW + 2)
    book.cancel(gang.job_id, "cancelled by owner", "rpc:CancelJob", fx)
    await commit(store, fx, epoch)
    jobs = {job.job_id: job for job in book.jobs.values()}

    restarted = await restart(store, NOW + 3)
    # The next preemptor takes over the stopping victims instead of preempting others.
    successor = make_job("interactive", tasks=2, submitted_at=NOW + 3)
    await store.insert_jobs([successor], [None], epoch, "test")
    restarted.add([successor], NOW + 3)
    jobs[successor.job_id] = successor
    after_restart = preempted_jobs(run_pass(restarted, NOW + 3))
    later = finish_preemption(restarted, jobs, list(victims), successor, NOW + 4)

    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[successor.job_id].placement) == 2
    await lease.release()


async def test_restart_reads_empty_preemptor_id_of_older_leader(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, lease.epoch or 0)
    jobs = {job.job_id: job for job in book.jobs.values()}
    # A leader of the version before the column, still running while a new one applied the
    # migration, inserts rows that get the column default and stops jobs without setting it.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE scheduler.jobs SET preemptor_id = DEFAULT WHERE job_id = ANY($1::text[])",
            victims,
        )

    restarted = await restart(store, NOW + 2)
    loaded = [restarted.jobs[job_id].preemptor_id for job_id in victims]
    after_restart = preempted_jobs(run_pass(restarted, NOW + 2))
    later = finish_preemption(restarted, jobs, list(victims), gang, NOW + 3)

    assert loaded == [gang.job_id, gang.job_id]
    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[gang.job_id].placement) == 2
    await lease.release()


async def test_restart_keeps_grace_deadlines(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, lease.epoch or 0)
    jobs = {job.job_id: job for job in book.jobs.values()}

    restarted = await restart(store, NOW + 2)
    loaded = [restarted.jobs[job_id].stop_deadline for job_id in victims]
    # One victim checkpoints and stops long before its grace ends. A job of another project
    # that ends before the other victim's grace may use the room until then.
    report_all(restarted, jobs[victims[0]], "stopped", NOW + 3)
    short = make_job("standard", submitted_at=NOW + 3)
    short = evolve(short, spec=evolve(short.spec, project_id="other", wall_time_s=100))
    restarted.add([short], NOW + 3)
    fx = run_pass(restarted, NOW + 3)

    # The engine gives checkpointable victims 300 s by default.
    assert loaded == [NOW + 301, NOW + 301]
    assert preempted_jobs(fx) == []
    assert restarted.jobs[gang.job_id].pending_reason == "priority"
    assert len(restarted.jobs[short.job_id].placement) == 1
    await lease.release()


async def test_restart_reads_rows_without_deadline(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, lease.epoch or 0)
    jobs = {job.job_id: job for job in book.jobs.values()}
    # In rows stored before the deadline was kept, the gang's room is kept from now.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE scheduler.jobs SET stop_deadline = NULL WHERE job_id = ANY($1::text[])",
            victims,
        )

    restarted = await restart(store, NOW + 2)
    loaded = [restarted.jobs[job_id].stop_deadline for job_id in victims]
    after_restart = preempted_jobs(run_pass(restarted, NOW + 2))
    later = finish_preemption(restarted, jobs, list(victims), gang, NOW + 3)

    assert loaded == [None, None]
    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[gang.job_id].placement) == 2
    await lease.release()


async def test_restart_keeps_claimed_cancelled_victims(
    pool: asyncpg.Pool, database_dsn: str
) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    store = JobStore(pool, "s0")
    book, gang, victims = await preempting_book(store, epoch)
    # The owners cancel the victims while they stop, then the gang is cancelled too, and the
    # next preemptor claims the victims before the restart.
    fx = Effects(NOW + 2)
    for job_id in victims:
        book.cancel(job_id, "cancelled by owner", "rpc:CancelJob", fx)
    book.cancel(gang.job_id, "cancelled by owner", "rpc:CancelJob", fx)
    await commit(store, fx, epoch)
    successor = make_job("interactive", tasks=2, submitted_at=NOW + 3)
    await store.insert_jobs([successor], [None], epoch, "test")
    book.add([successor], NOW + 3)
    fx = run_pass(book, NOW + 3)
    await commit(store, fx, epoch)
    jobs = {job.job_id: job for job in book.jobs.values()}
    stored = [await store.get_job(job_id) for job_id in victims]

    restarted = await restart(store, NOW + 4)
    awaited = restarted.engine.engine.jobs[successor.job_id].awaiting_victims
    after_restart = preempted_jobs(run_pass(restarted, NOW + 4))
    later = finish_preemption(restarted, jobs, list(victims), successor, NOW + 5)

    assert preempted_jobs(fx) == []
    assert [job.preemptor_id for job in stored if job is not None] == [successor.job_id] * 2
    assert [job.stop_outcome for job in stored if job is not None] == ["cancelled"] * 2
    assert awaited == set(victims)
    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[successor.job_id].placement) == 2
    await lease.release()
