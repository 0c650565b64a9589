"""Project, institution and pool limits, also across admissions of one pass."""

from __future__ import annotations

from scheduler.engine import Limit, LimitScope
from tests.engine.helpers import job, make_engine, node, placed, reasons


def test_limit_eight_with_seven_in_use_rejects_eight() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.set_limit(Limit(LimitScope.PROJECT, "proj", 8000))
    engine.submit(job("seven", accelerators=7))
    assert "seven" in placed(engine.schedule(0.0))

    engine.submit(job("eight", accelerators=8, submit=1.0))
    result = engine.schedule(1.0)

    assert placed(result) == {}
    assert reasons(result)["eight"] == "limit"
    message = next(w.message for w in result.waiting if w.job_id == "eight")
    assert "7 in use" in message


def test_admissions_in_one_pass_never_overfill_project_limit() -> None:
    engine = make_engine()
    for i in range(4):
        engine.add_node(node(f"n{i}", 8))
    engine.set_limit(Limit(LimitScope.PROJECT, "proj", 10_000))
    for i in range(8):
        engine.submit(job(f"j{i}", accelerators=3, submit=float(i)))

    result = engine.schedule(0.0)

    total = sum(sum(len(t.accelerator_ids) for t in p.tasks) for p in placed(result).values())
    assert total == 9
    assert len(placed(result)) == 3
    assert sorted(reasons(result).values()) == ["limit"] * 5


def test_admissions_in_one_pass_never_overfill_pool_limit() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.set_limit(Limit(LimitScope.POOL, "p1/r1/A100-SXM4-80GB", 5000))
    for i in range(6):
        engine.submit(job(f"j{i}", accelerators=1, project=f"proj{i}", submit=float(i)))
    engine.submit(job("frac", accelerators=0.5, project="projf", submit=10.0))

    result = engine.schedule(0.0)

    used = engine.fleet.pools[("p1", "r1", "A100-SXM4-80GB")].used_millis
    assert used <= 5000
    assert len(placed(result)) == 5


def test_institution_limit_counts_all_its_projects() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.set_limit(Limit(LimitScope.INSTITUTION, "uni", 4000))
    engine.submit(job("a", accelerators=2, project="pa", institution="uni"))
    engine.submit(job("b", accelerators=2, project="pb", institution="uni", submit=1.0))
    engine.submit(job("c", accelerators=2, project="pc", institution="uni", submit=2.0))

    result = engine.schedule(0.0)

    assert len(placed(result)) == 2
    assert list(reasons(result).values()) == ["limit"]
