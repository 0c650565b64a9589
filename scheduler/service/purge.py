"""Deletion of acknowledged commands and job events once their retention has passed.

``scheduler.dispatches`` and ``scheduler.outbox`` get a row for every command and job event.
Recovery needs only the unacknowledged rows and the commands of open jobs, so the leader deletes
the rest once they are older than the retention, which is kept for debugging.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from .store import JobStore

logger = logging.getLogger(__name__)


class AckedRowPurge:
    """Purges of one leader term, at most one at a time and one per interval."""

    def __init__(self, store: JobStore, retention_s: float, interval_s: float) -> None:
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        # The first purge waits one interval, so it stays out of the way of a term's start.
        self._last_start = time.monotonic()
        self._running = False
        self._failures = 0

    def claim(self) -> bool:
        """Mark a purge as running and return True when one is due.

        The caller then awaits :meth:`run`, which clears the mark.
        """
        clock = time.monotonic()
        if self._running or clock - self._last_start < self.interval_s:
            return False
        self._last_start = clock
        self._running = True
        return True

    async def run(self) -> None:
        """Delete the acknowledged rows past retention, logging a failure for the next try."""
        try:
            commands, events = await self.store.purge_acked(self.retention_s)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as error:
            self._failures += 1
            logger.warning(
                "purge of acknowledged commands and job events failed (%d in a row),"
                " retrying in %.0f s: %r",
                self._failures,
                self.interval_s,
                error,
            )
            return
        finally:
            self._running = False
        self._failures = 0
        if commands or events:
            logger.info(
                "deleted %d commands and %d job events acknowledged over %.0f s ago",
                commands,
                events,
                self.retention_s,
            )
