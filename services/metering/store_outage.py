"""One log line when the usage ingest's database writes start failing, one when they work again.

While the database is down, every worker fails a batch each time JetStream redelivers it, a
few times a second. Logging each failure would flood the log, so the failures in between are
counted and logged at DEBUG only.
"""

from __future__ import annotations

import logging
import time


class StoreOutage:
    """The state of the ingest's batch writes: failing since a moment, or working."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._started: float | None = None
        """``time.monotonic()`` of the first failure of the current outage, None if none."""
        self._failures = 0
        """Batches that failed in the current outage."""

    def record_failure(self, message_count: int, error: BaseException) -> None:
        """Count a batch of ``message_count`` messages whose write failed with ``error``."""
        self._failures += 1
        if self._started is not None:
            self._logger.debug(
                "storing a batch of %d usage messages failed again (%d failures so far): %s",
                message_count,
                self._failures,
                error,
            )
            return
        self._started = time.monotonic()
        self._logger.error(
            "storing usage batches failed, so they will be redelivered until the database "
            "accepts them; further failures are counted and not logged: %s",
            error,
        )

    def record_success(self) -> None:
        """End the current outage, if any, with a line that gives its length and failures."""
        if self._started is None:
            return
        self._logger.info(
            "storing usage batches works again after %.1f s and %d failed batches",
            time.monotonic() - self._started,
            self._failures,
        )
        self._started = None
        self._failures = 0
