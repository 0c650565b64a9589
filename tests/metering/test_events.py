"""Job, health, task and inventory facts from JetStream drive charging and refunds."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import cast

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from acsp import subjects
from acsp.v1 import agent_pb2, common_pb2, events_pb2, scheduler_pb2
from services.metering.events import FactConsumers, _unstorable, run_when_stream_exists
from services.metering.ingest import UsageIngest
from services.metering.ratecard import default_rate_card
from services.runtime.db import Database
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    assert_priced,
    count,
    drain,
    exact_price,
    make_charger,
    report,
    running_ingest,
    sample,
    wait_until,
)


def _job_event(kind: int, state: int, time: datetime, **extra: object) -> bytes:
    event = events_pb2.JobEvent(
        event_id=f"job-e/0/{kind}",
        kind=kind,  # type: ignore[arg-type]
        job_id="job-e",
        attempt=0,
        state=state,  # type: ignore[arg-type]
        hold_id="hold-e",
        grant_id="grant-1",
        project_id="proj-1",
        institution_id="inst-1",
        cause=common_pb2.Cause(trigger="engine"),
    )
    event.time.FromDatetime(time)
    event.start_time.FromDatetime(T0)
    for name, value in extra.items():
        getattr(event, name).FromDatetime(value)
    return event.SerializeToString()


async def _done(ingest: UsageIngest, expected: int) -> bool:
    return ingest.counters.messages >= expected


async def test_hardware_failure_events_lead_to_refund(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await js.add_stream(
        StreamConfig(name=subjects.EVENT_STREAM, subjects=list(subjects.EVENT_SUBJECTS))
    )
    await js.add_stream(
        StreamConfig(name=subjects.AGENT_STREAM, subjects=list(subjects.AGENT_SUBJECTS))
    )
    stop = asyncio.Event()
    facts = FactConsumers(db, ledger)
    tasks = [
        asyncio.create_task(run_when_stream_exists(js, consumer, stop, poll_s=0.1))
        for consumer in facts.consumers(js)
    ]
    try:
        items = [sample(f"node-1/{i}", "job-e", T0 + timedelta(minutes=i)) for i in range(60)]
        async with running_ingest(nats_url, db) as (usage_js, ingest):
            await usage_js.publish(subjects.usage_subject("prov-a", "r1", "node-1"), report(items))
            await wait_until(functools.partial(_done, ingest, 1))

        failed_at = T0 + timedelta(minutes=60)
        await js.publish(
            subjects.job_event_subject("admitted"),
            _job_event(events_pb2.JOB_EVENT_KIND_ADMITTED, scheduler_pb2.JOB_STATE_STARTING, T0),
        )
        health = agent_pb2.HealthEvent(
            event_id="node-1/boot-1/3",
            node=agent_pb2.NodeRef(provider_id="prov-a", region_id="r1", node_id="node-1"),
            accelerator_id="GPU-0",
            condition="xid",
            xid=79,
            severity=agent_pb2.HEALTH_SEVERITY_FATAL,
        )
        health.time.FromDatetime(failed_at - timedelta(seconds=5))
        await js.publish(
            subjects.health_subject("prov-a", "r1", "node-1"), health.SerializeToString()
        )
        task = agent_pb2.TaskEvent(
            event_id="node-1/boot-1/4",
            task_id="job-e/0/0",
            job_id="job-e",
            state=agent_pb2.TASK_STATE_FAILED_HARDWARE,
            health_event_id="node-1/boot-1/3",
        )
        await js.publish(subjects.task_subject("prov-a", "r1", "node-1"), task.SerializeToString())
        await js.publish(
            subjects.job_event_subject("ended"),
            _job_event(
                events_pb2.JOB_EVENT_KIND_ENDED,
                scheduler_pb2.JOB_STATE_FAILED,
                failed_at,
                last_checkpoint_time=T0 + timedelta(minutes=40),
            ),
        )

        async def recorded() -> bool:
            ended = await count(
                db,
                "SELECT count(*) FROM metering.jobs WHERE ended_at IS NOT NULL "
                "AND end_trigger = 'health:node-1/boot-1/3'",
            )
            events = await count(db, "SELECT count(*) FROM metering.health_events")
            return ended == 1 and events == 1

        await wait_until(recorded)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await client.close()

    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))
    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 3600), charges=60)
    assert ledger.released == {"release/job-e/0": "hold-e"}
    _, amount, reason = ledger.refunds["refund/job-e/0"]
    # Samples from the checkpoint at 0:40 to the fault at 0:59:55: twenty one-minute samples,
    # priced as they were charged, one five-minute period at a time.
    period = default_rate_card().charge("A100-SXM4-80GB", Decimal(5 * 60))
    assert amount == 4 * period
    assert "xid 79 on GPU-0" in reason


@asynccontextmanager
async def _fact_consumers(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> AsyncIterator[JetStreamContext]:
    """Declare the scheduler's streams and run metering's fact consumers on them."""
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await js.add_stream(
        StreamConfig(name=subjects.EVENT_STREAM, subjects=list(subjects.EVENT_SUBJECTS))
    )
    await js.add_stream(
        StreamConfig(name=subjects.AGENT_STREAM, subjects=list(subjects.AGENT_SUBJECTS))
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_when_stream_exists(js, consumer, stop, poll_s=0.1))
        for consumer in FactConsumers(db, ledger).consumers(js)
    ]
    try:
        yield js
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await client.close()


def _simulated_fault(time: datetime, task_ids: list[str]) -> bytes:
    """A fault from the fault trace as the simulated agent sends it today: no XID code, a
    fatal severity, and the tasks running on the accelerator."""
    health = agent_pb2.HealthEvent(
        event_id="node-1/boot-1/9",
        node=agent_pb2.NodeRef(provider_id="prov-a", region_id="r1", node_id="node-1"),
        accelerator_id="GPU-0",
        condition="fault_gpu_dbe_over_threshold",
        severity=agent_pb2.HEALTH_SEVERITY_FATAL,
        action=agent_pb2.HEALTH_ACTION_MARK_UNUSABLE,
        message="double-bit ECC > threshold",
        task_ids=task_ids,
    )
    health.time.FromDatetime(time)
    return health.SerializeToString()


async def test_redelivered_fatal_health_event_refunds_once(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # The messages agents and the scheduler send today. The agent names the running task in a
    # fatal health event and sends no FAILED_HARDWARE task event. The scheduler does not stop
    # the job, so it ends as completed. The event arrives twice, as after a JetStream
    # redelivery or an agent resending from its spool, and once more after the refund.
    items = [sample(f"node-1/{i}", "job-e", T0 + timedelta(minutes=i)) for i in range(60)]
    async with running_ingest(nats_url, db) as (usage_js, ingest):
        await usage_js.publish(subjects.usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    fault = _simulated_fault(T0 + timedelta(minutes=30, seconds=10), ["job-e/0/0"])
    health_subject = subjects.health_subject("prov-a", "r1", "node-1")

    async with _fact_consumers(nats_url, db, ledger) as js:
        await js.publish(
            subjects.job_event_subject("started"),
            _job_event(events_pb2.JOB_EVENT_KIND_STARTED, scheduler_pb2.JOB_STATE_RUNNING, T0),
        )
        await js.publish(health_subject, fault)
        await js.publish(health_subject, fault)
        await js.publish(
            subjects.job_event_subject("ended"),
            _job_event(
                events_pb2.JOB_EVENT_KIND_ENDED,
                scheduler_pb2.JOB_STATE_COMPLETED,
                T0 + timedelta(minutes=60),
                last_checkpoint_time=T0 + timedelta(minutes=20),
            ),
        )

        async def recorded() -> bool:
            ended = await count(
                db,
                "SELECT count(*) FROM metering.jobs WHERE ended_at IS NOT NULL "
                "AND end_trigger = 'health:node-1/boot-1/9'",
            )
            return ended == 1

        await wait_until(recorded)
        await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))
        again = await js.publish(health_subject, fault)

        async def redelivered_handled() -> bool:
            info = await js.consumer_info(subjects.AGENT_STREAM, "metering-health")
            return info.ack_floor.stream_seq >= again.seq

        await wait_until(redelivered_handled)
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=3))))

    assert_priced(ledger.total_charged(), exact_price("A100-SXM4-80GB", 3600), charges=60)
    assert ledger.refund_calls == ["refund/job-e/0"]
    hold, amount, reason = ledger.refunds["refund/job-e/0"]
    assert hold == "hold-e"
    # From the checkpoint at 0:20 to the fault at 0:30:10: ten one-minute samples and the
    # sample that started at 0:30, which the fault cut short.
    assert amount == default_rate_card().charge("A100-SXM4-80GB", Decimal(11 * 60))
    assert "fault_gpu_dbe_over_threshold on GPU-0" in reason
    assert await count(db, "SELECT count(*) FROM metering.refunds") == 1
    assert await count(db, "SELECT count(*) FROM metering.health_events") == 1


async def test_recall_in_preemption_reason_refunds(
    nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    # The scheduler's PREEMPTED event gives the stopped task as the trigger and names the
    # recall in its reason.
    items = [sample(f"node-1/{i}", "job-e", T0 + timedelta(minutes=i)) for i in range(10)]
    async with running_ingest(nats_url, db) as (usage_js, ingest):
        await usage_js.publish(subjects.usage_subject("prov-a", "r1", "node-1"), report(items))
        await wait_until(functools.partial(_done, ingest, 1))
    preempted = events_pb2.JobEvent.FromString(
        _job_event(
            events_pb2.JOB_EVENT_KIND_PREEMPTED,
            scheduler_pb2.JOB_STATE_STOPPING,
            T0 + timedelta(minutes=10),
        )
    )
    preempted.cause.trigger = "task:stopped"
    preempted.cause.reason = "preempted: provider_recall rc-9f8d3dcaea90470b"
    async with _fact_consumers(nats_url, db, ledger) as js:
        await js.publish(subjects.job_event_subject("preempted"), preempted.SerializeToString())

        async def recorded() -> bool:
            ended = await count(
                db,
                "SELECT count(*) FROM metering.jobs WHERE ended_at IS NOT NULL "
                "AND end_trigger = 'recall:rc-9f8d3dcaea90470b'",
            )
            return ended == 1

        await wait_until(recorded)
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=1))))

    _, amount, reason = ledger.refunds["refund/job-e/0"]
    assert amount == ledger.total_charged()
    assert_priced(amount, exact_price("A100-SXM4-80GB", 10 * 60), charges=10)
    assert "provider recall rc-9f8d3dcaea90470b" in reason


class _Message:
    """The part of a NATS message that the fact handlers read."""

    def __init__(self, data: bytes, subject: str = "") -> None:
        self.data = data
        self.subject = subject


def _message(data: bytes, subject: str = "") -> Msg:
    return cast(Msg, _Message(data, subject))


async def test_unstorable_events_skipped_alone(db: Database, ledger: LedgerDouble) -> None:
    """An event with a NUL character or an invalid time does not fail its batch."""
    facts = FactConsumers(db, ledger)

    def health(event_id: str, seconds: int, message: str = "") -> Msg:
        event = agent_pb2.HealthEvent(
            event_id=event_id,
            node=agent_pb2.NodeRef(provider_id="prov-a", region_id="r1", node_id="node-1"),
            accelerator_id="GPU-0",
            condition="xid",
            xid=79,
            severity=agent_pb2.HEALTH_SEVERITY_FATAL,
            message=message,
            task_ids=["job-h/0/0"],
        )
        event.time.FromDatetime(T0)
        event.time.seconds = seconds
        return _message(
            event.SerializeToString(), subjects.health_subject("prov-a", "r1", "node-1")
        )

    good = int(T0.timestamp())
    await facts.handle_health(
        [
            health("h-nul", good, message="bad\x00text"),
            health("h-time", 10**12),
            health("h-good", good),
        ]
    )
    task = agent_pb2.TaskEvent(
        task_id="job\x00-t/0/0",
        state=agent_pb2.TASK_STATE_FAILED_HARDWARE,
        health_event_id="h-good",
    )
    await facts.handle_tasks([_message(task.SerializeToString())])
    async with db.acquire() as conn:
        events = await conn.fetch("SELECT event_id FROM metering.health_events")
        triggers = await conn.fetch("SELECT job_id, end_trigger FROM metering.jobs")
    assert [r["event_id"] for r in events] == ["h-good"]
    assert [(r["job_id"], r["end_trigger"]) for r in triggers] == [("job-h", "health:h-good")]


async def test_health_origin_from_subject(db: Database, ledger: LedgerDouble) -> None:
    """A health event is stored under the node of its subject, and one naming another is not."""
    facts = FactConsumers(db, ledger)

    def health(event_id: str, node: agent_pb2.NodeRef) -> Msg:
        event = agent_pb2.HealthEvent(
            event_id=event_id,
            node=node,
            accelerator_id="GPU-0",
            condition="xid",
            xid=79,
            severity=agent_pb2.HEALTH_SEVERITY_FATAL,
        )
        event.time.FromDatetime(T0)
        return _message(
            event.SerializeToString(), subjects.health_subject("prov-b", "r2", "node-7")
        )

    await facts.handle_health(
        [
            health("h-forged", agent_pb2.NodeRef(provider_id="prov-a", node_id="node-1")),
            health("h-other-node", agent_pb2.NodeRef(provider_id="prov-b", node_id="node-1")),
            health("h-own", agent_pb2.NodeRef()),
        ]
    )
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_id, provider, region, node FROM metering.health_events"
        )
    assert [tuple(r) for r in rows] == [("h-own", "prov-b", "r2", "node-7")]


def test_nul_check_reads_received_bytes() -> None:
    clean = events_pb2.JobEvent(job_id="job-n", hold_id="hold-n")
    damaged = events_pb2.JobEvent(job_id="job-\x00", hold_id="hold-n")

    assert not _unstorable(clean, "job", clean.SerializeToString())
    assert _unstorable(damaged, "job", damaged.SerializeToString())
