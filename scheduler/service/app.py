"""Wiring of the scheduler process: runtime service, grant channel, rate card, leadership."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from acsp import subjects
from acsp.v1 import grant_pb2_grpc, metering_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import service_bearer_token
from services.runtime.channel import service_channel
from services.runtime.server import Runtime, Service

from .admission import GrantAdmission, RateCard
from .api import SchedulerServicer
from .leadership import Leadership, TermConfig
from .loop import LoopSettings
from .projects import ProjectDirectory
from .settings import SchedulerSettings

logger = logging.getLogger(__name__)

STREAMS = (
    StreamConfig(
        name=subjects.AGENT_STREAM, subjects=list(subjects.AGENT_SUBJECTS), duplicate_window=120.0
    ),
    StreamConfig(
        name=subjects.COMMAND_STREAM,
        subjects=list(subjects.COMMAND_SUBJECTS),
        duplicate_window=120.0,
    ),
    # Declared exactly as the grant service declares it, so neither start changes it.
    StreamConfig(name=subjects.EVENT_STREAM, subjects=list(subjects.EVENT_SUBJECTS)),
)
BUCKETS = (KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1),)


def build_service(settings: SchedulerSettings) -> Service:
    holder: dict[str, Leadership] = {}

    def register(server: grpc.aio.Server, runtime: Runtime) -> Iterable[str]:
        leadership = _leadership(settings, runtime)
        holder["leadership"] = leadership
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(leadership, settings.output_timeout_s), server
        )
        return [scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name]

    async def start(runtime: Runtime) -> None:
        runtime.spawn(holder["leadership"].run(runtime.stopping), name="leadership")

    return Service(
        "scheduler",
        settings,
        register,
        schema="scheduler",
        migrations="scheduler.service.migrations",
        needs_nats=True,
        streams=STREAMS,
        buckets=BUCKETS,
        on_start=[start],
    )


def _leadership(settings: SchedulerSettings, runtime: Runtime) -> Leadership:
    assert runtime.db is not None
    assert runtime.js is not None
    assert runtime.nats is not None
    token = _service_token(settings)
    channel = service_channel(settings, settings.require("grant_url"), token=token)
    grants = grant_pb2_grpc.GrantServiceStub(channel)
    admission = GrantAdmission(grants)
    js = runtime.js

    async def rates() -> RateCard:
        return await load_rate_card(js)

    config = TermConfig(
        dsn=settings.require("database_url"),
        shard=settings.shard,
        heartbeat_timeout_s=settings.heartbeat_timeout_s,
        half_life_s=settings.half_life_s,
        loop=LoopSettings(
            tick_s=settings.tick_s,
            max_holds_in_flight=settings.max_holds_in_flight,
            budget_retry_s=settings.budget_retry_s,
            start_timeout_s=settings.start_timeout_s,
            outbox_retention_s=settings.outbox_retention_s,
            max_event_rejections=settings.max_event_rejections,
        ),
        poll_s=settings.leader_poll_s,
    )
    return Leadership(
        config,
        runtime.db.pool,
        js,
        admission,
        rates,
        ProjectDirectory(grants),
        nats=runtime.nats,
    )


def _service_token(settings: SchedulerSettings) -> str | None:
    """Return the bearer token for the grant service, or None when mutual TLS identifies us."""
    return service_bearer_token(
        "scheduler",
        settings.service_token_file,
        settings.tls_enabled,
        settings.data_dir,
        "the grant service will reject hold requests",
    )


async def load_rate_card(js: JetStreamContext) -> RateCard:
    """Read the current rate card from its KV bucket, else price from the catalog."""
    try:
        kv = await js.key_value(subjects.RATE_CARD_BUCKET)
        entry = await kv.get("current")
    except (BucketNotFoundError, KeyNotFoundError):
        logger.warning(
            "rate card not found in %s; holds are priced at catalog peak throughput",
            subjects.RATE_CARD_BUCKET,
        )
        return RateCard.from_catalog()
    card = RateCard.from_proto(metering_pb2.RateCard.FromString(entry.value or b""))
    logger.info("holds are priced with %s", card.source)
    return card
