"""Passes after which nothing was freed try only the new jobs."""

from __future__ import annotations

from scheduler.engine import JobEnded, JobOutcome
from tests.engine.helpers import job, make_engine, node, placed, reasons


def test_arrivals_only_pass_keeps_reasons() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("big", accelerators=8))
    engine.submit(job("fill", accelerators=3, submit=1.0))
    first = engine.schedule(0.0)
    assert list(placed(first)) == ["fill"]

    engine.submit(job("small", accelerators=1, submit=2.0))
    second = engine.schedule(5.0)

    assert list(placed(second)) == ["small"]
    assert reasons(second) == {"big": "task_too_large"}
    assert second.waiting[0] is first.waiting[0]


def test_release_makes_next_pass_full() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("a", accelerators=4))
    engine.submit(job("b", accelerators=4, submit=1.0))
    engine.schedule(0.0)

    engine.apply(JobEnded("a", JobOutcome.COMPLETED))
    result = engine.schedule(10.0)

    assert list(placed(result)) == ["b"]
    assert result.waiting == ()


def test_incremental_and_full_passes_agree() -> None:
    def run(with_event: bool) -> list[str]:
        engine = make_engine()
        engine.add_node(node("n1", 8))
        engine.submit(job("w", accelerators=6))
        engine.schedule(0.0)
        for i in range(6):
            engine.submit(job(f"j{i}", accelerators=1, project=f"p{i % 2}", submit=1.0 + i))
        if with_event:
            engine.apply(JobEnded("w", JobOutcome.COMPLETED))
            engine.submit(job("w2", accelerators=6, submit=0.5))
        return sorted(placed(engine.schedule(10.0)))

    assert run(with_event=False) == ["j0", "j1"]
    assert run(with_event=True) == ["j0", "j1", "w2"]


def test_new_advance_reservation_gets_reason() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("now", accelerators=1))
    engine.schedule(0.0)

    engine.submit(job("later", accelerators=4, start_at=500.0, wall_time_s=60.0))
    result = engine.schedule(1.0)

    assert reasons(result) == {"later": "reservation"}
