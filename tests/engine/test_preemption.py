"""Priority preemption, provider recalls and loop freedom."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from scheduler.engine import (
    AcceleratorFailed,
    BudgetChanged,
    Cause,
    Claim,
    Engine,
    JobEnded,
    JobOutcome,
    JobSpec,
    Limit,
    LimitScope,
    Pledge,
    Preempt,
    PriorityClass,
    RecallAnnounced,
    ScheduleResult,
    TaskPlacement,
    TasksStopped,
    Topology,
)
from tests.engine.helpers import job, make_engine, node, nodes_of, placed, reasons

A100 = "A100-SXM4-80GB"


def preempts(result: ScheduleResult) -> list[Preempt]:
    return [d for d in result.decisions if isinstance(d, Preempt)]


def test_interactive_preempts_preemptible_with_grace_for_checkpointable() -> None:
    engine = make_engine(preemption_grace_s=120.0)
    engine.add_node(node("n1", 4))
    engine.submit(
        job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.schedule(0.0)

    engine.submit(job("high", accelerators=2, priority=PriorityClass.INTERACTIVE, submit=5.0))
    result = engine.schedule(10.0)

    [decision] = preempts(result)
    assert decision.job_id == "low"
    assert decision.cause is Cause.PRIORITY
    assert decision.cause_id == "high"
    assert decision.deadline == 130.0
    assert reasons(result)["high"] == "priority"

    engine.apply(JobEnded("low", JobOutcome.PREEMPTED))
    result = engine.schedule(130.0)
    assert "high" in placed(result)


def test_standard_never_preempts_standard() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("first", accelerators=4))
    engine.schedule(0.0)
    engine.submit(job("second", accelerators=4, priority=PriorityClass.INTERACTIVE, submit=1.0))

    result = engine.schedule(1.0)

    assert preempts(result) == []


def test_preemption_does_not_loop() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.submit(job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE))
    engine.schedule(0.0)
    engine.submit(job("high", accelerators=4, priority=PriorityClass.INTERACTIVE, submit=1.0))

    causes: list[tuple[str, str]] = []
    now = 1.0
    for _ in range(6):
        result = engine.schedule(now)
        causes += [(d.job_id, d.cause_id) for d in preempts(result)]
        for decision in preempts(result):
            engine.apply(JobEnded(decision.job_id, JobOutcome.PREEMPTED))
        now += 10.0

    assert causes == [("low", "high")]
    assert engine.running() == ["high"]
    assert engine.pending() == ["low"]


def test_recalled_job_restarts_in_another_region() -> None:
    engine = make_engine()
    engine.add_node(node("east1", 4, region="east"))
    engine.add_pledge(Pledge("pl-east", "p1", "east", A100, 0, 4, 0.0, 1e9))
    engine.submit(job("j", accelerators=4))
    assert placed(engine.schedule(0.0))["j"].tasks[0].node_id == "east1"
    engine.add_node(node("west1", 4, region="west"))

    engine.apply(RecallAnnounced("rc1", "p1", "east", A100, 4, effective_at=600.0))
    result = engine.schedule(100.0)
    [decision] = preempts(result)
    assert decision.cause is Cause.PROVIDER_RECALL
    assert decision.deadline == 600.0

    engine.apply(JobEnded("j", JobOutcome.PREEMPTED))
    result = engine.schedule(600.0)
    assert placed(result)["j"].tasks[0].node_id == "west1"
    assert preempts(engine.schedule(700.0)) == []


def test_recall_spares_protected_capacity() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 4, 4, 0.0, 1e9))
    engine.submit(job("a", accelerators=4))
    engine.submit(job("b", accelerators=4, priority=PriorityClass.PREEMPTIBLE, submit=1.0))
    engine.schedule(0.0)

    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 4, effective_at=50.0))
    result = engine.schedule(10.0)

    assert [d.job_id for d in preempts(result)] == ["b"]


def test_recalled_capacity_takes_no_new_work() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 0, 4, 0.0, 1e9))
    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 4, effective_at=50.0))
    engine.submit(job("a", accelerators=1))

    result = engine.schedule(0.0)

    assert reasons(result)["a"] == "provider_recall"


def test_pledge_window_end_preempts() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 4, 0, 0.0, 100.0))
    engine.submit(job("a", accelerators=2))
    engine.schedule(0.0)

    result = engine.schedule(100.0)

    [decision] = preempts(result)
    assert decision.cause is Cause.PLEDGE_ENDED


def test_recall_counts_fenced_shares_as_leaving() -> None:
    engine = make_engine()
    for name in ("n1", "n2"):
        engine.add_node(node(name, 2))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 0, 4, 0.0, 1e9))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    engine.submit(job("a", submit=1.0))
    engine.submit(job("b", submit=2.0))
    first = placed(engine.schedule(0.0))
    assert set(first) == {"g", "a", "b"}
    gang_nodes = nodes_of(first["g"])
    # The gang is requeued, and its shares stay fenced until the stops are confirmed.
    failed = sorted(gang_nodes)[0]
    engine.apply(AcceleratorFailed(failed, f"{failed}-gpu0", "e1", "XID 48"))
    engine.schedule(10.0)
    for name in gang_nodes:
        assert engine.fleet.by_id[name].fenced == {"g#1"}

    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 2, effective_at=600.0))
    result = engine.schedule(20.0)

    # Freeing the gang's two fenced accelerators meets the recall, so a and b keep running.
    assert preempts(result) == []
    for name in gang_nodes:
        engine.apply(TasksStopped(name, "g"))
    assert preempts(engine.schedule(30.0)) == []
    assert engine.running() == ["a", "b"]


def test_recall_preempts_beyond_fenced_shares() -> None:
    engine = make_engine()
    for name in ("n1", "n2"):
        engine.add_node(node(name, 2))
    engine.add_pledge(Pledge("pl", "p1", "r1", A100, 0, 4, 0.0, 1e9))
    engine.submit(job("g", tasks=2, topology=Topology.SAME_PROVIDER))
    engine.submit(job("a", submit=1.0))
    engine.submit(job("b", submit=2.0))
    failed = sorted(nodes_of(placed(engine.schedule(0.0))["g"]))[0]
    engine.apply(AcceleratorFailed(failed, f"{failed}-gpu0", "e1", "XID 48"))
    engine.schedule(10.0)

    engine.apply(RecallAnnounced("rc", "p1", "r1", A100, 3, effective_at=600.0))
    result = engine.schedule(20.0)

    # Three accelerators go back: the two fenced ones and one more job's.
    assert len(preempts(result)) == 1


def domain_fleet() -> Engine:
    engine = make_engine()
    for name in ("a1", "a2"):
        engine.add_node(node(name, 4, domain="nvl-a"))
    for name in ("b1", "b2"):
        engine.add_node(node(name, 4, domain="nvl-b"))
    return engine


def domain_gang(submit: float) -> JobSpec:
    return job(
        "g",
        accelerators=4,
        tasks=2,
        priority=PriorityClass.INTERACTIVE,
        topology=Topology.SAME_INTERCONNECT_DOMAIN,
        submit=submit,
    )


def test_domain_gang_preempts_inside_one_domain() -> None:
    engine = domain_fleet()
    engine.submit(job("s1", accelerators=4))
    for name in ("p1", "p2", "p3"):
        engine.submit(job(name, accelerators=4, priority=PriorityClass.PREEMPTIBLE, submit=1.0))
    first = placed(engine.schedule(0.0))
    # Only nvl-b runs nothing but preemptible work, so only its two jobs can make room.
    in_b = sorted(j for j, p in first.items() if nodes_of(p) <= {"b1", "b2"})
    assert len(in_b) == 2
    engine.submit(domain_gang(submit=5.0))

    result = engine.schedule(10.0)

    assert sorted(d.job_id for d in preempts(result)) == in_b
    for job_id in in_b:
        engine.apply(JobEnded(job_id, JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(20.0))["g"]) == {"b1", "b2"}


def test_domain_gang_preempts_least_work() -> None:
    engine = domain_fleet()
    for name in ("p1", "p2", "p3"):
        engine.submit(job(name, accelerators=4, priority=PriorityClass.PREEMPTIBLE))
    first = placed(engine.schedule(0.0))
    used = {node_id for place in first.values() for node_id in nodes_of(place)}
    [free_node] = {"a1", "a2", "b1", "b2"} - used
    domain = {"a1", "a2"} if free_node in {"a1", "a2"} else {"b1", "b2"}
    # The domain with a free node needs one job stopped, the other domain two.
    [victim] = [j for j, place in first.items() if nodes_of(place) <= domain]
    engine.submit(domain_gang(submit=5.0))

    result = engine.schedule(10.0)

    assert [d.job_id for d in preempts(result)] == [victim]
    engine.apply(JobEnded(victim, JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(20.0))["g"]) == domain


def test_domain_gang_skips_failed_accelerator() -> None:
    # Stopping every job in nvl-a leaves a1 with three healthy accelerators, too few.
    engine = make_engine()
    for name in ("a1", "a2"):
        engine.add_node(node(name, 4, domain="nvl-a"))
    engine.apply(AcceleratorFailed("a1", "a1-gpu3", "a1/boot/1"))
    engine.submit(job("p1", accelerators=3, priority=PriorityClass.PREEMPTIBLE))
    engine.submit(job("p2", accelerators=4, priority=PriorityClass.PREEMPTIBLE))
    first = placed(engine.schedule(0.0))
    assert nodes_of(first["p1"]) == {"a1"}
    assert nodes_of(first["p2"]) == {"a2"}
    engine.submit(domain_gang(submit=5.0))

    result = engine.schedule(10.0)

    assert preempts(result) == []


def test_preemption_stops_jobs_off_avoided_nodes() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.add_node(node("n2", 1))
    engine.submit(job("low-1", priority=PriorityClass.PREEMPTIBLE))
    engine.submit(job("low-2", priority=PriorityClass.PREEMPTIBLE, submit=1.0))
    running = placed(engine.schedule(0.0))
    on_n2 = next(job_id for job_id, place in running.items() if nodes_of(place) == {"n2"})

    engine.submit(
        job(
            "high",
            priority=PriorityClass.INTERACTIVE,
            submit=2.0,
            avoid_nodes=frozenset({"n1"}),
        )
    )
    [decision] = preempts(engine.schedule(2.0))

    assert decision.job_id == on_n2
    engine.apply(JobEnded(on_n2, JobOutcome.PREEMPTED))
    assert nodes_of(placed(engine.schedule(3.0))["high"]) == {"n2"}


def test_preemption_falls_back_to_avoided_node() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 1))
    engine.add_node(node("n2", 1))
    engine.submit(job("low", priority=PriorityClass.PREEMPTIBLE))
    engine.submit(job("standard", submit=1.0))
    running = placed(engine.schedule(0.0))
    low_node = nodes_of(running["low"])

    engine.submit(
        job(
            "high",
            priority=PriorityClass.INTERACTIVE,
            submit=2.0,
            avoid_nodes=frozenset(low_node),
        )
    )
    [decision] = preempts(engine.schedule(2.0))

    assert decision.job_id == "low"


def full_fleet_of_preemptible(jobs: int = 16) -> Engine:
    """Return an engine with 8 nodes of 2 accelerators and ``jobs`` one-accelerator
    preemptible jobs running there."""
    engine = make_engine()
    for index in range(8):
        engine.add_node(node(f"n{index}", 2))
    for index in range(jobs):
        engine.submit(job(f"low{index:02d}", priority=PriorityClass.PREEMPTIBLE, wall_time_s=600.0))
    engine.schedule(0.0)
    return engine


def run_until_placed(
    engine: Engine, job_id: str, now: float, stopping: Sequence[str] = ()
) -> list[str]:
    """Run passes until ``job_id`` is placed, ending one preempted job after each pass.

    ``stopping`` are jobs preempted before the first pass. Returns the jobs preempted by
    these passes in the order of their preemption.
    """
    preempted: list[str] = []
    stopping = list(stopping)
    for _ in range(40):
        result = engine.schedule(now)
        for decision in preempts(result):
            preempted.append(decision.job_id)
            stopping.append(decision.job_id)
        if job_id in placed(result):
            break
        if stopping:
            # Each victim stops on its own, and the next pass runs before the others stop.
            engine.apply(JobEnded(stopping.pop(0), JobOutcome.PREEMPTED), now)
        now += 1.0
    return preempted


def test_preemptor_keeps_room_of_stopped_victims() -> None:
    engine = full_fleet_of_preemptible()
    engine.submit(job("gang", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))

    preempted = run_until_placed(engine, "gang", 1.0)

    assert len(preempted) == 2
    assert "gang" in engine.running()
    assert sorted(engine.pending()) == sorted(preempted)


def test_requeued_victim_waits_for_preemptor() -> None:
    engine = full_fleet_of_preemptible()
    engine.submit(job("gang", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))
    first, _ = [d.job_id for d in preempts(engine.schedule(1.0))]

    engine.apply(JobEnded(first, JobOutcome.PREEMPTED), 2.0)
    result = engine.schedule(2.0)

    assert placed(result) == {}
    assert reasons(result)["gang"] == "priority"
    assert reasons(result)[first] == "reservation"


def test_preemptor_keeps_free_room_meanwhile() -> None:
    engine = full_fleet_of_preemptible(jobs=15)
    engine.submit(job("gang", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))
    engine.submit(job("late", priority=PriorityClass.PREEMPTIBLE, submit=1.0))

    preempted = run_until_placed(engine, "gang", 1.0)

    assert len(preempted) == 1
    assert "gang" in engine.running()
    assert "late" in engine.pending()


def placed_tasks(engine: Engine, job_id: str) -> list[TaskPlacement]:
    """Return the placement of the running ``job_id`` as :meth:`Engine.adopt` takes it."""
    tasks = engine.jobs[job_id].tasks
    assert tasks is not None
    placements = []
    for index, allocation in sorted(tasks.items()):
        spec = allocation.node.spec
        accelerators = tuple(spec.accelerator_ids[i] for i in allocation.indices)
        placements.append(TaskPlacement(index, spec.node_id, accelerators, allocation.millis))
    return placements


def test_restored_preemption_keeps_preemptor_waiting() -> None:
    running = full_fleet_of_preemptible()
    engine = make_engine()
    for index in range(8):
        engine.add_node(node(f"n{index}", 2))
    for job_id in running.running():
        record = running.jobs[job_id]
        engine.adopt(record.spec, placed_tasks(running, job_id), 0.0)
    engine.submit(job("gang", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))
    for victim in ("low00", "low01"):
        engine.mark_preempted(victim, Cause.PRIORITY, "gang")

    result = engine.schedule(2.0)
    later = run_until_placed(engine, "gang", 3.0, stopping=["low00", "low01"])

    assert preempts(result) == []
    assert reasons(result)["gang"] == "priority"
    assert later == []
    assert "gang" in engine.running()


@pytest.mark.parametrize(("deadline", "backfilled"), [(310.0, True), (None, False)])
def test_restored_deadline_lets_jobs_backfill(deadline: float | None, backfilled: bool) -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 8))
    low = job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    accelerators = tuple(f"n1-gpu{i}" for i in range(4))
    engine.adopt(low, [TaskPlacement(0, "n1", accelerators, 1000)], 0.0)
    engine.submit(job("big", accelerators=8, submit=1.0))
    # An engine before the restart preempted "low" for "big" at 10, with a grace until 310.
    # Without the deadline, the room of "big" is reserved from now.
    engine.mark_preempted("low", Cause.PRIORITY, "big", deadline)
    engine.submit(job("short", accelerators=4, project="other", wall_time_s=100.0))

    result = engine.schedule(20.0)

    assert preempts(result) == []
    assert reasons(result)["big"] == "priority"
    assert ("short" in placed(result)) is backfilled
    assert engine.jobs["low"].stop_deadline == deadline


@pytest.mark.parametrize("preemptor", ["cancelled", "running"])
def test_absent_preemptor_leaves_victims_unclaimed(preemptor: str) -> None:
    running = full_fleet_of_preemptible()
    engine = make_engine()
    for index in range(8):
        engine.add_node(node(f"n{index}", 2))
    for job_id in running.running():
        record = running.jobs[job_id]
        engine.adopt(record.spec, placed_tasks(running, job_id), 0.0)
    if preemptor == "running":
        # The preemptor started on room of its own while its victims still stopped.
        engine.apply(JobEnded("low15", JobOutcome.COMPLETED), 0.0)
        engine.submit(job("a", priority=PriorityClass.INTERACTIVE, submit=0.5))
        assert "a" in placed(engine.schedule(0.5))
    for victim in ("low00", "low01"):
        engine.mark_preempted(victim, Cause.PRIORITY, "a")
    engine.submit(job("b", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))

    result = engine.schedule(2.0)
    later = run_until_placed(engine, "b", 3.0, stopping=["low00", "low01"])

    assert preempts(result) == []
    assert reasons(result)["b"] == "priority"
    assert later == []
    assert "b" in engine.running()


def test_preemptors_keep_each_others_room() -> None:
    engine = full_fleet_of_preemptible()
    engine.submit(job("a", tasks=2, priority=PriorityClass.INTERACTIVE, project="pa", submit=1.0))
    engine.submit(job("b", tasks=2, priority=PriorityClass.INTERACTIVE, project="pb", submit=1.0))
    first = preempts(engine.schedule(1.0))
    # The victims of b stop first, while a is tried first in every pass.
    stopping = [d.job_id for d in first if d.cause_id == "b"]
    stopping += [d.job_id for d in first if d.cause_id == "a"]

    later = run_until_placed(engine, "a", 2.0, stopping=stopping)

    assert len(first) == 4
    assert later == []
    assert "a" in engine.running()
    assert "b" in engine.running()


def test_preemptor_claims_victims_left_unclaimed() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    for index in range(8):
        engine.add_node(node(f"n{index}", 2))
    engine.submit(job("standard", accelerators=2, wall_time_s=600.0))
    for index in range(14):
        engine.submit(
            job(
                f"low{index:02d}",
                priority=PriorityClass.PREEMPTIBLE,
                checkpointable=True,
                wall_time_s=600.0,
            )
        )
    engine.schedule(0.0)
    engine.submit(job("a", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))
    victims = [d.job_id for d in preempts(engine.schedule(1.0))]
    # The standard job ends while the victims of a still checkpoint, so a starts on its room.
    engine.apply(JobEnded("standard", JobOutcome.COMPLETED), 2.0)
    assert "a" in placed(engine.schedule(2.0))
    engine.submit(job("b", tasks=2, priority=PriorityClass.INTERACTIVE, submit=3.0))

    result = engine.schedule(3.0)
    later = run_until_placed(engine, "b", 4.0, stopping=victims)

    assert len(victims) == 2
    assert preempts(result) == []
    assert reasons(result)["b"] == "priority"
    assert later == []
    assert "b" in engine.running()


def test_claim_names_new_preemptor() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    for index in range(8):
        engine.add_node(node(f"n{index}", 2))
    for index in range(16):
        engine.submit(
            job(f"low{index:02d}", priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
        )
    engine.schedule(0.0)
    engine.submit(job("a", tasks=2, priority=PriorityClass.INTERACTIVE, submit=1.0))
    victims = sorted(d.job_id for d in preempts(engine.schedule(1.0)))
    # The owner of "a" cancels it while its victims still checkpoint.
    engine.remove("a")
    engine.submit(job("b", tasks=2, priority=PriorityClass.INTERACTIVE, submit=2.0))

    result = engine.schedule(2.0)
    claims = [d for d in result.decisions if isinstance(d, Claim)]

    assert len(victims) == 2
    assert preempts(result) == []
    assert claims == [Claim(victim, "b") for victim in victims]
    assert engine.jobs["b"].awaiting_victims == set(victims)


def test_claim_ignores_other_jobs_ending_sooner() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    for index in (1, 2, 3):
        engine.add_node(node(f"n{index}", 4))
    engine.submit(job("standard", accelerators=4, wall_time_s=100.0))
    for job_id in ("low1", "low2"):
        engine.submit(
            job(job_id, accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
        )
    engine.schedule(0.0)
    engine.submit(job("a", accelerators=4, priority=PriorityClass.INTERACTIVE, submit=1.0))
    [victim] = [d.job_id for d in preempts(engine.schedule(1.0))]
    engine.remove("a")
    engine.submit(job("b", accelerators=4, priority=PriorityClass.INTERACTIVE, submit=2.0))

    # "standard" ends before the victim's deadline, on a node where "b" claims nothing.
    result = engine.schedule(2.0)

    assert preempts(result) == []
    assert reasons(result)["b"] == "priority"
    assert engine.jobs["b"].awaiting_victims == {victim}


@pytest.mark.parametrize(("wall_time_s", "backfilled"), [(100.0, True), (1000.0, False)])
def test_backfill_before_victims_grace_ends(wall_time_s: float, backfilled: bool) -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 8))
    engine.submit(
        job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.schedule(0.0)
    engine.submit(job("big", accelerators=8, submit=1.0))
    [decision] = preempts(engine.schedule(10.0))
    # The victim may run until 310, so a job that ends before then does not delay "big".
    engine.submit(job("short", accelerators=4, project="other", wall_time_s=wall_time_s))

    result = engine.schedule(20.0)
    assert ("short" in placed(result)) is backfilled
    if backfilled:
        engine.apply(JobEnded("short", JobOutcome.COMPLETED), 120.0)
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), 310.0)
    later = engine.schedule(310.0)

    assert decision.deadline == 310.0
    assert "big" in placed(later)
    assert preempts(later) == []


def test_victim_stopping_early_beside_backfilled_job() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.submit(
        job("other", accelerators=8, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.submit(
        job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.schedule(0.0)
    engine.submit(job("big", accelerators=8, submit=1.0))
    assert [d.job_id for d in preempts(engine.schedule(10.0))] == ["low"]
    engine.submit(job("short", accelerators=4, project="pb", submit=15.0, wall_time_s=100.0))
    assert "short" in placed(engine.schedule(20.0))
    # "low" stops long before its deadline at 310, while "short" uses the rest of the room
    # until 120, before the reservation of "big" starts.
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), 50.0)

    early = engine.schedule(50.0)
    engine.apply(JobEnded("short", JobOutcome.COMPLETED), 120.0)
    later = engine.schedule(120.0)

    assert preempts(early) == []
    assert reasons(early)["big"] == "priority"
    assert "big" in placed(later)


def test_preemptor_room_yields_to_higher_class() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 4))
    engine.submit(
        job("low", accelerators=2, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.schedule(0.0)
    engine.submit(job("standard", accelerators=4, submit=1.0))
    [decision] = preempts(engine.schedule(1.0))
    engine.submit(
        job("interactive", accelerators=2, priority=PriorityClass.INTERACTIVE, submit=2.0)
    )

    result = engine.schedule(2.0)
    # The stop brings a full pass, where the standard job still does not fit and preempts no one.
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), 3.0)
    later = engine.schedule(3.0)

    assert decision.job_id == "low"
    assert "interactive" in placed(result)
    assert "standard" not in placed(later)
    assert preempts(later) == []


def test_full_pass_serves_higher_class_first() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 1))
    engine.submit(
        job("low", accelerators=2, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.submit(job("small", accelerators=1))
    engine.schedule(0.0)
    engine.submit(job("standard", accelerators=4, submit=1.0))
    engine.schedule(1.0)
    engine.submit(
        job("interactive", accelerators=2, priority=PriorityClass.INTERACTIVE, submit=2.0)
    )
    # An end frees room that is too small for the new job, and makes the pass a full one.
    engine.apply(JobEnded("small", JobOutcome.COMPLETED), 2.0)

    result = engine.schedule(2.0)

    assert nodes_of(placed(result)["interactive"]) == {"n1"}


def test_preemptor_without_room_loses_precedence() -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 4))
    engine.submit(
        job("low", accelerators=4, priority=PriorityClass.PREEMPTIBLE, checkpointable=True)
    )
    engine.schedule(0.0)
    engine.submit(job("standard", accelerators=4, submit=1.0))
    [decision] = preempts(engine.schedule(1.0))
    engine.submit(
        job("interactive", accelerators=2, priority=PriorityClass.INTERACTIVE, submit=2.0)
    )
    engine.schedule(2.0)
    # The interactive job takes half the room of the only victim, so the standard job lost it.
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), 3.0)
    stopped = engine.schedule(3.0)
    engine.submit(job("earlier", accelerators=4, submit=0.5))
    engine.schedule(4.0)
    engine.apply(JobEnded("interactive", JobOutcome.COMPLETED), 5.0)

    result = engine.schedule(5.0)

    assert decision.job_id == "low"
    assert "interactive" in placed(stopped)
    assert "earlier" in placed(result)
    assert reasons(result)["standard"] == "fair_share"


@pytest.mark.parametrize("block", ["budget", "limit"])
def test_held_back_preemptor_frees_room(block: str) -> None:
    engine = make_engine(preemption_grace_s=300.0)
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("own", accelerators=4, wall_time_s=600.0))
    engine.submit(
        job(
            "low",
            accelerators=4,
            project="other",
            priority=PriorityClass.PREEMPTIBLE,
            checkpointable=True,
        )
    )
    engine.schedule(0.0)
    engine.submit(job("standard", accelerators=4, payer="g1", submit=1.0))
    [decision] = preempts(engine.schedule(1.0))
    # A block that comes while the victim stops keeps the preemptor from starting.
    if block == "budget":
        engine.apply(BudgetChanged("proj", available=False, payer="g1"), 2.0)
    else:
        engine.set_limit(Limit(LimitScope.PROJECT, "proj", 4000))
    engine.apply(JobEnded("low", JobOutcome.PREEMPTED), 3.0)
    engine.submit(job("next", accelerators=4, project="third", submit=3.0))

    result = engine.schedule(3.0)

    assert decision.job_id == "low"
    assert reasons(result)["standard"] == block
    assert "next" in placed(result)
