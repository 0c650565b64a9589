"""A failed accelerator in the scheduler's pure core: health events, the job book, the adapter."""

from __future__ import annotations

from acsp.v1 import agent_pb2, events_pb2, scheduler_pb2
from scheduler.service.agent_feed import accelerator_health
from scheduler.service.engine_adapter import AcceleratorHealth
from scheduler.service.fleet import AcceleratorView, NodeView
from scheduler.service.jobbook import Effects, JobBook
from tests.scheduler.test_jobbook import NOW, held, make_book, make_job, place, report

NODE = "prov.reg.n1"


def health_event(
    accelerator: str, health: int, cleared: bool = False, event_id: str = "n1/b/5"
) -> agent_pb2.HealthEvent:
    return agent_pb2.HealthEvent(
        event_id=event_id,
        accelerator_id=accelerator,
        condition="xid",
        xid=79,
        message="GPU has fallen off the bus",
        health=health,  # type: ignore[arg-type]
        cleared=cleared,
    )


def running_book(tasks: int = 8) -> tuple[JobBook, str]:
    book = make_book()
    job = make_job(tasks=tasks)
    place(book, job)
    held(book, job)
    for index in range(tasks):
        report(book, job, index, "started")
    assert book.jobs[job.job_id].state == "running"
    return book, job.job_id


def fail(book: JobBook, accelerator: str, now: float = NOW + 10) -> Effects:
    fx = Effects(now)
    change = AcceleratorHealth(NODE, accelerator, True, "n1/b/5", "XID 79: fallen off the bus")
    if book.engine.set_accelerator_health(change, now):
        fx.accelerators.append(change)
    book.apply_pass(book.engine.schedule(now), fx)
    return fx


def test_fatal_event_converts_to_failure() -> None:
    change = accelerator_health(NODE, health_event("GPU-3", scheduler_pb2.HEALTH_STATE_FAILED))
    assert change == AcceleratorHealth(
        NODE, "GPU-3", True, "n1/b/5", "XID 79: GPU has fallen off the bus"
    )


def test_cleared_event_converts_to_recovery() -> None:
    event = health_event("GPU-3", scheduler_pb2.HEALTH_STATE_OK, cleared=True, event_id="n1/b/9")
    change = accelerator_health(NODE, event)
    assert change is not None
    assert change.failed is False
    assert change.event_id == "n1/b/9"


def test_no_change_events_convert_to_none() -> None:
    still_failed = health_event("GPU-3", scheduler_pb2.HEALTH_STATE_FAILED, cleared=True)
    degraded = health_event("GPU-3", scheduler_pb2.HEALTH_STATE_DEGRADED)
    node_wide = health_event("", scheduler_pb2.HEALTH_STATE_FAILED)
    assert accelerator_health(NODE, still_failed) is None
    assert accelerator_health(NODE, degraded) is None
    assert accelerator_health(NODE, node_wide) is None


def test_failure_requeues_job_as_failed_hardware() -> None:
    book, job_id = running_book()
    attempt = book.jobs[job_id].attempt

    fx = fail(book, "GPU-3")

    job = book.jobs[job_id]
    assert job.state == "pending"
    assert job.attempt == attempt + 1
    stops = [c for c in fx.commands if c.kind == "stop"]
    assert sorted(c.task_index for c in stops) == list(range(8))
    (event,) = [e for e in fx.events if e.subject.endswith("requeued")]
    message = events_pb2.JobEvent.FromString(event.payload)
    assert message.attempt == attempt
    assert message.cause.trigger == "health:n1/b/5"
    failed = [p.task_index for p in message.placements if p.state == "failed_hardware"]
    on_gpu3 = [
        p.task_index for p in message.placements if "GPU-3" in p.accelerators[0].accelerator_id
    ]
    assert failed == on_gpu3
    assert len(failed) == 1
    assert [c.accelerator_id for c in fx.accelerators] == ["GPU-3"]


def test_failure_reason_names_node_with_slashes() -> None:
    book, job_id = running_book()

    fail(book, "GPU-3")

    reason = book.jobs[job_id].reason
    assert "accelerator GPU-3 on node prov/reg/n1 failed" in reason
    assert "prov.reg." not in reason


def test_cancelled_job_is_not_requeued() -> None:
    book, job_id = running_book()
    cancel_fx = Effects(NOW + 5)
    book.cancel(job_id, "not needed", "rpc:cancel", cancel_fx)

    fx = fail(book, "GPU-3")

    assert job_id not in book.jobs
    ended, cause = fx.changed[job_id]
    assert ended.state == "cancelled"
    assert cause == "rpc:cancel"
    assert [e for e in fx.events if e.subject.endswith("requeued")] == []
    assert job_id not in book.engine.engine.jobs
    # The cancel sent the other tasks stop commands, and they show as stopping until confirmed.
    states = sorted(t.state for t in ended.placement)
    assert states == ["failed_hardware"] + ["stopping"] * 7
    index = next(t.task_index for t in ended.placement if t.state == "stopping")
    stopped = Effects(NOW + 20)
    book.apply_task(NODE, f"{job_id}/1/{index}", "stopped", 143, "", stopped)
    recorded, _ = stopped.changed[job_id]
    assert next(t.state for t in recorded.placement if t.task_index == index) == "stopped"


def test_requeued_job_avoids_failed_accelerator() -> None:
    book = make_book(gpus=16)
    job = make_job(tasks=8)
    place(book, job)
    held(book, job)
    for index in range(8):
        report(book, job, index, "started")
    first = {a for t in book.jobs[job.job_id].placement for a in t.accelerators}
    victim = sorted(first)[0]

    fail(book, victim)
    fx = Effects(NOW + 20)
    book.apply_pass(book.engine.schedule(NOW + 20), fx)

    replaced = {a for t in book.jobs[job.job_id].placement for a in t.accelerators}
    assert len(replaced) == 8
    assert victim not in replaced


def test_old_attempt_event_confirms_stop() -> None:
    book, job_id = running_book(tasks=1)
    old = book.jobs[job_id]
    fail(book, "GPU-0")

    fx = Effects(NOW + 30)
    book.apply_task(NODE, f"{job_id}/{old.attempt}/0", "failed_hardware", 0, "", fx)

    assert book.jobs[job_id].state == "pending"
    assert fx.commands == []


def test_later_inventory_does_not_recover() -> None:
    book = make_book()
    fail(book, "GPU-3")
    healthy = NodeView(
        "prov", "reg", "n1", tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB") for i in range(8))
    )

    assert book.engine.inventory_failures(healthy) == []
    assert book.engine.add_node(healthy)
    assert [f.accelerator_id for f in book.engine.failed_accelerators()] == ["GPU-3"]
    assert book.engine.engine.fleet.by_id[NODE].failed == {3: "n1/b/5"}


def test_inventory_reports_failed_accelerator() -> None:
    book = make_book()
    node = NodeView(
        "prov",
        "reg",
        "n1",
        tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB", healthy=i != 5) for i in range(8)),
        boot_id="b2",
    )
    (failure,) = book.engine.inventory_failures(node)
    assert failure.accelerator_id == "GPU-5"
    assert failure.event_id == "inventory:prov.reg.n1/b2/GPU-5"


def test_recovery_makes_accelerator_placeable() -> None:
    book = make_book(gpus=1)
    fail(book, "GPU-0", now=NOW)
    job = make_job(tasks=1)
    assert place(book, job).admit == []

    recovered = AcceleratorHealth(NODE, "GPU-0", False, "n1/b/9")
    assert book.engine.set_accelerator_health(recovered, NOW + 40)
    fx = Effects(NOW + 40)
    book.apply_pass(book.engine.schedule(NOW + 40), fx)

    assert [j.job_id for j, _ in fx.admit] == [job.job_id]
    assert book.engine.failed_accelerators() == []


def test_failure_applies_when_node_added() -> None:
    book = make_book()
    change = AcceleratorHealth("prov.reg.n2", "GPU-9", True, "n2/b/1")
    assert book.engine.set_accelerator_health(change, NOW)
    node = NodeView("prov", "reg", "n2", (AcceleratorView("GPU-9", "A100-SXM4-80GB"),))
    assert book.engine.add_node(node)
    assert book.engine.engine.fleet.by_id["prov.reg.n2"].failed == {0: "n2/b/1"}


def failed_gang_book() -> tuple[JobBook, str, int, int]:
    """Run a two-task gang on GPU-0 and GPU-1 of a two-accelerator node, queue a one-task job
    of another project behind it, and fail GPU-0.

    Returns the book, the gang's id, and the indexes of its tasks on GPU-0 and on GPU-1.
    """
    book = make_book(gpus=2)
    gang = make_job(tasks=2)
    job_id = gang.job_id
    place(book, gang)
    held(book, gang)
    for index in range(2):
        report(book, gang, index, "started")
    placement = book.jobs[job_id].placement
    on_failed = next(t.task_index for t in placement if t.accelerators == ("GPU-0",))
    survivor = next(t.task_index for t in placement if t.accelerators == ("GPU-1",))
    assert place(book, make_job(tasks=1, project="other"), NOW + 5).admit == []
    fx = fail(book, "GPU-0")
    assert book.jobs[job_id].state == "pending"
    assert fx.admit == []
    return book, job_id, on_failed, survivor


def admitted_at(book: JobBook, now: float) -> list[tuple[str, tuple[str, ...]]]:
    fx = Effects(now)
    book.apply_pass(book.engine.schedule(now), fx)
    return [(job.job_id, job.placement[0].accelerators) for job, _ in fx.admit]


def test_failure_keeps_gang_fenced_until_stops() -> None:
    book, job_id, on_failed, survivor = failed_gang_book()
    (other,) = [j for j in book.jobs if j != job_id]
    node = book.engine.engine.fleet.node(NODE)
    assert node.fenced == {f"{job_id}#1"}

    # The survivor stopped, but the copy on GPU-0 may still run on the same node.
    book.apply_task(NODE, f"{job_id}/1/{survivor}", "stopped", 143, "", Effects(NOW + 20))
    assert admitted_at(book, NOW + 21) == []

    book.apply_task(NODE, f"{job_id}/1/{on_failed}", "failed_hardware", 0, "", Effects(NOW + 22))

    assert not node.fenced
    assert admitted_at(book, NOW + 23) == [(other, ("GPU-1",))]


def test_restarted_book_keeps_failed_gang_fenced() -> None:
    book, job_id, on_failed, survivor = failed_gang_book()
    orphans, confirmed = book.take_orphan_writes()
    assert sorted(o.task_id for o in orphans) == sorted(
        f"{job_id}/1/{index}" for index in (on_failed, survivor)
    )
    assert confirmed == []

    # A new leader loads the failure, the open jobs and then the stored copies.
    restarted = make_book(gpus=2)
    failure = AcceleratorHealth(NODE, "GPU-0", True, "n1/b/5", "XID 79: fallen off the bus")
    assert restarted.engine.set_accelerator_health(failure, NOW + 30)
    restarted.add(list(book.jobs.values()), NOW + 30)
    restarted.adopt_orphans(orphans)
    (other,) = [j for j in restarted.jobs if j != job_id]

    assert admitted_at(restarted, NOW + 31) == []

    # The node's heartbeat lists neither copy any more, which confirms both stops.
    restarted.apply_node_running(NODE, frozenset(), Effects(NOW + 32))

    assert admitted_at(restarted, NOW + 33) == [(other, ("GPU-1",))]
    assert restarted.jobs[job_id].state == "pending"
