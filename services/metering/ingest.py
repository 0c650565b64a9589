"""The usage ingest: durable JetStream pull consumers on the usage stream, writing to PostgreSQL.

Each worker fetches a batch of UsageReport messages, decodes and validates them, writes the
batch in one transaction (:func:`~services.metering.ingest_store.write_batch`) and acks every
message only after the commit. While a write runs, the worker sends in-progress acks for the
messages, so a slow write is not redelivered to another replica. If it is redelivered
anyway (a crash, a stall past the ack wait), the sample id's primary key makes the second write
change nothing. Any number of workers, in any number of replicas, share one durable consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError, ServiceUnavailableError

from acsp import subjects
from services.metering.ingest_store import (
    BatchResult,
    load_node_owners,
    register_nodes,
    write_batch,
)
from services.metering.samples import (
    InvalidSample,
    Rejection,
    UsageSample,
    decode_report,
    parse_subject,
    sample_dead_letter_key,
)
from services.metering.store_outage import StoreOutage
from services.runtime.db import Database
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

FETCH_RETRY_S = 0.1
"""Seconds before pulling again after JetStream returned status 503 for a pull."""


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the usage ingest."""

    stream: str = subjects.USAGE_STREAM
    subjects: tuple[str, ...] = subjects.USAGE_SUBJECTS
    durable: str = "metering-ingest"
    workers: int = 2
    """Fetch-and-write loops per process, each with its own database connection."""
    batch_messages: int = 200
    """UsageReport messages fetched per batch."""
    fetch_timeout_s: float = 0.5
    ack_wait_s: float = 30.0
    """Seconds JetStream waits for an ack before redelivering; in-progress acks extend it."""
    max_ack_pending: int = 20_000
    retry_delay_s: float = 2.0
    """Seconds before a batch whose write failed is delivered again."""
    stream_max_age_s: float = 14 * 86_400.0
    """How long the stream keeps messages, so that a long outage loses nothing."""
    period_seconds: int = 300
    """Length of a charging period; periods align to the Unix epoch."""
    max_sample_age_s: float | None = None
    """Seconds before its receipt that a sample may start; an older one is a dead letter. None
    accepts samples of any age, which is safe only while no coverage sweep runs (see
    :mod:`services.metering.coverage_sweep`)."""
    require_registered_nodes: bool = False
    """Reject samples from nodes no inventory registered; otherwise the first provider to
    report a node registers it (the subject's provider is authenticated by NATS)."""


@dataclass
class IngestCounters:
    """Counters since this process started."""

    messages: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    failed_batches: int = 0
    """Batches whose write failed and that JetStream delivers again."""
    last_commit_monotonic: float = field(default=0.0)


def usage_stream_config(config: IngestConfig) -> StreamConfig:
    return StreamConfig(
        name=config.stream,
        subjects=list(config.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=config.stream_max_age_s,
        # The duplicate window only saves work; exactly-once comes from the sample id's
        # primary key in PostgreSQL.
        duplicate_window=120.0,
    )


async def declare_usage_stream(js: JetStreamContext, config: IngestConfig) -> None:
    """Create the usage stream, or update it to this configuration when it exists."""
    stream = usage_stream_config(config)
    try:
        await js.stream_info(config.stream)
    except NotFoundError:
        await js.add_stream(stream)
        logger.info("created stream %s for %s", config.stream, config.subjects)
        return
    await js.update_stream(stream)


def consumer_config(config: IngestConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=config.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=config.ack_wait_s,
        # Never give up on a message: a sample that cannot be stored must stay in the stream.
        max_deliver=-1,
        max_ack_pending=config.max_ack_pending,
        max_waiting=512,
    )


async def ingested_through(js: JetStreamContext, config: IngestConfig) -> datetime:
    """Return a time before which every usage message published has been stored and acked.

    The stream keeps publish order and the consumer's ack floor is the last sequence below
    which everything is acked, so the publish time of the first message above the floor bounds
    what may still be in flight. With nothing pending, that is now.
    """
    now = datetime.now(UTC)
    info = await js.consumer_info(config.stream, config.durable)
    if not info.num_pending and not info.num_ack_pending:
        return now
    floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
    try:
        message = await js.get_msg(config.stream, seq=floor + 1)
    except NotFoundError:
        return now
    # The first message not yet acked was published at message.time; everything before it is
    # stored, so the watermark is just before that moment.
    if message.time is None:
        return now
    return message.time - timedelta(microseconds=1)


_STORE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, Unavailable)
"""Failures of a batch write that a later delivery can overcome."""


async def _nak_all(messages: Sequence[Msg], delay_s: float) -> None:
    for message in messages:
        await message.nak(delay=delay_s)


class UsageIngest:
    """Consumes the usage stream into PostgreSQL with any number of workers."""

    def __init__(
        self,
        js: JetStreamContext,
        db: Database,
        config: IngestConfig,
        known_models: Callable[[], Mapping[str, object]],
    ) -> None:
        self._js = js
        self._db = db
        self._config = config
        self._known_models = known_models
        self._node_owners: dict[str, str] = {}
        self.counters = IngestCounters()
        self._outage = StoreOutage(logger)

    @property
    def config(self) -> IngestConfig:
        return self._config

    async def run(self, stop: asyncio.Event) -> None:
        """Run the workers until ``stop`` is set; each finishes its batch before returning."""
        async with self._db.acquire() as conn:
            self._node_owners = await load_node_owners(conn)
        logger.info(
            "usage ingest starting: stream %s, consumer %s, %d workers",
            self._config.stream,
            self._config.durable,
            self._config.workers,
        )
        async with asyncio.TaskGroup() as group:
            for index in range(self._config.workers):
                group.create_task(self._work(index, stop), name=f"ingest-worker-{index}")
        logger.info("usage ingest stopped")

    async def _work(self, index: int, stop: asyncio.Event) -> None:
        subscription = await self._js.pull_subscribe(
            self._config.subjects[0] if len(self._config.subjects) == 1 else "",
            durable=self._config.durable,
            stream=self._config.stream,
            config=consumer_config(self._config),
        )
        try:
            while not stop.is_set():
                try:
                    messages = await subscription.fetch(
                        self._config.batch_messages, timeout=self._config.fetch_timeout_s
                    )
                # nats-py 2.16 raises the builtin TimeoutError when no message arrived in time;
                # nats.errors.TimeoutError is a subclass of it, so this catches both.
                except TimeoutError:
                    continue
                except ServiceUnavailableError as error:
                    # JetStream returns status 503 for a pull while it cannot serve the consumer for
                    # a moment (a consumer just created, a server restarting), so pull again.
                    logger.warning(
                        "pulling usage reports from consumer %s failed, pulling again: %s",
                        self._config.durable,
                        error,
                    )
                    await asyncio.sleep(FETCH_RETRY_S)
                    continue
                # nats-py 2.16 returns an empty list when a status message (408 request
                # timeout, say) ends the pull before any message arrived.
                if not messages:
                    continue
                try:
                    await self.process(messages)
                except (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    OSError,
                    Unavailable,
                ) as error:
                    # Nothing was acked, so the batch comes back; the sample ids make the retry
                    # safe even if the failure came after the commit.
                    self.counters.failed_batches += 1
                    self._outage.record_failure(len(messages), error)
                    await asyncio.shield(_nak_all(messages, self._config.retry_delay_s))
        finally:
            await asyncio.shield(subscription.unsubscribe())

    async def process(self, messages: Sequence[Msg]) -> BatchResult:
        """Validate, store and then ack one batch of messages; an empty one changes nothing."""
        if not messages:
            return BatchResult(inserted=0, duplicates=0, dead_lettered=0)
        now = datetime.now(UTC)
        samples, rejections = self._decode(messages, now)
        await self._resolve_unknown_nodes(samples)
        samples, forged = self._check_owners(samples)
        rejections.extend(forged)
        keep_alive = asyncio.create_task(self._keep_in_progress(messages))
        try:
            async with self._db.acquire() as conn:
                result = await write_batch(
                    conn,
                    samples,
                    rejections,
                    period_seconds=self._config.period_seconds,
                    received_at=now,
                )
        finally:
            keep_alive.cancel()
            await asyncio.wait([keep_alive])
        # The rows are committed: acking must finish even if this task is being cancelled,
        # or the batch is redelivered (harmless, but wasted work).
        await asyncio.shield(self._ack_all(messages))
        self._outage.record_success()
        self._count(len(messages), result)
        return result

    def _decode(
        self, messages: Sequence[Msg], now: datetime
    ) -> tuple[list[UsageSample], list[Rejection]]:
        samples: list[UsageSample] = []
        rejections: list[Rejection] = []
        models = self._known_models()
        for message in messages:
            sequence = message.metadata.sequence.stream
            try:
                origin = parse_subject(message.subject, sequence)
            except InvalidSample as error:
                key = f"seq:{sequence}"
                rejections.append(
                    Rejection(key, message.subject, sequence, None, str(error), message.data)
                )
                continue
            try:
                accepted, rejected = decode_report(
                    message.data,
                    origin,
                    known_models=models,
                    node_owner=self._node_owners.get,
                    now=now,
                    max_age_s=self._config.max_sample_age_s,
                )
            except Exception as error:
                # A report that the checks let through and the decoder then failed on would
                # come back after every redelivery and stop this worker each time.
                logger.exception("decoding usage report %d on %s failed", sequence, message.subject)
                reason = f"the report could not be decoded: {error!r}"
                key = f"seq:{sequence}"
                rejections.append(
                    Rejection(key, message.subject, sequence, None, reason, message.data)
                )
                continue
            samples.extend(accepted)
            rejections.extend(rejected)
        return samples, rejections

    async def _resolve_unknown_nodes(self, samples: Sequence[UsageSample]) -> None:
        unknown = {
            s.node: (s.node, s.provider, s.region)
            for s in samples
            if s.node not in self._node_owners
        }
        if not unknown:
            return
        async with self._db.acquire() as conn:
            if self._config.require_registered_nodes:
                self._node_owners = await load_node_owners(conn)
            else:
                owners = await register_nodes(conn, unknown.values(), "usage:first-report")
                self._node_owners.update(owners)

    def _check_owners(
        self, samples: Sequence[UsageSample]
    ) -> tuple[list[UsageSample], list[Rejection]]:
        valid: list[UsageSample] = []
        rejected: list[Rejection] = []
        for sample in samples:
            owner = self._node_owners.get(sample.node)
            if owner == sample.provider:
                valid.append(sample)
                continue
            if owner is None:
                reason = f"node {sample.node!r} is not registered with any provider"
            else:
                reason = (
                    f"node {sample.node!r} belongs to provider {owner!r}, not "
                    f"{sample.provider!r}: a provider may report usage only for its own nodes"
                )
            rejected.append(
                Rejection(
                    sample_dead_letter_key(sample.provider, sample.sample_id),
                    subjects.usage_subject(sample.provider, sample.region, sample.node),
                    sample.stream_sequence,
                    sample.sample_id,
                    reason,
                    None,
                )
            )
        return valid, rejected

    async def _keep_in_progress(self, messages: Sequence[Msg]) -> None:
        interval = max(self._config.ack_wait_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            for message in messages:
                await message.in_progress()

    async def _ack_all(self, messages: Sequence[Msg]) -> None:
        for message in messages:
            await message.ack()

    def _count(self, message_count: int, result: BatchResult) -> None:
        counters = self.counters
        counters.messages += message_count
        counters.inserted += result.inserted
        counters.duplicates += result.duplicates
        counters.dead_lettered += result.dead_lettered
        counters.batches += 1
        counters.last_commit_monotonic = asyncio.get_running_loop().time()
        logger.debug(
            "stored batch: %d messages, %d new samples, %d duplicates, %d dead letters",
            message_count,
            result.inserted,
            result.duplicates,
            result.dead_lettered,
        )
