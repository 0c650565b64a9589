"""Background work of the grant service: the expiry scan and expiring-soon notices."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg

from services.grant.app import GrantApp
from services.grant.expiry import expire_due, notify_expiring
from services.grant.ledger_ops import Cause
from services.runtime.errors import ServiceError

log = logging.getLogger(__name__)

TIMER_CAUSE = Cause(actor="acsp-grant", trigger="timer:expiry", reason="window ended")


async def run_expiry(app: GrantApp, stopping: asyncio.Event) -> None:
    """Expire grants whose window ended and send expiring-soon notices, every interval."""
    interval = app.settings.expiry_interval_s
    while not stopping.is_set():
        now = datetime.now(UTC)
        try:
            expired, total = await expire_due(app, now, TIMER_CAUSE)
            soon = await notify_expiring(
                app, now, Cause("acsp-grant", "timer:expiring_soon", "window ends soon")
            )
            if expired or soon:
                log.info(
                    "expiry scan: %s grants expired, %s PF-days returned, %s expiring soon",
                    len(expired),
                    total,
                    len(soon),
                )
        except (ServiceError, asyncpg.PostgresError, OSError) as error:
            log.warning("expiry scan failed, will retry: %s", error)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=interval)
        except TimeoutError:
            pass
