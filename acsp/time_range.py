"""The range of times that the services accept for windows: grants, pledges and recalls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

EARLIEST_TIME: Final = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)
"""Timestamps outside [EARLIEST_TIME, LATEST_TIME) are rejected as typing mistakes."""
EARLIEST_SECONDS: Final = int(EARLIEST_TIME.timestamp())
LATEST_SECONDS: Final = int(LATEST_TIME.timestamp())

RANGE_FIX: Final = f"give a time from {EARLIEST_TIME.date()} to before {LATEST_TIME.date()} (UTC)"
"""The fix an error message gives for a time outside the range."""
