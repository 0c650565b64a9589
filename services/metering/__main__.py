"""Run the metering service: ``python -m services.metering``.

Applies the migrations, declares the usage stream and runs the usage ingest and the charger
until SIGINT or SIGTERM, then lets each worker finish its batch.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import grpc
import nats

from services.metering.charger import Charger
from services.metering.ingest import UsageIngest, declare_usage_stream
from services.metering.ledger import GrpcLedger
from services.metering.ratecard import RateCardHistory, default_rate_card
from services.metering.settings import MeteringSettings
from services.runtime.db import Database
from services.runtime.logs import configure_logging
from services.runtime.migrations import apply_migrations
from services.runtime.settings import SettingsError

logger = logging.getLogger("services.metering")

SCHEMA = "metering"


async def serve(settings: MeteringSettings) -> None:
    if not settings.database_url or not settings.nats_url:
        raise SettingsError(
            "ACSP_DATABASE_URL",
            "metering needs ACSP_DATABASE_URL and ACSP_NATS_URL",
            "set both, or start it through the local mesh, which sets them",
        )
    await apply_migrations(settings.database_url, SCHEMA, "services.metering.migrations")
    db = await Database.connect(settings, SCHEMA, "metering")
    client = await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=-1)
    channel = grpc.aio.insecure_channel(settings.grant_address)
    # NOTE: rate-card versions are read from the built-in catalog only; publishing new
    # versions over gRPC and to the rate-card KV bucket is not wired yet.
    history = RateCardHistory((default_rate_card(),))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        js = client.jetstream()
        ingest_config = settings.ingest_config()
        await declare_usage_stream(js, ingest_config)
        ingest = UsageIngest(js, db, ingest_config, lambda: history.current.rates)
        charger = Charger(db, GrpcLedger(channel), lambda: history, settings.charger_config())
        logger.info("metering started")
        async with asyncio.TaskGroup() as group:
            group.create_task(ingest.run(stop), name="usage-ingest")
            group.create_task(charger.run(stop), name="charger")
    finally:
        await channel.close()
        await client.drain()
        await db.close()
        logger.info("metering stopped")


def main() -> None:
    try:
        settings = MeteringSettings.from_env()
    except SettingsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    configure_logging("metering", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except SettingsError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
