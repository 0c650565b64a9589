"""Model lists, model constraints, data residency, budget and reasons."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from scheduler.engine import (
    BudgetChanged,
    Engine,
    EngineConfig,
    InvalidInputError,
    ModelConstraint,
    Pledge,
    ReasonCode,
    RecallAnnounced,
    TaskPlacement,
)
from tests.engine.helpers import job, make_engine, node, placed, reasons


def mixed_engine() -> Engine:
    engine = make_engine()
    engine.add_node(node("t4", 2, model="T4", region="eu"))
    engine.add_node(node("mi", 2, model="MI300X", region="us"))
    engine.add_node(node("h100", 2, model="H100-SXM5-80GB", region="us"))
    return engine


def test_accepted_models_list_is_respected() -> None:
    engine = mixed_engine()
    engine.submit(job("j", models=frozenset({"T4"})))

    assert placed(engine.schedule(0.0))["j"].tasks[0].node_id == "t4"


def test_vendor_and_memory_constraint() -> None:
    engine = mixed_engine()
    engine.submit(job("amd", constraint=ModelConstraint(vendor="amd")))
    engine.submit(job("big", constraint=ModelConstraint(min_memory_gib=80, vendor="nvidia")))

    result = placed(engine.schedule(0.0))

    assert result["amd"].tasks[0].node_id == "mi"
    assert result["big"].tasks[0].node_id == "h100"


def test_software_stack_constraint() -> None:
    engine = mixed_engine()
    engine.submit(job("rocm", constraint=ModelConstraint(software_stack="rocm")))

    assert placed(engine.schedule(0.0))["rocm"].tasks[0].node_id == "mi"


def test_data_residency_limits_regions() -> None:
    engine = mixed_engine()
    engine.submit(job("eu-only", accelerators=2, regions=frozenset({"p1/eu"})))
    engine.submit(job("eu-more", accelerators=1, regions=frozenset({"p1/eu"}), submit=1.0))

    result = engine.schedule(0.0)

    assert placed(result)["eu-only"].tasks[0].node_id == "t4"
    assert reasons(result)["eu-more"] == ReasonCode.FAIR_SHARE
    assert reasons(engine.schedule(1.0))["eu-more"] == ReasonCode.FAIR_SHARE
    engine.apply(BudgetChanged("other", available=True))
    assert reasons(engine.schedule(2.0))["eu-more"] == ReasonCode.NO_CAPACITY


def test_no_accepted_model_in_fleet() -> None:
    engine = mixed_engine()
    engine.submit(job("a10", models=frozenset({"A10"})))

    assert reasons(engine.schedule(0.0))["a10"] == "no_matching_model"


def test_budget_blocks_project() -> None:
    engine = mixed_engine()
    engine.apply(BudgetChanged("proj", available=False))
    engine.submit(job("j"))

    assert reasons(engine.schedule(0.0))["j"] == "budget"


def test_budget_block_spares_smaller_jobs() -> None:
    engine = mixed_engine()
    engine.apply(BudgetChanged("proj", available=False, size=2000 * 3600.0))
    engine.apply(BudgetChanged("proj", available=False, size=4000 * 3600.0))
    engine.submit(job("big", accelerators=2, wall_time_s=3600.0))
    engine.submit(job("unbounded", submit=1.0))
    engine.submit(job("small", wall_time_s=3600.0, submit=2.0))

    result = engine.schedule(0.0)

    # The smaller of the two blocks applies: two accelerators for an hour wait, one does not.
    assert reasons(result)["big"] == ReasonCode.BUDGET
    assert reasons(result)["unbounded"] == ReasonCode.BUDGET
    assert "small" in placed(result)


def test_budget_block_spares_other_payers() -> None:
    engine = mixed_engine()
    engine.apply(BudgetChanged("proj", available=False, payer="g1"))
    engine.submit(job("on-g1", payer="g1"))
    engine.submit(job("on-g2", payer="g2", submit=1.0))
    engine.submit(job("on-s1", payer="g1/s1", submit=2.0))
    engine.submit(job("no-grant", submit=3.0))

    result = engine.schedule(0.0)

    assert reasons(result)["on-g1"] == ReasonCode.BUDGET
    assert "on-g2" in placed(result)
    assert "on-s1" in placed(result)
    assert "no-grant" in placed(result)


def test_no_grant_block_holds_no_grant_jobs() -> None:
    engine = mixed_engine()
    engine.apply(BudgetChanged("proj", available=False))
    engine.submit(job("no-grant", models=frozenset({"T4"})))
    engine.submit(job("on-g1", payer="g1", models=frozenset({"T4"}), submit=1.0))

    result = engine.schedule(0.0)

    assert reasons(result)["no-grant"] == ReasonCode.BUDGET
    assert "on-g1" in placed(result)


def test_lifting_block_frees_its_payer_only() -> None:
    engine = mixed_engine()
    engine.apply(BudgetChanged("proj", available=False, payer="g1"))
    engine.apply(BudgetChanged("proj", available=False, payer="g2"))
    engine.apply(BudgetChanged("proj", available=True, payer="g1"))
    engine.submit(job("on-g1", payer="g1"))
    engine.submit(job("on-g2", payer="g2", submit=1.0))

    result = engine.schedule(0.0)

    assert "on-g1" in placed(result)
    assert reasons(result)["on-g2"] == ReasonCode.BUDGET


def test_budget_reason_states_refusal() -> None:
    engine = mixed_engine()
    engine.submit(job("small", wall_time_s=3600.0))
    engine.submit(job("big", accelerators=2, wall_time_s=3600.0, submit=1.0))
    refusal = "needs 2 PF-days for this hold; grant g1 has 0.5 PF-days available"
    engine.apply(BudgetChanged("proj", False, 1000 * 3600.0, "small", refusal, 1_800_000_030.0))

    messages = {w.job_id: w.message for w in engine.schedule(0.0).waiting}

    assert messages["small"] == (
        f"{refusal}; the scheduler asks for the hold again after 2027-01-15 08:00:30 UTC"
    )
    assert messages["big"].startswith("the grant service rejected the hold of job small")
    assert "names no grant either" in messages["big"]
    assert refusal in messages["big"]
    assert "budget block" not in messages["big"]


def test_budget_reason_names_shared_grant() -> None:
    engine = mixed_engine()
    engine.submit(job("big", accelerators=2, wall_time_s=3600.0, payer="g1"))
    refusal = "needs 2 PF-days for this hold; grant g1 has 0.5 PF-days available"
    engine.apply(BudgetChanged("proj", False, 1000 * 3600.0, "small", refusal, None, "g1"))

    message = {w.job_id: w.message for w in engine.schedule(0.0).waiting}["big"]

    assert message == (
        "the grant service rejected the hold of job small, which draws on the same grant or "
        f"sub-allocation and is no larger than this one: {refusal}; the scheduler asks for "
        "the hold again at its next budget check"
    )


def test_every_pending_job_has_one_reason() -> None:
    engine = mixed_engine()
    for i in range(10):
        engine.submit(job(f"j{i}", accelerators=2, submit=float(i)))

    result = engine.schedule(0.0)

    assert len(placed(result)) == 3
    waiting = [w.job_id for w in result.waiting]
    assert sorted(waiting) == sorted(engine.pending())
    assert all(w.message for w in result.waiting)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_count", 0),
        ("millis_per_task", 1500),
        ("millis_per_task", 0),
        ("wall_time_s", 0.0),
        ("wall_time_s", math.nan),
        ("wall_time_s", math.inf),
        ("submit_time", math.inf),
        ("submit_time", math.nan),
        ("start_at", math.nan),
        ("start_at", -math.inf),
    ],
)
def test_invalid_job_is_rejected(field: str, value: object) -> None:
    engine = mixed_engine()
    spec = replace(job("bad"), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=field):
        engine.submit(spec)
    assert engine.pending() == []


def test_non_finite_time_is_rejected() -> None:
    engine = mixed_engine()
    engine.submit(job("ok"))

    with pytest.raises(InvalidInputError, match="now is nan"):
        engine.schedule(math.nan)
    with pytest.raises(InvalidInputError, match="now is inf"):
        engine.schedule(math.inf)
    assert engine.clock is None
    assert "ok" in placed(engine.schedule(0.0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("half_life_s", math.nan),
        ("half_life_s", math.inf),
        ("preemption_grace_s", math.nan),
        ("preemption_grace_s", math.inf),
        ("default_weight", math.nan),
    ],
)
def test_invalid_config_is_rejected(field: str, value: float) -> None:
    settings = {"half_life_s": 3600.0, field: value}

    with pytest.raises(InvalidInputError, match=field):
        Engine(EngineConfig(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "end"), [(math.nan, 10.0), (0.0, math.nan), (0.0, math.inf)])
def test_non_finite_pledge_is_rejected(start: float, end: float) -> None:
    engine = mixed_engine()

    with pytest.raises(InvalidInputError, match="finite"):
        engine.add_pledge(Pledge("pl", "p1", "r1", "A100-SXM4-80GB", 1, 1, start, end))
    assert engine.capacity.pledges == {}


@pytest.mark.parametrize(("effective_at", "until"), [(math.nan, None), (0.0, math.nan)])
def test_non_finite_recall_is_rejected(effective_at: float, until: float | None) -> None:
    engine = mixed_engine()
    recall = RecallAnnounced("rc", "p1", "r1", "A100-SXM4-80GB", 1, effective_at, until)

    with pytest.raises(InvalidInputError, match="finite"):
        engine.apply(recall)
    assert engine.capacity.recalls == {}


def test_unknown_model_is_rejected() -> None:
    engine = mixed_engine()
    with pytest.raises(InvalidInputError, match="models"):
        engine.submit(job("x", models=frozenset({"B200-imaginary"})))


@pytest.mark.parametrize("start", [math.nan, math.inf, -math.inf])
def test_adopt_rejects_non_finite_start(start: float) -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    task = TaskPlacement(0, "n1", ("n1-gpu0",), 1000)

    with pytest.raises(InvalidInputError, match="start is"):
        engine.adopt(job("a"), [task], start)

    assert "a" not in engine.jobs
