"""Job transitions against the real (pure) engine, without servers."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from types import SimpleNamespace

import pytest

from acsp.v1 import agent_pb2, events_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.admission import HoldOutcome, RateCard
from scheduler.service.engine_adapter import BUSY_RETRY_S, EngineAdapter
from scheduler.service.fleet import AcceleratorView, FleetView, NodeView
from scheduler.service.jobbook import MAX_START_FAILURES, Effects, JobBook
from scheduler.service.loop import SchedulingLoop
from scheduler.service.model import Job, JobSpec, TaskPlacement, new_job_id
from scheduler.service.pledges import PledgeRecord, RecallRecord

NOW = 1_800_000_000.0


def make_book(gpus: int = 8) -> JobBook:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)))
    fleet = FleetView(heartbeat_timeout_s=15)
    node = NodeView(
        "prov",
        "reg",
        "n1",
        tuple(AcceleratorView(f"GPU-{i}", "A100-SXM4-80GB") for i in range(gpus)),
    )
    change = fleet.apply_inventory(node, NOW)
    adapter.add_node(change.node)
    return JobBook(adapter, epoch=7)


def make_job(tasks: int = 2, millis: int = 1000, project: str = "proj", grant: str = "g1") -> Job:
    spec = JobSpec(
        name="train",
        project_id=project,
        command=("true",),
        grant_id=grant,
        task_count=tasks,
        accelerator_millis_per_task=millis,
        wall_time_s=3600,
    )
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=NOW)


def place(book: JobBook, job: Job, now: float = NOW + 1) -> Effects:
    book.add([job], now)
    fx = Effects(now)
    book.apply_pass(book.engine.schedule(now), fx)
    return fx


def held(book: JobBook, job: Job) -> Effects:
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, job.attempt, HoldOutcome("held", "h1", "g1", Decimal(1)), fx)
    return fx


def report(book: JobBook, job: Job, index: int, state: str, code: int = 0) -> Effects:
    fx = Effects(NOW + 3)
    task_id = f"{job.job_id}/{book.jobs.get(job.job_id, job).attempt}/{index}"
    book.apply_task("prov.reg.n1", task_id, state, code, "", fx)
    return fx


def test_placed_job_waits_for_hold() -> None:
    book = make_book()
    job = make_job()
    fx = place(book, job)
    assert [j.job_id for j, _ in fx.admit] == [job.job_id]
    assert fx.admit[0][1] == "A100-SXM4-80GB"
    assert book.jobs[job.job_id].state == "pending"
    assert len(book.jobs[job.job_id].placement) == 2


def test_hold_sends_one_start_per_task() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = held(book, job)
    assert book.jobs[job.job_id].state == "starting"
    assert book.jobs[job.job_id].hold_id == "h1"
    assert sorted(r.task_index for r in fx.commands) == [0, 1]
    assert {r.kind for r in fx.commands} == {"start"}
    command = agent_pb2.AgentCommand.FromString(fx.commands[0].payload)
    assert command.fencing_token == 7
    assert command.command_id == f"{job.job_id}/1/{fx.commands[0].task_index}/start"


def test_job_runs_when_every_task_started() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    assert book.jobs[job.job_id].state == "starting"
    fx = report(book, job, 1, "started")
    assert book.jobs[job.job_id].state == "running"
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/started"]


def test_job_completes_and_emits_ended_event() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 1, "started")
    report(book, job, 0, "exited")
    fx = report(book, job, 1, "exited")
    ended = fx.changed[job.job_id][0]
    assert ended.state == "completed"
    assert ended.exit_code == 0
    assert job.job_id not in book.jobs
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/ended"]
    assert book.engine.engine.jobs == {}


def test_no_budget_returns_job_to_queue_with_reason() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, 1, HoldOutcome("no_budget", message="available 0"), fx)
    waiting = book.jobs[job.job_id]
    assert waiting.state == "pending"
    assert waiting.pending_reason == "budget"
    assert waiting.placement == ()
    assert fx.commands == []
    # Its accelerators are free again: another project's job can take all eight.
    other = make_job(tasks=8, project="other")
    fx2 = place(book, other, NOW + 3)
    assert [j.job_id for j, _ in fx2.admit] == [other.job_id]
    assert book.jobs[job.job_id].pending_reason == "budget"


def test_failed_hold_leaves_no_requeue_note() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, 1, HoldOutcome("unavailable", message="UNAVAILABLE: down"), fx)

    # The attempt never started, so later reasons do not say the job was requeued.
    assert book.engine.engine.jobs[job.job_id].requeue_message == ""


def test_budget_wait_keeps_amounts() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    refusal = "needs 2 PF-days for this hold; grant g1 has 0.5 PF-days available"
    fx = Effects(NOW + 2)
    book.apply_hold(job.job_id, 1, HoldOutcome("no_budget", message=refusal), fx)

    waiting = book.jobs[job.job_id]
    larger = make_job(tasks=4)
    place(book, larger, NOW + 3)
    held_back = book.jobs[larger.job_id]

    assert waiting.pending_reason == "budget"
    assert waiting.reason == (
        f"{refusal}; the scheduler asks for the hold again after 2027-01-15 08:00:32 UTC"
    )
    assert held_back.pending_reason == "budget"
    assert refusal in held_back.reason
    assert "budget block" not in held_back.reason


def test_unpaid_large_job_leaves_small_ones() -> None:
    book = make_book()
    large = make_job(tasks=4)
    place(book, large)
    fx = Effects(NOW + 2)
    book.apply_hold(large.job_id, 1, HoldOutcome("no_budget", message="available 1"), fx)

    small = make_job(tasks=1)
    fx2 = place(book, small, NOW + 3)

    assert [j.job_id for j, _ in fx2.admit] == [small.job_id]
    assert book.jobs[large.job_id].pending_reason == "budget"


def test_budget_block_spares_other_grant() -> None:
    book = make_book()
    small = make_job(tasks=1)
    place(book, small)
    refusal = "needs 1 PF-days for this hold; grant g1 has 0.5 PF-days available"
    book.apply_hold(small.job_id, 1, HoldOutcome("no_budget", message=refusal), Effects(NOW + 2))

    same_grant = make_job(tasks=4)
    other_grant = make_job(tasks=4, grant="g2")
    book.add([same_grant, other_grant], NOW + 3)
    fx = Effects(NOW + 3)
    book.apply_pass(book.engine.schedule(NOW + 3), fx)

    assert [j.job_id for j, _ in fx.admit] == [other_grant.job_id]
    held_back = book.jobs[same_grant.job_id]
    assert held_back.pending_reason == "budget"
    assert f"the hold of job {small.job_id}, which draws on the same grant" in held_back.reason
    assert book.engine.budget_key(small.job_id) == ("proj", "g1")


def test_sub_allocation_has_own_budget_block() -> None:
    book = make_book()
    on_grant = make_job(tasks=1)
    place(book, on_grant)
    book.apply_hold(on_grant.job_id, 1, HoldOutcome("no_budget", message="none"), Effects(NOW + 2))

    on_allocation = make_job(tasks=4)
    on_allocation = replace(on_allocation, spec=replace(on_allocation.spec, sub_allocation_id="s1"))
    fx = place(book, on_allocation, NOW + 3)

    assert [j.job_id for j, _ in fx.admit] == [on_allocation.job_id]
    assert book.engine.budget_key(on_allocation.job_id) == ("proj", "g1/s1")


def test_requeue_lets_grant_service_pick() -> None:
    book = make_book()
    # Named no grant: the grant service picked g1 for the first attempt, whose task was lost.
    requeued = make_job(tasks=1, grant="")
    place(book, requeued)
    held(book, requeued)
    assert book.jobs[requeued.job_id].spec.grant_id == "g1"
    report(book, requeued, 0, "lost")
    fx = place(book, requeued, NOW + 4)

    # g1 may have ended or run dry since, so the next hold names no grant again.
    assert [j.spec.grant_id for j, _ in fx.admit] == [""]
    assert book.jobs[requeued.job_id].spec.grant_id == ""
    assert not book.jobs[requeued.job_id].grant_picked
    assert book.engine.budget_key(requeued.job_id) == ("proj", "")


def test_unnamed_rejection_spares_grant_jobs() -> None:
    book = make_book()
    requeued = make_job(tasks=1, grant="")
    place(book, requeued)
    held(book, requeued)
    report(book, requeued, 0, "lost")
    place(book, requeued, NOW + 4)

    # No grant of the project could pay the second hold.
    book.apply_hold(requeued.job_id, 2, HoldOutcome("no_budget", message="none"), Effects(NOW + 5))
    no_grant = make_job(tasks=1, grant="")
    on_g1 = make_job(tasks=1)
    book.add([no_grant, on_g1], NOW + 6)
    fx = Effects(NOW + 6)
    book.apply_pass(book.engine.schedule(NOW + 6), fx)

    assert [j.job_id for j, _ in fx.admit] == [on_g1.job_id]
    assert book.jobs[no_grant.job_id].pending_reason == "budget"


def test_budget_retry_lifts_due_blocks() -> None:
    book = make_book()
    on_g1 = make_job(tasks=1)
    on_g2 = make_job(tasks=1, grant="g2")
    place(book, on_g1)
    place(book, on_g2)
    for job in (on_g1, on_g2):
        book.apply_hold(job.job_id, 1, HoldOutcome("no_budget", message="none"), Effects(NOW + 2))
    loop = SimpleNamespace(
        book=book,
        settings=SimpleNamespace(budget_retry_s=30.0),
        _no_budget={("proj", "g1"): NOW + 2, ("proj", "g2"): NOW + 20},
    )

    SchedulingLoop._retry_budgets(loop, NOW + 35)  # type: ignore[arg-type]

    assert list(loop._no_budget) == [("proj", "g2")]
    assert list(book.engine.engine.no_budget) == [("proj", "g2")]


def test_gang_task_start_failure_requeues_whole_job() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    fx = report(book, job, 1, "start_failed")
    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert requeued.pending_reason == "requeued"
    stops = [r for r in fx.commands if r.kind == "stop"]
    assert [(r.attempt, r.task_index) for r in stops] == [(1, 0)]
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/requeued"]


def test_start_failure_avoids_node_next_attempt() -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    held(book, job)
    report(book, job, 0, "start_failed")

    record = book.engine.engine.jobs[job.job_id]
    assert record.spec.avoid_nodes == frozenset({"prov.reg.n1"})
    assert book.jobs[job.job_id].state == "pending"
    assert book.jobs[job.job_id].avoid_nodes == ("prov.reg.n1",)


def test_reloaded_job_keeps_avoided_nodes() -> None:
    book = make_book()
    job = make_job(tasks=1)
    attempt_start(book, job, NOW + 1, "start_failed")
    stored = book.jobs[job.job_id]

    restarted = make_book()
    restarted.add([stored], NOW + 10)

    record = restarted.engine.engine.jobs[job.job_id]
    assert record.spec.avoid_nodes == frozenset({"prov.reg.n1"})


def test_lost_task_avoids_no_node() -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    held(book, job)
    report(book, job, 0, "lost")

    record = book.engine.engine.jobs[job.job_id]
    assert record.spec.avoid_nodes == frozenset()


def attempt_start(book: JobBook, job: Job, now: float, *states: str) -> Effects:
    """Place ``job``'s next attempt, hold its budget and report its one task in ``states``."""
    place(book, job, now)
    attempt = book.jobs[job.job_id].attempt
    book.apply_hold(job.job_id, attempt, HoldOutcome("held", "h1", "g1", Decimal(1)), Effects(now))
    fx = Effects(now)
    for state in states:
        book.apply_task("prov.reg.n1", f"{job.job_id}/{attempt}/0", state, 0, "", fx)
    return fx


def test_job_failing_to_start_fails_at_limit() -> None:
    book = make_book()
    job = make_job(tasks=1)
    for attempt in range(1, MAX_START_FAILURES):
        fx = attempt_start(book, job, NOW + attempt, "start_failed")
        assert book.jobs[job.job_id].state == "pending"
        assert book.jobs[job.job_id].attempt == attempt + 1
        # The count is written with the requeue.
        assert fx.changed[job.job_id][0].start_failures == attempt

    fx = attempt_start(book, job, NOW + MAX_START_FAILURES, "start_failed")

    ended = fx.changed[job.job_id][0]
    assert ended.state == "failed"
    assert ended.attempt == MAX_START_FAILURES
    assert ended.start_failures == MAX_START_FAILURES
    assert f"{MAX_START_FAILURES} attempts in a row failed to start" in ended.reason
    assert job.job_id not in book.jobs


def test_started_attempt_resets_start_failures() -> None:
    book = make_book()
    job = make_job(tasks=1)
    for attempt in range(1, MAX_START_FAILURES):
        attempt_start(book, job, NOW + attempt, "start_failed")
    fx = attempt_start(book, job, NOW + MAX_START_FAILURES, "started", "lost")
    assert fx.changed[job.job_id][0].start_failures == 0

    attempt_start(book, job, NOW + MAX_START_FAILURES + 1, "start_failed")
    assert book.jobs[job.job_id].state == "pending"
    assert book.jobs[job.job_id].start_failures == 1


def test_reloaded_job_keeps_start_failures() -> None:
    book = make_book()
    job = make_job(tasks=1)
    for attempt in range(1, MAX_START_FAILURES):
        attempt_start(book, job, NOW + attempt, "start_failed")
    stored = book.jobs[job.job_id]

    # A new leader reloads the job with its count, so one more failed start ends it.
    restarted = make_book()
    restarted.add([stored], NOW + 10)
    fx = attempt_start(restarted, stored, NOW + 11, "start_failed")

    ended = fx.changed[job.job_id][0]
    assert ended.state == "failed"
    assert ended.attempt == MAX_START_FAILURES


def test_cancel_running_job_stops_tasks_then_ends() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 1, "started")
    fx = Effects(NOW + 4)
    book.cancel(job.job_id, "owner asked", "rpc:CancelJob", fx)
    assert book.jobs[job.job_id].state == "stopping"
    assert sorted(r.task_index for r in fx.commands if r.kind == "stop") == [0, 1]
    report(book, job, 0, "stopped", -15)
    fx = report(book, job, 1, "stopped", -15)
    assert fx.changed[job.job_id][0].state == "cancelled"


def run_on_pledge(book: JobBook, job: Job) -> PledgeRecord:
    """Pledge both accelerators of ``book`` as recallable, and run ``job`` on them."""
    pledge = PledgeRecord("pl-1", "prov", "reg", "A100-SXM4-80GB", 0, 2, NOW - 100, NOW + 86400)
    book.engine.set_pledge(pledge)
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 1, "started")
    return pledge


def recall_pledge(book: JobBook, pledge: PledgeRecord) -> Effects:
    """Recall both accelerators of ``pledge`` and run a pass, which preempts their job."""
    book.engine.add_recall(RecallRecord("rc-1", "pl-1", 2, NOW + 3, None, "maintenance"), pledge)
    fx = Effects(NOW + 3)
    book.apply_pass(book.engine.schedule(NOW + 3), fx)
    return fx


def test_recall_preemption_events_name_the_recall() -> None:
    book = make_book(gpus=2)
    job = make_job(tasks=2)
    pledge = run_on_pledge(book, job)
    fx = recall_pledge(book, pledge)
    assert book.jobs[job.job_id].state == "stopping"
    assert fx.changed[job.job_id][1] == "recall:rc-1"
    report(book, job, 0, "stopped", -15)
    fx = report(book, job, 1, "stopped", -15)
    events = [events_pb2.JobEvent.FromString(e.payload) for e in fx.events]
    assert [e.event_id for e in events] == [f"{job.job_id}/1/preempted", f"{job.job_id}/1/requeued"]
    assert [e.cause.trigger for e in events] == ["recall:rc-1", "recall:rc-1"]
    assert fx.changed[job.job_id] == (book.jobs[job.job_id], "recall:rc-1")
    assert book.jobs[job.job_id].state == "pending"


def recalled(book: JobBook, job: Job) -> None:
    """Run ``job`` on both accelerators and recall them, so a preemption stops it."""
    recall_pledge(book, run_on_pledge(book, job))
    assert book.jobs[job.job_id].state == "stopping"


def test_cancel_during_preemption_ends_job() -> None:
    book = make_book(gpus=2)
    job = make_job(tasks=2)
    recalled(book, job)
    fx = Effects(NOW + 4)

    book.cancel(job.job_id, "owner asked", "rpc:CancelJob", fx)

    assert fx.changed[job.job_id][0].stop_outcome == "cancelled"
    report(book, job, 0, "stopped", -15)
    fx = report(book, job, 1, "stopped", -15)
    ended = fx.changed[job.job_id][0]
    assert ended.state == "cancelled"
    assert ended.stop_outcome == ""
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/ended"]


@pytest.mark.timeout(10)
def test_preemption_during_cancel_ends_job() -> None:
    book = make_book(gpus=2)
    job = make_job(tasks=2)
    pledge = run_on_pledge(book, job)
    book.cancel(job.job_id, "owner asked", "rpc:CancelJob", Effects(NOW + 3))

    # The recall preempts nothing: the engine has the job marked as stopping.
    fx = recall_pledge(book, pledge)

    assert job.job_id not in fx.changed
    assert fx.commands == []
    assert book.jobs[job.job_id].stop_outcome == "cancelled"
    report(book, job, 0, "stopped", -15)
    fx = report(book, job, 1, "stopped", -15)
    ended, cause = fx.changed[job.job_id]
    assert ended.state == "cancelled"
    assert ended.attempt == 1
    assert cause == "rpc:CancelJob"
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/ended"]


@pytest.mark.parametrize(
    ("stored", "state", "attempt"),
    [("requeue", "pending", 2), ("failed", "failed", 1), ("", "cancelled", 1)],
)
def test_reloaded_stop_keeps_its_outcome(stored: str, state: str, attempt: int) -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 1, "started")
    fx = Effects(NOW + 4)
    book.cancel(job.job_id, "stopping", "rpc:CancelJob", fx)
    stopping = replace(fx.changed[job.job_id][0], stop_outcome=stored)

    restarted = make_book()
    restarted.add([stopping], NOW + 5)
    report(restarted, job, 0, "stopped", -15)
    fx = report(restarted, job, 1, "stopped", -15)

    after, cause = fx.changed[job.job_id]
    assert after.state == state
    assert after.attempt == attempt
    assert cause == "reload"


def test_cancel_pending_job_ends_at_once() -> None:
    book = make_book(gpus=1)
    job = make_job(tasks=4)
    book.add([job], NOW)
    fx = Effects(NOW + 1)
    book.cancel(job.job_id, "not needed", "rpc:CancelJob", fx)
    assert fx.changed[job.job_id][0].state == "cancelled"
    assert fx.commands == []


def test_waiting_job_carries_engine_reason() -> None:
    book = make_book(gpus=1)
    job = make_job(tasks=4)
    fx = place(book, job)
    assert fx.admit == []
    waiting = book.jobs[job.job_id]
    assert waiting.pending_reason != ""
    assert waiting.reason != ""


def test_rate_card_prices_wall_time_exactly() -> None:
    job = make_job(tasks=2, millis=1000)
    rates = RateCard(1, {"A100-SXM4-80GB": Decimal("0.001")}, "test")
    assert rates.hold_amount(job, "A100-SXM4-80GB") == Decimal("7.2")


def test_start_deadline_requeues_silent_job() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    fx = Effects(NOW + 200)
    book.expire_starts(120.0, fx)
    requeued = book.jobs[job.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert "did not start" in requeued.reason
    assert sorted(r.task_index for r in fx.commands if r.kind == "stop") == [0, 1]
    assert requeued.avoid_nodes == ("prov.reg.n1",)


def test_hold_of_cancelled_admission_is_released() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = Effects(NOW + 2)
    book.cancel(job.job_id, "changed my mind", "rpc:CancelJob", fx)
    assert fx.changed[job.job_id][0].state == "stopping"
    assert fx.events == []
    late = Effects(NOW + 3)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h9", "g1", Decimal(1)), late)
    assert late.changed[job.job_id][0].state == "cancelled"
    assert late.commands == []
    assert [e.msg_id for e in late.events] == [f"{job.job_id}/1/ended"]
    event = events_pb2.JobEvent.FromString(late.events[0].payload)
    assert event.hold_id == "h9"


def test_hold_of_requeued_admission_is_released() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = Effects(NOW + 2)
    book.requeue(job.job_id, "node lost", "test", fx, release=True)
    assert book.jobs[job.job_id].attempt == 2
    late = Effects(NOW + 3)
    book.apply_hold(job.job_id, 1, HoldOutcome("held", "h7", "g1", Decimal(1)), late)
    assert late.commands == []
    assert [e.msg_id for e in late.events] == [f"{job.job_id}/1/requeued"]
    event = events_pb2.JobEvent.FromString(late.events[0].payload)
    assert event.hold_id == "h7"


def test_reloaded_stopping_job_without_tasks_ends() -> None:
    book = make_book()
    job = replace(make_job(), state="stopping", reason="owner cancelled")
    book.add([job], NOW)
    fx = Effects(NOW + 1)
    book.settle_reloaded(fx)
    assert fx.changed[job.job_id][0].state == "cancelled"
    assert job.job_id not in book.jobs


def test_reloaded_running_job_keeps_its_accelerators() -> None:
    book = make_book(gpus=2)
    placement = tuple(
        TaskPlacement(i, "prov", "reg", "n1", (f"GPU-{i}",), state="started") for i in range(2)
    )
    running = replace(make_job(), state="running", placement=placement)
    book.add([running], NOW)
    newcomer = make_job(tasks=1, project="other")
    fx = place(book, newcomer, NOW + 1)
    assert fx.admit == []
    assert book.jobs[newcomer.job_id].pending_reason != ""


def test_reloaded_job_on_missing_accelerator_is_requeued() -> None:
    book = make_book(gpus=2)
    placement = (TaskPlacement(0, "prov", "reg", "n1", ("GPU-gone",), state="started"),)
    running = replace(make_job(tasks=1), state="running", placement=placement)
    book.add([running], NOW)
    fx = Effects(NOW + 1)
    book.settle_reloaded(fx)
    requeued = book.jobs[running.job_id]
    assert requeued.state == "pending"
    assert requeued.attempt == 2
    assert [r.kind for r in fx.commands] == ["stop"]


def test_old_copy_stop_keeps_newer_fence() -> None:
    book = make_book(gpus=2)
    key = "prov.reg.n1"
    job = make_job(tasks=1)
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    # n1 goes silent: attempt 1's copy keeps its accelerator fenced and the job is requeued.
    book.engine.node_unknown(key, NOW + 10)
    book.apply_pass(book.engine.schedule(NOW + 10), Effects(NOW + 10))
    book.engine.node_back(key, NOW + 11)
    book.apply_node_running(key, frozenset({f"{job.job_id}/1/0"}), Effects(NOW + 11))
    book.apply_pass(book.engine.schedule(NOW + 12), Effects(NOW + 12))
    book.apply_hold(job.job_id, 2, HoldOutcome("held", "h2", "g1", Decimal(1)), Effects(NOW + 13))
    second = book.jobs[job.job_id].placement[0]
    report(book, job, 0, "started")
    # n1 goes silent again, with attempt 2's copy on the other accelerator.
    book.engine.node_unknown(key, NOW + 20)
    book.apply_pass(book.engine.schedule(NOW + 20), Effects(NOW + 20))
    book.engine.node_back(key, NOW + 21)

    book.apply_task(key, f"{job.job_id}/1/0", "stopped", -15, "", Effects(NOW + 22))

    node = book.engine.engine.fleet.node(key)
    assert node.used[node.spec.accelerator_ids.index(second.accelerators[0])] == 1000
    book.apply_task(key, f"{job.job_id}/2/0", "stopped", -15, "", Effects(NOW + 23))
    assert not node.fenced


def test_reloaded_cancel_during_hold_ends() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    fx = Effects(NOW + 2)
    book.cancel(job.job_id, "not needed", "rpc:CancelJob", fx)
    stored = fx.changed[job.job_id][0]
    assert stored.state == "stopping"

    restarted = make_book()
    restarted.add([stored], NOW + 5)
    fx = Effects(NOW + 6)
    restarted.settle_reloaded(fx)

    # The hold is asked for again under the same key, so a hold placed before is released.
    assert [(j.job_id, model) for j, model in fx.admit] == [(job.job_id, "A100-SXM4-80GB")]
    assert restarted.engine.engine.fleet.node("prov.reg.n1").free_whole == 8
    fx = Effects(NOW + 7)
    restarted.apply_hold(job.job_id, 1, HoldOutcome("held", "h1", "g1", Decimal(1)), fx)
    ended = fx.changed[job.job_id][0]
    assert ended.state == "cancelled"
    assert ended.reason == "not needed"
    assert job.job_id not in restarted.jobs
    (event,) = [events_pb2.JobEvent.FromString(e.payload) for e in fx.events]
    assert event.hold_id == "h1"


def test_gang_runs_when_a_short_task_exits_first() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 0, "exited")

    fx = report(book, job, 1, "started")

    running = book.jobs[job.job_id]
    assert running.state == "running"
    assert running.started_at == NOW + 3
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/started"]
    fx = report(book, job, 1, "exited")
    assert fx.changed[job.job_id][0].state == "completed"
    assert fx.changed[job.job_id][0].started_at == NOW + 3


def test_job_whose_last_task_ends_unstarted_still_starts() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    report(book, job, 0, "exited")

    fx = report(book, job, 1, "exited")

    ended = fx.changed[job.job_id][0]
    assert ended.state == "completed"
    assert ended.started_at == NOW + 3
    assert [e.msg_id for e in fx.events] == [f"{job.job_id}/1/started", f"{job.job_id}/1/ended"]


def add_node(book: JobBook, name: str) -> None:
    fleet = FleetView(heartbeat_timeout_s=15)
    accelerators = tuple(AcceleratorView(f"{name}-GPU-{i}", "A100-SXM4-80GB") for i in range(8))
    change = fleet.apply_inventory(NodeView("prov", "reg", name, accelerators), NOW)
    book.engine.add_node(change.node)


def test_jobs_by_node_lists_copies_still_stopping() -> None:
    book = make_book()
    job = make_job()
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    # Task 1 fails to start, so the job is requeued while task 0 still stops on n1.
    report(book, job, 1, "start_failed")
    assert book.jobs[job.job_id].placement == ()

    assert book.jobs_by_node() == {"prov.reg.n1": [job.job_id]}

    fx = Effects(NOW + 4)
    book.apply_task("prov.reg.n1", f"{job.job_id}/1/0", "stopped", 0, "", fx)
    assert book.jobs_by_node() == {}


def test_jobs_by_node_skips_ended_tasks() -> None:
    book = make_book()
    add_node(book, "n2")
    job = make_job(tasks=2, millis=8000)
    place(book, job)
    held(book, job)
    nodes = {t.task_index: t.node_key for t in book.jobs[job.job_id].placement}
    assert sorted(nodes.values()) == ["prov.reg.n1", "prov.reg.n2"]
    fx = Effects(NOW + 3)
    for index, node_key in nodes.items():
        book.apply_task(node_key, f"{job.job_id}/1/{index}", "started", 0, "", fx)
    book.apply_task(nodes[0], f"{job.job_id}/1/0", "exited", 0, "", fx)
    assert book.jobs[job.job_id].state == "running"

    # Nothing of the job runs on task 0's node any more.
    assert book.jobs_by_node() == {nodes[1]: [job.job_id]}


def test_start_failure_fences_started_task() -> None:
    book = make_book(gpus=2)
    job = make_job()
    place(book, job)
    held(book, job)
    failed = next(t for t in book.jobs[job.job_id].placement if t.task_index == 1)
    report(book, job, 0, "started")

    report(book, job, 1, "start_failed")

    # Task 0 may run until n1 confirms its stop, so only task 1's accelerator is free.
    node = book.engine.engine.fleet.node("prov.reg.n1")
    assert node.fenced == {f"{job.job_id}#1"}
    assert node.free_whole == 1
    other = make_job(tasks=1, project="other")
    fx = place(book, other, NOW + 4)
    assert [j.job_id for j, _ in fx.admit] == [other.job_id]
    assert fx.admit[0][0].placement[0].accelerators == failed.accelerators

    book.apply_task("prov.reg.n1", f"{job.job_id}/1/0", "stopped", 0, "", Effects(NOW + 5))

    assert not node.fenced
    assert node.free_whole == 1


def test_new_attempt_keeps_its_reason_once_started() -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    held(book, job)
    report(book, job, 0, "start_failed")
    requeued = book.jobs[job.job_id]

    place(book, requeued, NOW + 4)
    held(book, requeued)
    report(book, requeued, 0, "started")
    running = book.jobs[job.job_id]

    assert requeued.attempt == 2
    assert requeued.attempt_reason != ""
    assert running.state == "running"
    assert running.attempt_reason == requeued.attempt_reason
    assert job.attempt_reason == ""


@pytest.mark.parametrize(
    ("state", "message", "reason"),
    [
        ("exited", "exited", "task 0 exited with exit code 7"),
        ("timed_out", "timed_out", "task 0 timed out with exit code 7"),
        ("exited", "cannot run /bin/x", "task 0 exited with exit code 7: cannot run /bin/x"),
    ],
)
def test_failed_task_reason_skips_repeated_state(state: str, message: str, reason: str) -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    held(book, job)
    report(book, job, 0, "started")
    fx = Effects(NOW + 4)
    book.apply_task("prov.reg.n1", f"{job.job_id}/1/0", state, 7, message, fx)

    assert fx.changed[job.job_id][0].reason == reason


def test_busy_node_rejections_not_counted() -> None:
    book = make_book()
    job = make_job(tasks=1)
    for attempt in range(1, MAX_START_FAILURES + 2):
        place(book, job, NOW + attempt)
        book.apply_hold(
            job.job_id, attempt, HoldOutcome("held", "h1", "g1", Decimal(1)), Effects(NOW)
        )
        fx = Effects(NOW + attempt)
        task_id = f"{job.job_id}/{attempt}/0"
        book.apply_task(
            "prov.reg.n1", task_id, "start_failed", 0, "pool in use", fx, node_busy=True
        )
        requeued = fx.changed[job.job_id][0]
        assert requeued.state == "pending"
        assert requeued.start_failures == 0
        assert requeued.attempt == attempt + 1
        assert requeued.avoid_nodes == ("prov.reg.n1",)
        assert "node busy: pool in use" in requeued.attempt_reason
        assert book.engine.engine.fleet.by_id["prov.reg.n1"].busy
        # The mark ends after a while, or when a task on the node ends.
        book.engine.expire_busy(NOW + attempt + BUSY_RETRY_S)
