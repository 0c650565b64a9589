"""Backfill around the head job's reservation, and advance reservations."""

from __future__ import annotations

from scheduler.engine import Engine, Pledge, Reserve, ScheduleResult, Topology
from scheduler.engine.reasons import at
from tests.engine.helpers import job, make_engine, node, nodes_of, placed, reasons


def reserves(result: ScheduleResult) -> list[Reserve]:
    return [d for d in result.decisions if isinstance(d, Reserve)]


def fleet_with_running_job() -> Engine:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("long", accelerators=4, wall_time_s=1000.0))
    engine.submit(job("short", accelerators=2, wall_time_s=100.0, submit=1.0))
    engine.schedule(0.0)
    return engine


def test_head_gang_gets_reservation_and_blocks_long_backfill() -> None:
    engine = fleet_with_running_job()
    engine.submit(
        job(
            "gang",
            accelerators=4,
            tasks=2,
            topology=Topology.SAME_REGION,
            wall_time_s=500.0,
            submit=2.0,
        )
    )
    engine.submit(job("late-long", accelerators=2, wall_time_s=5000.0, submit=3.0))
    engine.submit(job("late-short", accelerators=2, wall_time_s=50.0, submit=4.0))

    result = engine.schedule(10.0)

    [reserve] = reserves(result)
    assert reserve.job_id == "gang"
    assert reserve.start_time == 1000.0
    assert set(reserve.node_ids) == {"n1", "n2"}
    assert reasons(result)["late-long"] == "reservation"
    assert "late-short" in placed(result)


def test_job_without_wall_time_never_backfills_reserved_nodes() -> None:
    engine = fleet_with_running_job()
    engine.submit(
        job(
            "gang",
            accelerators=4,
            tasks=2,
            topology=Topology.SAME_REGION,
            wall_time_s=500.0,
            submit=2.0,
        )
    )
    engine.submit(job("open-ended", accelerators=1, submit=3.0))

    result = engine.schedule(10.0)

    assert reasons(result)["open-ended"] == "reservation"


def test_reservation_start_follows_wall_times() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.submit(job("a", accelerators=4, wall_time_s=300.0))
    engine.submit(job("b", accelerators=4, wall_time_s=700.0, submit=1.0))
    engine.schedule(0.0)
    engine.submit(job("six", accelerators=6, submit=2.0))

    [reserve] = reserves(engine.schedule(5.0))

    assert reserve.start_time == 700.0


def test_advance_reservation_keeps_protected_room() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.add_node(node("n2", 8))
    engine.add_pledge(Pledge("pl", "p1", "r1", "A100-SXM4-80GB", 16, 0, 0.0, 1e9))
    engine.submit(
        job(
            "booked",
            accelerators=8,
            tasks=2,
            topology=Topology.SAME_REGION,
            start_at=1000.0,
            wall_time_s=3600.0,
        )
    )
    engine.submit(job("long", accelerators=8, wall_time_s=5000.0, submit=1.0))
    engine.submit(job("short", accelerators=8, wall_time_s=500.0, submit=2.0))

    result = engine.schedule(0.0)

    assert reasons(result)["booked"] == "reservation"
    assert reasons(result)["long"] == "reservation"
    assert "short" in placed(result)
    [reserve] = reserves(result)
    assert reserve.start_time == 1000.0

    result = engine.schedule(1000.0)
    assert "booked" not in placed(result)


def test_advance_reservation_starts_when_due() -> None:
    engine = make_engine()
    engine.add_node(node("n1", 8))
    engine.submit(job("booked", accelerators=8, start_at=100.0, wall_time_s=60.0))
    assert placed(engine.schedule(0.0)) == {}

    result = engine.schedule(100.0)

    assert "booked" in placed(result)
    assert engine.jobs["booked"].protected


def test_message_times_read_as_dates_or_seconds() -> None:
    assert at(3600.4) == "t=3600 s"
    assert at(1_796_436_818.5) == "2026-12-05 02:13:38 UTC"


def running_on_two_nodes(first_ends: float, second_ends: float) -> Engine:
    engine = make_engine()
    engine.add_node(node("n1", 4))
    engine.add_node(node("n2", 4))
    engine.submit(job("on-n1", accelerators=4, wall_time_s=first_ends))
    engine.submit(job("on-n2", accelerators=4, wall_time_s=second_ends, submit=1.0))
    result = engine.schedule(0.0)
    assert {job_id: nodes_of(place) for job_id, place in placed(result).items()} == {
        "on-n1": {"n1"},
        "on-n2": {"n2"},
    }
    return engine


def test_reservation_off_avoided_node_when_no_later() -> None:
    engine = running_on_two_nodes(1000.0, 1000.0)
    engine.submit(
        job("whole", accelerators=4, wall_time_s=100.0, submit=2.0, avoid_nodes=frozenset({"n1"}))
    )

    [reserve] = reserves(engine.schedule(5.0))

    assert (reserve.start_time, reserve.node_ids) == (1000.0, ("n2",))


def test_reservation_keeps_avoided_node_when_sooner() -> None:
    engine = running_on_two_nodes(1000.0, 2000.0)
    engine.submit(
        job("whole", accelerators=4, wall_time_s=100.0, submit=2.0, avoid_nodes=frozenset({"n1"}))
    )

    [reserve] = reserves(engine.schedule(5.0))

    assert (reserve.start_time, reserve.node_ids) == (1000.0, ("n1",))
