"""Priority preemption through the job book, against the real (pure) engine, without servers."""

from __future__ import annotations

from decimal import Decimal

from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.admission import HoldOutcome
from scheduler.service.engine_adapter import EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job, JobSpec, new_job_id

NOW = 1_800_000_000.0
MODEL = "A100-SXM4-80GB"


def make_book() -> JobBook:
    """Return a job book over 8 nodes of 2 accelerators each."""
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    for index in range(8):
        accelerators = tuple(AcceleratorView(f"n{index}-GPU-{i}", MODEL) for i in range(2))
        change = fleet.apply_inventory(NodeView("prov", "reg", f"n{index}", accelerators), NOW)
        adapter.add_node(change.node)
    return JobBook(adapter, epoch=7)


def make_job(priority: str, tasks: int = 1, submitted_at: float = NOW) -> Job:
    spec = JobSpec(
        name="train",
        project_id="proj",
        command=("true",),
        grant_id="g1",
        task_count=tasks,
        wall_time_s=600,
        priority=priority,
        checkpointable=True,
    )
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=submitted_at)


def run_pass(book: JobBook, now: float) -> Effects:
    fx = Effects(now)
    book.apply_pass(book.engine.schedule(now), fx)
    return fx


def report_all(book: JobBook, job: Job, state: str, now: float) -> Effects:
    """Report ``state`` for every task of ``job``'s current attempt from its node."""
    fx = Effects(now)
    current = book.jobs[job.job_id]
    for task in current.placement:
        task_id = f"{job.job_id}/{current.attempt}/{task.task_index}"
        book.apply_task(task.node_key, task_id, state, -15 if state == "stopped" else 0, "", fx)
    return fx


def start(book: JobBook, job: Job, now: float) -> None:
    """Give ``job``, placed by the last pass, its hold and report its tasks started."""
    fx = Effects(now)
    outcome = HoldOutcome("held", f"h-{job.job_id}", "g1", Decimal(1))
    book.apply_hold(job.job_id, book.jobs[job.job_id].attempt, outcome, fx)
    report_all(book, job, "started", now)
    assert book.jobs[job.job_id].state == "running"


def full_book() -> tuple[JobBook, list[Job]]:
    """Return a book whose 16 accelerators run one preemptible job each."""
    book = make_book()
    fillers = [make_job("preemptible") for _ in range(16)]
    book.add(fillers, NOW)
    run_pass(book, NOW)
    for job in fillers:
        start(book, job, NOW)
    return book, fillers


def preempted_jobs(fx: Effects) -> list[str]:
    """Return the jobs that the pass of ``fx`` preempted, leaving out stopping jobs it claimed."""
    return [
        job.job_id
        for job, cause in fx.changed.values()
        if job.state == "stopping" and job.stop_outcome == "requeue" and cause != "engine:claim"
    ]


def finish_preemption(
    book: JobBook, jobs: dict[str, Job], stopping: list[str], target: Job, now: float
) -> list[str]:
    """Stop the preempted jobs one by one, with a pass after each stop, until ``target`` is
    placed. Requeued jobs that a pass places again start at once. Returns the jobs preempted
    in these passes."""
    preempted: list[str] = []
    for _ in range(40):
        if not stopping:
            break
        victim = jobs[stopping.pop(0)]
        report_all(book, victim, "stopped", now)
        fx = run_pass(book, now)
        for job_id in preempted_jobs(fx):
            preempted.append(job_id)
            stopping.append(job_id)
        for job, _ in list(fx.changed.values()):
            if job.job_id != target.job_id and job.placement and job.state == "pending":
                start(book, jobs[job.job_id], now)
        if book.jobs[target.job_id].placement:
            break
        now += 1.0
    return preempted


def test_interactive_gang_preempts_two_of_sixteen() -> None:
    book, fillers = full_book()
    gang = make_job("interactive", tasks=2, submitted_at=NOW + 1)
    book.add([gang], NOW + 1)
    first = preempted_jobs(run_pass(book, NOW + 1))
    assert len(first) == 2
    jobs = {job.job_id: job for job in [*fillers, gang]}

    later = finish_preemption(book, jobs, list(first), gang, NOW + 2)

    assert later == []
    assert len(book.jobs[gang.job_id].placement) == 2
    assert [book.jobs[job_id].state for job_id in first] == ["pending", "pending"]


def test_restart_keeps_preemptor_waiting_for_victims() -> None:
    book, fillers = full_book()
    gang = make_job("interactive", tasks=2, submitted_at=NOW + 1)
    book.add([gang], NOW + 1)
    first = preempted_jobs(run_pass(book, NOW + 1))
    jobs = {job.job_id: job for job in [*fillers, gang]}

    # A new leader loads every open job as stored, the stopping victims too.
    restarted = make_book()
    restarted.add(list(book.jobs.values()), NOW + 2)
    fx = Effects(NOW + 2)
    restarted.settle_reloaded(fx)
    after_restart = preempted_jobs(run_pass(restarted, NOW + 2))
    later = finish_preemption(restarted, jobs, list(first), gang, NOW + 3)

    assert after_restart == []
    assert later == []
    assert len(restarted.jobs[gang.job_id].placement) == 2


def test_stop_deadline_follows_stops() -> None:
    book, fillers = full_book()
    gang = make_job("interactive", tasks=2, submitted_at=NOW + 1)
    book.add([gang], NOW + 1)
    first, second = preempted_jobs(run_pass(book, NOW + 1))
    jobs = {job.job_id: job for job in [*fillers, gang]}
    cancelled = next(job_id for job_id, job in book.jobs.items() if job.state == "running")

    book.cancel(cancelled, "cancelled by owner", "rpc:CancelJob", Effects(NOW + 2))
    report_all(book, jobs[first], "stopped", NOW + 3)

    # The engine gives checkpointable victims 300 s, and a cancel the job's own grace.
    assert book.jobs[second].stop_deadline == NOW + 301
    assert book.jobs[cancelled].stop_deadline == NOW + 2 + jobs[cancelled].spec.grace_s
    assert book.jobs[first].state == "pending"
    assert book.jobs[first].stop_deadline is None


def test_claim_keeps_cancel_cause() -> None:
    book, _ = full_book()
    gang = make_job("interactive", tasks=2, submitted_at=NOW + 1)
    book.add([gang], NOW + 1)
    victim, other = preempted_jobs(run_pass(book, NOW + 1))
    book.cancel(gang.job_id, "cancelled by owner", "rpc:CancelJob:req-1", Effects(NOW + 2))
    successor = make_job("interactive", tasks=2, submitted_at=NOW + 2)
    book.add([successor], NOW + 2)

    # The victim's owner cancels it in the turn whose pass lets the successor claim it. The
    # turn writes the victim once, with the cause of the cancel.
    fx = Effects(NOW + 3)
    book.cancel(victim, "cancelled by owner", "rpc:CancelJob:req-2", fx)
    book.apply_pass(book.engine.schedule(NOW + 3), fx)

    assert fx.changed[victim][0].preemptor_id == successor.job_id
    assert fx.changed[victim][0].stop_outcome == "cancelled"
    assert fx.changed[victim][1] == "rpc:CancelJob:req-2"
    assert fx.changed[other][0].preemptor_id == successor.job_id
    assert fx.changed[other][1] == "engine:claim"
