"""Pending reasons that follow the fleet, against the real (pure) engine, without servers."""

from __future__ import annotations

from dataclasses import replace

from acsp.v1 import scheduler_pb2
from scheduler.engine.decisions import ReasonCode
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.convert import pending_reason_to_proto
from scheduler.service.engine_adapter import EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import PENDING_REASONS, Job, JobSpec, new_job_id
from scheduler.service.reason_refresh import REASON_REFRESH_S

NOW = 1_800_000_000.0


def add_node(book: JobBook, fleet: FleetView, name: str, gpus: int, model: str) -> None:
    accelerators = tuple(AcceleratorView(f"{name}-GPU-{i}", model) for i in range(gpus))
    change = fleet.apply_inventory(NodeView("prov", "reg", name, accelerators), NOW)
    book.engine.add_node(change.node)


def make_book(refreshes_per_pass: int = 1000) -> tuple[JobBook, FleetView]:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    book = JobBook(adapter, epoch=7, reason_refreshes_per_pass=refreshes_per_pass)
    fleet = FleetView(heartbeat_timeout_s=15)
    add_node(book, fleet, "p100", 2, "P100")
    return book, fleet


def big_job(submitted_at: float = NOW) -> Job:
    spec = JobSpec(
        name="train",
        project_id="proj",
        command=("true",),
        grant_id="g1",
        task_count=4096,
        accelerator_millis_per_task=64_000,
        wall_time_s=3600,
    )
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=submitted_at)


def run_pass(book: JobBook, now: float) -> Effects:
    """Run one pass and stamp what it changed, as the scheduling loop does."""
    fx = Effects(now)
    book.apply_pass(book.engine.schedule(now), fx)
    for job_id, (job, _) in fx.changed.items():
        book.jobs[job_id] = replace(job, updated_at=now)
    return fx


def test_reason_follows_larger_node() -> None:
    book, fleet = make_book()
    job = replace(big_job(), updated_at=NOW)
    book.add([job], NOW)
    run_pass(book, NOW + 1)
    assert book.jobs[job.job_id].pending_reason == "task_too_large"
    assert "models P100 in prov/reg has 2" in book.jobs[job.job_id].reason

    add_node(book, fleet, "h100", 8, "H100-SXM5-80GB")
    soon = run_pass(book, NOW + 2)
    later = run_pass(book, NOW + 1 + REASON_REFRESH_S)

    # The code stays task_too_large, but the message names the node that joined.
    assert job.job_id not in soon.changed
    assert job.job_id in later.changed
    waiting = book.jobs[job.job_id]
    assert waiting.pending_reason == "task_too_large"
    assert "models H100-SXM5-80GB,P100 in prov/reg has 8" in waiting.reason


def test_unchanged_reason_is_not_rewritten() -> None:
    book, _ = make_book()
    job = big_job()
    book.add([job], NOW)
    run_pass(book, NOW + 1)

    fx = run_pass(book, NOW + 2 + REASON_REFRESH_S)

    assert fx.changed == {}


def test_refreshes_per_pass_are_bounded() -> None:
    book, fleet = make_book(refreshes_per_pass=3)
    jobs = [big_job(NOW + i) for i in range(7)]
    book.add(jobs, NOW)
    first = run_pass(book, NOW + 10)
    assert len(first.changed) == 7

    add_node(book, fleet, "h100", 8, "H100-SXM5-80GB")
    now = NOW + 10 + REASON_REFRESH_S
    counts = [len(run_pass(book, now + step).changed) for step in range(4)]

    # Three jobs per pass, each once, so every job is current after three passes.
    assert counts == [3, 3, 1, 0]
    for job in jobs:
        assert "has 8" in book.jobs[job.job_id].reason


def test_new_code_ignores_refresh_bounds() -> None:
    book, fleet = make_book(refreshes_per_pass=1)
    jobs = [big_job(NOW + i) for i in range(3)]
    book.add(jobs, NOW)
    run_pass(book, NOW + 10)

    # A node large enough for one task turns task_too_large into another code at once.
    add_node(book, fleet, "big", 64, "P100")
    fx = run_pass(book, NOW + 11)

    assert len(fx.changed) == 3
    for job in jobs:
        assert book.jobs[job.job_id].pending_reason != "task_too_large"


def test_reason_names_match_proto() -> None:
    names = [
        name.removeprefix("PENDING_REASON_").lower() for name in scheduler_pb2.PendingReason.keys()
    ]
    assert list(PENDING_REASONS) == ["", *names[1:]]
    for code in ReasonCode:
        assert code.value in PENDING_REASONS
        assert pending_reason_to_proto(code.value) == PENDING_REASONS.index(code.value)
