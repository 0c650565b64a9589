"""Assemble the grant service on the shared runtime: servicer, ledger workers, loops."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from nats.js.api import StreamConfig

from acsp import subjects
from acsp.v1 import grant_pb2, grant_pb2_grpc, scheduler_pb2_grpc
from services.grant.app import GrantApp
from services.grant.fleet import ProviderRegistry
from services.grant.ledger import Ledger
from services.grant.ledger_batcher import LedgerBatcher
from services.grant.lifecycle import run_expiry
from services.grant.outbox import run_publisher
from services.grant.servicer import GrantServicer
from services.grant.settings import GrantSettings
from services.runtime.auth import service_bearer_token
from services.runtime.channel import service_channel
from services.runtime.server import Runtime, Service

logger = logging.getLogger(__name__)

SCHEMA = "grant"


def build_service(settings: GrantSettings, *, schema: str = SCHEMA) -> Service:
    """Return the grant service, ready to :meth:`~services.runtime.server.Service.run`."""
    app = GrantApp(settings)
    channels: list[grpc.aio.Channel] = []

    def register(server: grpc.aio.Server, runtime: Runtime) -> Iterable[str]:
        grant_pb2_grpc.add_GrantServiceServicer_to_server(GrantServicer(app), server)
        return [grant_pb2.DESCRIPTOR.services_by_name["GrantService"].full_name]

    async def start(runtime: Runtime) -> None:
        assert runtime.db is not None
        app.db = runtime.db
        app.js = runtime.js
        app.ledger = Ledger(runtime.db, low_fraction=settings.budget_low_fraction)
        app.batcher = LedgerBatcher(
            app.ledger,
            workers=settings.ledger_workers,
            max_batch=settings.ledger_max_batch,
            max_queue=settings.ledger_max_queue,
            default_timeout_s=settings.default_deadline_s,
        )
        runtime.spawn(app.batcher.run(), name="ledger")
        if settings.scheduler_address:
            channel = service_channel(
                settings, settings.scheduler_address, token=_service_token(settings)
            )
            channels.append(channel)
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            app.providers = ProviderRegistry(stub, settings.scheduler_address)
        else:
            logger.warning(
                "ACSP_SCHEDULER_ADDRESS is not set: the providers and regions of awards and "
                "applications are checked for format only, not against the registered ones"
            )
        runtime.spawn(run_expiry(app, runtime.stopping), name="expiry")
        if runtime.js is not None:
            runtime.spawn(
                run_publisher(
                    runtime.db,
                    runtime.js,
                    runtime.stopping,
                    settings.outbox_interval_s,
                    settings.max_event_rejections,
                ),
                name="outbox",
            )

    async def stop(runtime: Runtime) -> None:
        for channel in channels:
            await channel.close()

    streams = []
    if settings.nats_url is not None:
        streams.append(
            StreamConfig(name=subjects.EVENT_STREAM, subjects=list(subjects.EVENT_SUBJECTS))
        )
    return Service(
        "grant",
        settings,
        register,
        schema=schema,
        migrations="services.grant.migrations",
        streams=streams,
        on_start=[start],
        on_stop=[stop],
    )


def _service_token(settings: GrantSettings) -> str | None:
    """Return the bearer token for the scheduler, or None when mutual TLS identifies us."""
    return service_bearer_token(
        "grant",
        settings.service_token_file,
        settings.tls_enabled,
        settings.data_dir,
        "the scheduler will reject the provider listing that checks award limits",
    )
