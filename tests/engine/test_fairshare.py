"""Queue order: priority class, then hierarchical fair share on decayed usage."""

from __future__ import annotations

import math

import pytest

from scheduler.engine import (
    Engine,
    EngineConfig,
    InvalidInputError,
    JobEnded,
    JobOutcome,
    Level,
    PriorityClass,
)
from scheduler.engine.fairshare import FairShare
from tests.engine.helpers import HOUR, job, make_engine, node, placed


def test_unset_half_life_is_invalid() -> None:
    with pytest.raises(InvalidInputError, match="half_life_s"):
        Engine(EngineConfig(half_life_s=None))


def test_interactive_before_standard_before_preemptible() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.submit(job("pre", priority=PriorityClass.PREEMPTIBLE, submit=0.0, project="a"))
    engine.submit(job("std", priority=PriorityClass.STANDARD, submit=1.0, project="b"))
    engine.submit(job("int", priority=PriorityClass.INTERACTIVE, submit=2.0, project="c"))

    assert list(placed(engine.schedule(5.0))) == ["int"]


def test_heavy_user_sorts_after_light_user() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("heavy-1", accelerators=4, project="heavy"))
    engine.schedule(0.0)
    engine.apply(JobEnded("heavy-1", JobOutcome.COMPLETED), now=HOUR)
    engine.submit(job("heavy-2", accelerators=4, project="heavy", submit=HOUR))
    engine.submit(job("light-1", accelerators=4, project="light", submit=HOUR + 1))

    assert list(placed(engine.schedule(HOUR + 2))) == ["light-1"]


def test_usage_decays_with_half_life() -> None:
    share = FairShare(half_life_s=100.0, default_weight=1.0)
    share.register("p", "i", "g")
    share.advance(0.0)
    share.add_running("p", 1000)
    share.advance(100.0)
    share.add_running("p", -1000)
    after_run = share.usage(Level.PROJECT, "p")
    expected = 1000 * (1 - 0.5) * 100.0 / math.log(2)
    assert after_run == pytest.approx(expected)

    share.advance(200.0)

    assert share.usage(Level.PROJECT, "p") == pytest.approx(after_run / 2)
    assert share.usage(Level.INSTITUTION, "i") == pytest.approx(after_run / 2)


def test_decayed_usage_restores_order() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("old", accelerators=4, project="old"))
    engine.schedule(0.0)
    engine.apply(JobEnded("old", JobOutcome.COMPLETED), now=10 * HOUR)
    engine.submit(job("recent", accelerators=4, project="recent", submit=10 * HOUR))
    engine.schedule(10 * HOUR)
    engine.apply(JobEnded("recent", JobOutcome.COMPLETED), now=11 * HOUR)

    engine.submit(job("old-2", accelerators=4, project="old", submit=30 * HOUR))
    engine.submit(job("recent-2", accelerators=4, project="recent", submit=30 * HOUR))
    old = engine.fair_share.usage(Level.PROJECT, "old")
    engine.fair_share.advance(30 * HOUR)

    assert old > 0
    assert list(placed(engine.schedule(30 * HOUR))) == ["old-2"]


def test_weights_scale_the_share() -> None:
    share = FairShare(half_life_s=HOUR, default_weight=1.0)
    for project in ("big", "small"):
        share.register(project, "i", "g")
    share.set_weight(Level.PROJECT, "big", 3.0)
    share.charge("big", 300.0)
    share.charge("small", 100.0)

    assert share.key("big")[2] == pytest.approx(share.key("small")[2])


def test_zero_weight_sorts_last() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.set_weight(Level.PROJECT, "zero", 0.0)
    engine.submit(job("z", project="zero", submit=0.0))
    engine.submit(job("n", project="normal", submit=100.0))

    assert list(placed(engine.schedule(200.0))) == ["n"]


def test_institution_level_comes_before_project_level() -> None:
    share = FairShare(half_life_s=HOUR, default_weight=1.0)
    share.register("a1", "uni-a", "g")
    share.register("a2", "uni-a", "g")
    share.register("b1", "uni-b", "g")
    share.charge("a1", 100.0)
    share.charge("b1", 60.0)

    assert share.key("a2") > share.key("b1")


def test_one_pass_interleaves_projects() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    for i in range(4):
        engine.submit(job(f"a{i}", project="a", submit=float(i)))
    for i in range(4):
        engine.submit(job(f"b{i}", project="b", submit=10.0 + i))

    started = set(placed(engine.schedule(20.0)))

    assert started == {"a0", "a1", "b0", "b1"}
