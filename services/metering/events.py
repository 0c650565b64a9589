"""Facts metering consumes from other parties: job events, health and task events, inventory.

Each kind has its own durable pull consumer (runtime's PullConsumer acks a batch only after its
handler returned). Protobuf stops here: handlers convert to metering's own values and store
them. The streams belong to the scheduler and the grant service; a consumer waits until its
stream exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from acsp import subjects
from acsp.v1 import agent_pb2, events_pb2, scheduler_pb2
from services.metering.attempts import AttemptFacts, record_attempts, record_health_event
from services.metering.end_triggers import EndTrigger, record_end_triggers
from services.metering.ingest_store import register_nodes
from services.metering.ledger import GrantTerms, Ledger, LedgerRejected
from services.metering.ratecard import RatePolicy
from services.metering.refunds import HealthFact, is_fatal, recall_trigger, task_attempt
from services.runtime.db import Database
from services.runtime.nats import BatchHandler, PullConsumer
from services.runtime.nul_check import find_nul_field

logger = logging.getLogger(__name__)

_END_KINDS = {
    events_pb2.JOB_EVENT_KIND_ENDED,
    events_pb2.JOB_EVENT_KIND_REQUEUED,
    events_pb2.JOB_EVENT_KIND_PREEMPTED,
}
_END_REASONS = {
    scheduler_pb2.JOB_STATE_COMPLETED: "completed",
    scheduler_pb2.JOB_STATE_FAILED: "failed",
    scheduler_pb2.JOB_STATE_CANCELLED: "cancelled",
    scheduler_pb2.JOB_STATE_TIMED_OUT: "timed_out",
}


def _unstorable(event: Message, kind: str, data: bytes) -> bool:
    """Log and return True when an event has text that PostgreSQL cannot store.

    Such an event would fail its whole batch on every redelivery, so it is skipped instead.
    ``data`` is the event as received: a NUL in a string field is a zero byte there, so without
    one no field needs to be searched.
    """
    if b"\x00" not in data:
        return False
    field = find_nul_field(event)
    if field is None:
        return False
    logger.error("skipping a %s event whose %s contains a NUL character (U+0000)", kind, field)
    return True


def _health_origin(subject: str, event: agent_pb2.HealthEvent) -> tuple[str, str, str] | None:
    """Return the (provider, region, node) of a health event, taken from its subject.

    NATS lets a provider's agents publish only on their own provider's subjects, but nothing
    checks the payload's NodeRef. For an event whose NodeRef names another node or provider
    than its subject, this logs the mismatch and returns None, so the event is skipped.
    """
    parts = subject.split(".")
    if len(parts) != 5:
        logger.error("skipping health event %r on subject %r", event.event_id, subject)
        return None
    provider, region, node = parts[2], parts[3], parts[4]
    named = event.node
    if (named.provider_id and named.provider_id != provider) or (
        named.node_id and named.node_id != node
    ):
        logger.error(
            "skipping health event %r: it names node %r of provider %r but came on %s",
            event.event_id,
            named.node_id,
            named.provider_id,
            subject,
        )
        return None
    return provider, region, node


def _task_provider(subject: str, event: agent_pb2.TaskEvent) -> str | None:
    """Return the provider of a task event, taken from its subject, or None to skip the event.

    As for health events, an event whose NodeRef names another node or provider than its
    subject is logged and skipped.
    """
    parts = subject.split(".")
    if len(parts) != 5:
        logger.error("skipping task event %r on subject %r", event.event_id, subject)
        return None
    provider, node = parts[2], parts[4]
    named = event.node
    if (named.provider_id and named.provider_id != provider) or (
        named.node_id and named.node_id != node
    ):
        logger.error(
            "skipping task event %r: it names node %r of provider %r but came on %s",
            event.event_id,
            named.node_id,
            named.provider_id,
            subject,
        )
        return None
    return provider


def _time(value: Timestamp) -> datetime | None:
    """Convert a timestamp, or return None when unset. Raises ValueError outside years 1-9999."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


def _end_reason(event: events_pb2.JobEvent) -> str:
    if event.kind == events_pb2.JOB_EVENT_KIND_PREEMPTED:
        return "preempted"
    if event.kind == events_pb2.JOB_EVENT_KIND_REQUEUED:
        return _END_REASONS.get(event.state, "requeued")
    return _END_REASONS.get(event.state, "ended")


def _placement_providers(event: events_pb2.JobEvent) -> tuple[str, ...] | None:
    """Return the sorted providers of the event's placements, or None if it names none."""
    providers = {placement.provider_id for placement in event.placements if placement.provider_id}
    return tuple(sorted(providers)) if providers else None


class FactConsumers:
    """Stores job, health, task and inventory facts for charging and refunds."""

    def __init__(self, db: Database, ledger: Ledger, ledger_timeout_s: float = 5.0) -> None:
        self._db = db
        self._ledger = ledger
        self._ledger_timeout_s = ledger_timeout_s
        self._terms: dict[str, GrantTerms] = {}

    def consumers(self, js: JetStreamContext) -> list[PullConsumer]:
        def make(stream: str, durable: str, subject: str, handler: BatchHandler) -> PullConsumer:
            return PullConsumer(js, stream, durable, handler, subject_filter=subject)

        return [
            make(subjects.EVENT_STREAM, "metering-jobs", "acsp.events.job.>", self.handle_jobs),
            make(subjects.AGENT_STREAM, "metering-health", "acsp.health.>", self.handle_health),
            make(subjects.AGENT_STREAM, "metering-tasks", "acsp.task.>", self.handle_tasks),
            make(
                subjects.AGENT_STREAM,
                "metering-inventory",
                "acsp.inventory.>",
                self.handle_inventory,
            ),
        ]

    async def handle_jobs(self, messages: Sequence[Msg]) -> None:
        facts = []
        for message in messages:
            event = events_pb2.JobEvent()
            try:
                event.ParseFromString(message.data)
            except DecodeError as error:
                logger.error("skipping a job event that does not parse: %s", error)
                continue
            if not event.job_id or not event.hold_id or _unstorable(event, "job", message.data):
                continue
            try:
                facts.append(await self._attempt_facts(event))
            except ValueError as error:
                logger.error("skipping job event %r: %s", event.event_id, error)
        async with self._db.acquire() as conn, conn.transaction():
            await record_attempts(conn, facts)

    async def _attempt_facts(self, event: events_pb2.JobEvent) -> AttemptFacts:
        terms = self._terms.get(event.grant_id)
        if terms is None:
            # LedgerUnavailable (the grant service is down) propagates, so the batch is retried.
            try:
                terms = await self._ledger.grant_terms(event.grant_id, self._ledger_timeout_s)
            except LedgerRejected as error:
                logger.warning(
                    "cannot read the rate policy of grant %s for job %s, pricing at the "
                    "current rate card: %s",
                    event.grant_id,
                    event.job_id,
                    error,
                    extra={"grant_id": event.grant_id, "job_id": event.job_id},
                )
                terms = GrantTerms(RatePolicy.CURRENT, None)
            self._terms[event.grant_id] = terms
        ended = event.kind in _END_KINDS
        trigger = recall_trigger(event.cause.trigger, event.cause.reason) if ended else ""
        return AttemptFacts(
            job_id=event.job_id,
            attempt=event.attempt,
            hold_id=event.hold_id,
            grant_id=event.grant_id,
            project_id=event.project_id,
            institution_id=event.institution_id,
            rate_policy=terms.rate_policy,
            award_rate_card_version=terms.award_rate_card_version,
            started_at=_time(event.start_time),
            ended_at=_time(event.time) if ended else None,
            end_reason=_end_reason(event) if ended else "",
            end_trigger=trigger,
            last_checkpoint_at=_time(event.last_checkpoint_time),
            cause=f"event:{event.event_id}",
            providers=_placement_providers(event),
        )

    async def handle_health(self, messages: Sequence[Msg]) -> None:
        triggers: list[EndTrigger] = []
        async with self._db.acquire() as conn, conn.transaction():
            for message in messages:
                event = agent_pb2.HealthEvent()
                try:
                    event.ParseFromString(message.data)
                except DecodeError as error:
                    logger.error("skipping a health event that does not parse: %s", error)
                    continue
                if _unstorable(event, "health", message.data):
                    continue
                try:
                    time = _time(event.time)
                except ValueError as error:
                    logger.error("skipping health event %r: %s", event.event_id, error)
                    continue
                if event.cleared or not event.event_id or time is None:
                    continue
                origin = _health_origin(message.subject, event)
                if origin is None:
                    continue
                provider, region, node = origin
                fact = HealthFact(
                    event.event_id,
                    event.accelerator_id,
                    node,
                    event.condition,
                    event.xid,
                    event.severity == agent_pb2.HEALTH_SEVERITY_FATAL,
                    time,
                    provider,
                )
                await record_health_event(conn, fact, provider, region, event.message)
                if not is_fatal(fact.condition, fact.xid, fact.fatal_severity):
                    continue
                # The agent names the tasks that ran on the accelerator when it failed: the
                # event is what ended their work, whether or not the task was stopped for it.
                for task_id in event.task_ids:
                    attempt = task_attempt(task_id)
                    if attempt is not None:
                        trigger = f"health:{event.event_id}"
                        triggers.append(
                            EndTrigger(
                                attempt[0],
                                attempt[1],
                                trigger,
                                provider,
                                message.subject,
                                message.data,
                            )
                        )
            await record_end_triggers(conn, triggers)

    async def handle_tasks(self, messages: Sequence[Msg]) -> None:
        # Nearly every task event is a start or an ordinary end, which metering does not
        # store: a batch without a hardware failure costs no database round trip.
        triggers: list[EndTrigger] = []
        for message in messages:
            event = agent_pb2.TaskEvent()
            try:
                event.ParseFromString(message.data)
            except DecodeError as error:
                logger.error("skipping a task event that does not parse: %s", error)
                continue
            if event.state != agent_pb2.TASK_STATE_FAILED_HARDWARE or _unstorable(
                event, "task", message.data
            ):
                continue
            attempt = task_attempt(event.task_id)
            if attempt is None or not event.health_event_id:
                continue
            provider = _task_provider(message.subject, event)
            if provider is None:
                continue
            trigger = f"health:{event.health_event_id}"
            triggers.append(
                EndTrigger(attempt[0], attempt[1], trigger, provider, message.subject, message.data)
            )
        if not triggers:
            return
        async with self._db.acquire() as conn:
            await record_end_triggers(conn, triggers)

    async def handle_inventory(self, messages: Sequence[Msg]) -> None:
        nodes: dict[str, tuple[str, str, str]] = {}
        for message in messages:
            # The subject is authenticated by NATS; the payload's NodeRef is not.
            parts = message.subject.split(".")
            if len(parts) == 5:
                nodes[parts[4]] = (parts[4], parts[2], parts[3])
        if nodes:
            async with self._db.acquire() as conn:
                owners = await register_nodes(conn, nodes.values(), "event:inventory")
            for node, (_, provider, _) in nodes.items():
                if owners.get(node) != provider:
                    logger.warning(
                        "inventory for node %s from provider %s, but it is registered to %s",
                        node,
                        provider,
                        owners.get(node),
                    )


async def run_when_stream_exists(
    js: JetStreamContext, consumer: PullConsumer, stop: asyncio.Event, poll_s: float = 5.0
) -> None:
    """Wait for the consumer's stream (its owner declares it), then run the consumer."""
    logged = False
    while not stop.is_set():
        try:
            await js.stream_info(consumer.stream)
            break
        except NotFoundError:
            if not logged:
                logger.info("waiting for stream %s to be declared by its owner", consumer.stream)
                logged = True
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
    if not stop.is_set():
        await consumer.run(stop)
