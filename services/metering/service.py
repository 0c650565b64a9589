"""Assemble the metering service on the shared runtime: servicer, ingest, charger, consumers."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

import grpc
from nats.js.api import KeyValueConfig

from acsp import subjects
from acsp.v1 import grant_pb2_grpc, metering_pb2, metering_pb2_grpc
from services.metering.charger import Charger
from services.metering.coverage_sweep import run_coverage_sweep
from services.metering.events import FactConsumers, run_when_stream_exists
from services.metering.ingest import UsageIngest, ingested_through, usage_stream_config
from services.metering.ledger import GrpcLedger
from services.metering.pledges import PledgeSync
from services.metering.ratecard_store import RateCardCache
from services.metering.scheduler_replicas import SchedulerReplicas, replica_channel_factory
from services.metering.servicer import MeteringApp, MeteringServicer
from services.metering.settings import MeteringSettings
from services.metering.waste_events import run_waste_publisher
from services.metering.waste_scan import run_waste_scan
from services.runtime.auth import service_bearer_token
from services.runtime.channel import service_channel
from services.runtime.grant_directory import ProjectDirectory
from services.runtime.jetstream import Publisher
from services.runtime.server import Runtime, Service

logger = logging.getLogger(__name__)

SCHEMA = "metering"


def build_service(settings: MeteringSettings) -> Service:
    """Return the metering service, ready to :meth:`~services.runtime.server.Service.run`."""
    app = MeteringApp(settings)
    ingest_config = settings.ingest_config()

    def register(server: grpc.aio.Server, runtime: Runtime) -> Iterable[str]:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(MeteringServicer(app), server)
        return [metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name]

    async def start(runtime: Runtime) -> None:
        assert runtime.db is not None and runtime.js is not None
        app.db = runtime.db
        app.js = runtime.js
        cache = RateCardCache(runtime.db)
        await cache.load()
        app.cache = cache
        channel = service_channel(settings, settings.grant_address, token=_service_token(settings))
        ledger = GrpcLedger(channel)
        app.projects = ProjectDirectory(grant_pb2_grpc.GrantServiceStub(channel))
        ingest = UsageIngest(
            runtime.js, runtime.db, ingest_config, lambda: cache.history().current.rates
        )
        app.ingest = ingest
        js = runtime.js

        async def ingest_position() -> datetime:
            return await ingested_through(js, ingest_config)

        charger = Charger(
            runtime.db,
            ledger,
            cache.history,
            settings.charger_config(),
            ingested_through=ingest_position,
        )
        kv = await runtime.js.key_value(subjects.RATE_CARD_BUCKET)
        runtime.spawn(cache.run(runtime.stopping, kv), name="rate-card")
        runtime.spawn(ingest.run(runtime.stopping), name="usage-ingest")
        runtime.spawn(charger.run(runtime.stopping), name="charger")
        runtime.spawn(
            run_waste_publisher(
                runtime.db,
                Publisher(runtime.js),
                runtime.stopping,
                max_rejections=settings.max_event_rejections,
            ),
            name="waste-flags",
        )
        runtime.spawn(
            run_waste_scan(runtime.db, settings.waste_scan_config(), runtime.stopping),
            name="waste-scan",
        )
        runtime.spawn(
            run_coverage_sweep(runtime.db, settings.coverage_sweep_config(), runtime.stopping),
            name="coverage-sweep",
        )
        if settings.scheduler_address:
            replicas = SchedulerReplicas(
                settings.scheduler_addresses,
                replica_channel_factory(settings, _service_token(settings)),
            )
            sync = PledgeSync(runtime.db, replicas)
            app.pledge_sync = sync
            runtime.spawn(sync.run(runtime.stopping), name="pledges")
        else:
            logger.warning(
                "ACSP_SCHEDULER_ADDRESS is not set: settlements show no pledged capacity"
            )
        facts = FactConsumers(runtime.db, ledger)
        for consumer in facts.consumers(runtime.js):
            runtime.spawn(
                run_when_stream_exists(runtime.js, consumer, runtime.stopping),
                name=consumer.durable,
            )

    return Service(
        "metering",
        settings,
        register,
        schema=SCHEMA,
        migrations="services.metering.migrations",
        needs_nats=True,
        streams=[usage_stream_config(ingest_config)],
        buckets=[KeyValueConfig(bucket=subjects.RATE_CARD_BUCKET, history=16)],
        on_start=[start],
    )


def _service_token(settings: MeteringSettings) -> str | None:
    """Return the bearer token for the grant service, or None when mutual TLS identifies us."""
    return service_bearer_token(
        "metering",
        settings.service_token_file,
        settings.tls_enabled,
        settings.data_dir,
        "the grant service will reject charges",
    )
