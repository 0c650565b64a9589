"""The choice of rendezvous ports per node, alone and in the job book, without servers."""

from __future__ import annotations

import logging
from dataclasses import replace
from decimal import Decimal

import pytest

from acsp.rendezvous import rendezvous_port
from acsp.v1 import agent_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.admission import HoldOutcome
from scheduler.service.engine_adapter import EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.jobbook import Effects, JobBook
from scheduler.service.model import Job
from scheduler.service.rendezvous import NodeEndpoint, RendezvousPorts
from tests.scheduler.test_jobbook import NOW, make_job

NODE = "prov.reg.n1"
RANGE = (40000, 40003)


def same_hash_ids(count: int, ports: tuple[int, int] = RANGE) -> list[str]:
    """Return ``count`` job ids whose first attempts hash to one port of ``ports``."""
    by_port: dict[int, list[str]] = {}
    for number in range(10_000):
        job_id = f"job-{number}"
        found = by_port.setdefault(rendezvous_port(job_id, 1, *ports), [])
        found.append(job_id)
        if len(found) == count:
            return found
    raise AssertionError("no colliding job ids found")


def reserve(ports: RendezvousPorts, job_id: str, node_key: str = NODE) -> int:
    return ports.reserve(node_key, f"{job_id}/1/0", job_id, 1, RANGE)


def test_first_reservation_gets_hashed_port() -> None:
    ports = RendezvousPorts()
    assert reserve(ports, "job-1") == rendezvous_port("job-1", 1, *RANGE)


def test_same_hash_gets_next_free_port() -> None:
    ports = RendezvousPorts()
    first_id, second_id, third_id = same_hash_ids(3)
    first = reserve(ports, first_id)

    second = reserve(ports, second_id)
    third = reserve(ports, third_id)

    low, high = RANGE
    assert second == (low if first == high else first + 1)
    assert len({first, second, third}) == 3
    assert all(low <= port <= high for port in (first, second, third))
    assert ports.reserved_for(NODE, second) == f"{second_id}/1/0"


def test_probe_wraps_to_range_start() -> None:
    ports = RendezvousPorts()
    job_id = next(
        f"job-{n}" for n in range(1000) if rendezvous_port(f"job-{n}", 1, *RANGE) == RANGE[1]
    )
    ports.claim(NODE, "other/1/0", RANGE[1])

    assert reserve(ports, job_id) == RANGE[0]


def test_other_node_may_use_same_port() -> None:
    ports = RendezvousPorts()
    first_id, second_id = same_hash_ids(2)

    assert reserve(ports, first_id, "prov.reg.n1") == reserve(ports, second_id, "prov.reg.n2")


def test_released_port_is_reused() -> None:
    ports = RendezvousPorts()
    first_id, second_id = same_hash_ids(2)
    first = reserve(ports, first_id)

    ports.release(NODE, f"{first_id}/1/0")

    assert ports.reserved_for(NODE, first) is None
    assert reserve(ports, second_id) == first


def test_repeated_reservation_keeps_port() -> None:
    ports = RendezvousPorts()
    first_id, second_id = same_hash_ids(2)
    first = reserve(ports, first_id)
    reserve(ports, second_id)

    assert reserve(ports, first_id) == first


def test_full_range_shares_hashed_port(caplog: pytest.LogCaptureFixture) -> None:
    ports = RendezvousPorts()
    for number in range(RANGE[1] - RANGE[0] + 1):
        reserve(ports, f"held-{number}")
    caplog.set_level(logging.WARNING, logger="scheduler.service.rendezvous")

    shared = [reserve(ports, f"late-{number}") for number in range(3)]

    assert shared == [rendezvous_port(f"late-{number}", 1, *RANGE) for number in range(3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "every rendezvous port 40000-40003 of node prov.reg.n1 is reserved" in warnings[0]
    assert "ACSP_AGENT_RENDEZVOUS_PORTS" in warnings[0]
    # A shared port is not reserved for the late copy, so its release changes nothing.
    first_copy = ports.reserved_for(NODE, shared[0])
    ports.release(NODE, "late-0/1/0")
    assert ports.reserved_for(NODE, shared[0]) == first_copy


def test_shared_port_outlives_first_release() -> None:
    ports = RendezvousPorts()
    for number in range(RANGE[1] - RANGE[0] + 1):
        reserve(ports, f"held-{number}")
    shared = reserve(ports, "late-0")
    holder = ports.reserved_for(NODE, shared)
    assert holder is not None

    ports.release(NODE, holder)

    # The late copy's task 0 may still listen on the port, so no other job gets it.
    assert ports.reserved_for(NODE, shared) == "late-0/1/0"
    assert ports.port_of(NODE, "late-0/1/0") == shared
    ports.release(NODE, "late-0/1/0")
    assert ports.reserved_for(NODE, shared) is None
    assert reserve(ports, "next") == shared


def test_claim_keeps_first_reservation() -> None:
    ports = RendezvousPorts()
    ports.claim(NODE, "a/1/0", 40001)
    ports.claim(NODE, "b/1/0", 40001)

    assert ports.reserved_for(NODE, 40001) == "a/1/0"
    ports.release(NODE, "b/1/0")
    assert ports.reserved_for(NODE, 40001) == "a/1/0"


def test_claimed_shared_port_outlives_first_release() -> None:
    ports = RendezvousPorts()
    ports.claim(NODE, "a/1/0", 40001)
    ports.claim(NODE, "b/1/0", 40001)

    ports.release(NODE, "a/1/0")

    assert ports.reserved_for(NODE, 40001) == "b/1/0"
    assert ports.port_of(NODE, "b/1/0") == 40001


# The job book: one node of 8 accelerators whose range has four ports.


def make_book() -> JobBook:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    accelerators = tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB") for i in range(8))
    change = fleet.apply_inventory(NodeView("prov", "reg", "n1", accelerators), NOW)
    adapter.add_node(change.node)
    return JobBook(adapter, epoch=7, endpoint_of=lambda key: NodeEndpoint("10.0.0.1", RANGE))


def start(book: JobBook, job: Job) -> Effects:
    """Place ``job``, grant its hold and return the effects that carry its start commands."""
    book.add([job], NOW + 1)
    book.apply_pass(book.engine.schedule(NOW + 1), Effects(NOW + 1))
    fx = Effects(NOW + 2)
    outcome = HoldOutcome("held", "h1", "g1", Decimal(1))
    book.apply_hold(job.job_id, book.jobs[job.job_id].attempt, outcome, fx)
    return fx


def report(book: JobBook, job: Job, index: int, state: str) -> None:
    task_id = f"{job.job_id}/{book.jobs[job.job_id].attempt}/{index}"
    book.apply_task(NODE, task_id, state, 0, "", Effects(NOW + 3))


def sent_ports(fx: Effects) -> set[int]:
    return {agent_pb2.AgentCommand.FromString(r.payload).rendezvous_port for r in fx.commands}


def test_jobs_on_one_node_get_distinct_ports() -> None:
    book = make_book()
    # Their ids hash to one port, so each job after the first probes past the reserved ports.
    ids = same_hash_ids(4)
    jobs = [replace(make_job(tasks=n), job_id=i) for n, i in zip((1, 2, 1, 2), ids, strict=True)]

    sent = [sent_ports(start(book, job)) for job in jobs]

    stored = [book.jobs[job.job_id].rendezvous_port for job in jobs]
    assert sorted(stored) == list(range(RANGE[0], RANGE[1] + 1))
    assert sent == [{port} for port in stored]


def test_ended_job_frees_port() -> None:
    book = make_book()
    job = make_job(tasks=1)
    start(book, job)
    port = book.jobs[job.job_id].rendezvous_port
    report(book, job, 0, "started")

    report(book, job, 0, "exited")

    assert job.job_id not in book.jobs
    assert book.ports.reserved_for(NODE, port) is None


def test_requeued_job_frees_port_once_task_zero_stops() -> None:
    book = make_book()
    job = make_job(tasks=2)
    start(book, job)
    port = book.jobs[job.job_id].rendezvous_port
    report(book, job, 0, "started")

    # Task 1 fails to start, so the job is requeued while its task 0 still runs.
    report(book, job, 1, "start_failed")

    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.rendezvous_port == 0
    assert book.ports.reserved_for(NODE, port) == f"{job.job_id}/1/0"
    book.apply_task(NODE, f"{job.job_id}/1/0", "stopped", 0, "", Effects(NOW + 4))
    assert book.ports.reserved_for(NODE, port) is None


def test_restarted_book_keeps_orphan_port() -> None:
    book = make_book()
    job = make_job(tasks=2)
    start(book, job)
    port = book.jobs[job.job_id].rendezvous_port
    report(book, job, 0, "started")
    # Task 1 fails to start, so the job is requeued while its task 0 still runs.
    report(book, job, 1, "start_failed")
    orphans, _ = book.take_orphan_writes()

    restarted = make_book()
    restarted.add([book.jobs[job.job_id]], NOW + 10)
    restarted.adopt_orphans(orphans)
    same_start = next(
        replace(make_job(tasks=1), job_id=f"job-{n}")
        for n in range(10_000)
        if rendezvous_port(f"job-{n}", 1, *RANGE) == port
    )
    start(restarted, same_start)

    assert [o.rendezvous_port for o in orphans] == [port]
    assert restarted.ports.reserved_for(NODE, port) == f"{job.job_id}/1/0"
    assert restarted.jobs[same_start.job_id].rendezvous_port != port


def test_restarted_book_keeps_stored_ports() -> None:
    book = make_book()
    first = make_job(tasks=2)
    start(book, first)
    stored = book.jobs[first.job_id]

    restarted = make_book()
    restarted.add([stored], NOW + 10)
    later = make_job(tasks=1)
    start(restarted, later)

    assert restarted.ports.reserved_for(NODE, stored.rendezvous_port) == f"{first.job_id}/1/0"
    assert restarted.jobs[later.job_id].rendezvous_port != stored.rendezvous_port


def test_job_without_stored_port_claims_hash() -> None:
    book = make_book()
    job = make_job(tasks=1)
    start(book, job)
    old = replace(book.jobs[job.job_id], rendezvous_port=0)

    restarted = make_book()
    restarted.add([old], NOW + 10)

    hashed = rendezvous_port(job.job_id, 1, *RANGE)
    assert restarted.ports.reserved_for(NODE, hashed) == f"{job.job_id}/1/0"
