"""Reasons for jobs that no node of the fleet can ever hold."""

from __future__ import annotations

import pytest

from scheduler.engine import Engine, InvalidInputError, Pledge, Topology
from tests.engine.helpers import job, make_engine, node


def waiting_message(engine_job: str, result: object) -> tuple[str, str]:
    for w in result.waiting:  # type: ignore[attr-defined]
        if w.job_id == engine_job:
            return str(w.reason), w.message
    raise AssertionError(f"{engine_job} is not waiting")


def test_task_too_big_for_every_node() -> None:
    engine = make_engine()
    for i in range(7):
        engine.add_node(node(f"n{i}", 2))
    engine.submit(job("big", accelerators=8, tasks=2, topology=Topology.SAME_REGION))

    reason, message = waiting_message("big", engine.schedule(10.0))

    assert reason == "task_too_large"
    assert "no node has 8 accelerators of an accepted model for one task" in message
    assert message.endswith("has 2; it waits until a larger node joins")


def test_single_task_too_big_for_every_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.submit(job("big", accelerators=16))

    reason, message = waiting_message("big", engine.schedule(10.0))

    assert reason == "task_too_large"
    assert "no node has 16 accelerators of an accepted model for one task" in message
    assert message.endswith("has 8; it waits until a larger node joins")
    assert "topology" not in message


def test_task_too_big_without_models_is_size() -> None:
    # Any model is accepted, so the request per task is what no node can meet.
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.add_node(node("n2", 2, model="T4"))
    engine.submit(job("four", accelerators=4))

    reason, message = waiting_message("four", engine.schedule(10.0))

    assert reason == "task_too_large"
    assert "no node has 4 accelerators of an accepted model for one task" in message
    assert "has 2; it waits until a larger node joins" in message


def test_same_node_gang_too_big_is_topology() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("gang", accelerators=2, tasks=3, topology=Topology.SAME_NODE))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "topology"
    assert "has 6 accelerators" in message


def test_busy_fleet_that_could_fit_is_not_topology() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.submit(job("first", accelerators=2))
    engine.submit(job("second", accelerators=2, submit=1.0))

    reason, message = waiting_message("second", engine.schedule(10.0))

    assert reason != "topology"
    assert "largest" not in message


def test_region_without_nodes_is_named() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.submit(job("far", regions=frozenset({"mars/x"})))

    reason, message = waiting_message("far", engine.schedule(10.0))

    assert reason == "no_matching_model"
    assert message == "no node in the allowed regions (mars/x)"


def test_region_without_model_is_named() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 2))
    engine.submit(job("picky", regions=frozenset({"p1/r1"}), models=frozenset({"T4"})))

    reason, message = waiting_message("picky", engine.schedule(10.0))

    assert reason == "no_matching_model"
    assert "has an accepted accelerator model" in message


def test_job_larger_than_fleet_says_so() -> None:
    engine = make_engine()
    for i in range(2):
        engine.add_node(node(f"n{i}", 8))
    engine.submit(job("huge", accelerators=2, tasks=100, topology=Topology.SAME_REGION))

    reason, message = waiting_message("huge", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert "needs 200 accelerators of one model, but any one region has at most 16" in message
    assert message.endswith("; it waits until the fleet grows")


def test_job_larger_than_whole_fleet_says_so() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8, provider="p2"))
    engine.submit(job("huge", accelerators=8, tasks=3, allow_cross_provider=True))

    reason, message = waiting_message("huge", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert "(across providers) needs 24 accelerators of one model" in message
    assert "but the whole fleet has at most 16 of one of models" in message
    assert message.endswith("; it waits until the fleet grows")


def test_gang_counts_one_model_per_provider() -> None:
    engine = make_engine()
    engine.add_node(node("h1", 16, model="H100-SXM5-80GB", provider="acme"))
    engine.add_node(node("t1", 2, model="T4", provider="acme"))
    engine.add_node(node("p1", 16, model="P100", provider="openb"))
    engine.submit(job("gang", tasks=17))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert "needs 17 accelerators of one model, but any one provider has at most 16" in message
    assert "cross-provider" not in message


def test_denied_cross_provider_gang_names_providers() -> None:
    engine = make_engine()
    engine.add_node(node("h1", 16, model="P100", provider="acme"))
    engine.add_node(node("p1", 16, model="P100", provider="openb"))
    denying = frozenset({"acme", "openb"})
    engine.submit(job("gang", tasks=20, cross_provider_denied_by=denying))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert "(same_provider) needs 20 accelerators of one model" in message
    assert "but provider(s) acme,openb do not allow cross-provider gangs" in message
    assert message.endswith("until the fleet grows or those providers allow cross-provider gangs")


def test_denied_cross_provider_gang_too_big_anyway() -> None:
    engine = make_engine()
    engine.add_node(node("h1", 16, model="H100-SXM5-80GB", provider="acme"))
    engine.add_node(node("t1", 2, model="T4", provider="acme"))
    engine.add_node(node("p1", 16, model="P100", provider="openb"))
    denying = frozenset({"acme", "openb"})
    engine.submit(job("gang", tasks=20, cross_provider_denied_by=denying))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert "but provider(s) acme,openb do not allow cross-provider gangs" in message
    assert "and the whole fleet has at most 16 of one model" in message
    assert message.endswith("; it waits until the fleet grows")


def test_denied_cross_provider_gang_waits_for_room() -> None:
    engine = make_engine()
    engine.add_node(node("a1", 2, model="P100", provider="acme"))
    engine.add_node(node("a2", 2, model="P100", provider="acme"))
    engine.add_node(node("o1", 2, model="P100", provider="openb"))
    engine.submit(job("first", accelerators=2, regions=frozenset({"acme/r1"})))
    engine.schedule(0.0)
    denying = frozenset({"openb"})
    engine.submit(job("gang", tasks=3, cross_provider_denied_by=denying, submit=1.0))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "topology"
    assert "4 accelerators of models P100 in acme/r1,openb/r1 are free" in message
    assert "but provider(s) openb do not allow cross-provider gangs" in message
    assert message.endswith("so all its tasks must run on one provider")


def test_cross_provider_denial_needs_flag_cleared() -> None:
    spec = job(
        "gang", tasks=2, allow_cross_provider=True, cross_provider_denied_by=frozenset({"a"})
    )

    with pytest.raises(InvalidInputError, match="cross_provider_denied_by"):
        spec.validate()


def test_task_too_big_says_it_waits_for_a_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.submit(job("big", accelerators=16))

    _, message = waiting_message("big", engine.schedule(10.0))

    assert message.endswith("has 8; it waits until a larger node joins")


def test_too_big_reason_follows_new_node() -> None:
    engine = make_engine()
    engine.add_node(node("p1", 2, model="P100", provider="openb", region="region-1"))
    engine.submit(job("big", accelerators=64, tasks=4096, topology=Topology.SAME_REGION))
    engine.schedule(10.0)
    engine.schedule(11.0)

    engine.add_node(node("h1", 8, model="H100-SXM5-80GB", provider="openb", region="region-1"))
    reason, message = waiting_message("big", engine.schedule(12.0))

    assert reason == "task_too_large"
    assert "the largest node of models H100-SXM5-80GB,P100 in openb/region-1 has 8" in message


def pledged_p100_engine() -> Engine:
    """Eight P100s registered in openb/region-1, of which a pledge offers six."""
    engine = make_engine()
    for i in range(2):
        engine.add_node(node(f"n{i}", 4, model="P100", provider="openb", region="region-1"))
    engine.add_pledge(Pledge("pl", "openb", "region-1", "P100", 4, 2, 0.0, 1e9))
    return engine


@pytest.mark.parametrize("tasks", [7, 8])
def test_gang_above_pledge_names_cap(tasks: int) -> None:
    engine = pledged_p100_engine()
    engine.submit(job("gang", tasks=tasks))

    reason, message = waiting_message("gang", engine.schedule(10.0))

    assert reason == "no_capacity"
    assert message.startswith("the pledge caps openb/region-1/P100 at 6 accelerators")
    assert f"{tasks} requested" in message
    assert message.endswith("it can start only if the provider pledges more")


def test_gang_within_pledge_names_cap_when_full() -> None:
    engine = pledged_p100_engine()
    engine.submit(job("first", tasks=4))
    engine.schedule(10.0)
    engine.submit(job("second", tasks=3, submit=11.0))

    reason, message = waiting_message("second", engine.schedule(12.0))

    # Four P100s are idle, but the pledge leaves two of them to jobs.
    assert reason == "no_capacity"
    assert "2 accelerators free" in message
    assert message.endswith("the pledge caps openb/region-1/P100 at 6 accelerators")
