"""The rate-card refresh loop outlives a database that is down for a while."""

from __future__ import annotations

import asyncio

import pytest

from services.metering.ratecard import RateCardHistory
from services.metering.ratecard_store import RateCardCache
from services.runtime.errors import Unavailable

pytestmark = pytest.mark.timeout(30)


class FlakyCache(RateCardCache):
    """A cache whose first loads fail as they do while PostgreSQL restarts."""

    def __init__(self, failures: int) -> None:
        super().__init__(db=None, refresh_s=0.01)  # type: ignore[arg-type]
        self.failures = failures
        self.loads = 0
        self.loaded = asyncio.Event()

    async def load(self) -> RateCardHistory:
        self.loads += 1
        if self.loads <= self.failures:
            raise Unavailable("cannot connect to the database; retry later")
        self.loaded.set()
        return self.history()


async def test_refresh_retries_unavailable_database() -> None:
    cache = FlakyCache(failures=3)
    stop = asyncio.Event()
    runner = asyncio.create_task(cache.run(stop, None))
    try:
        await asyncio.wait_for(cache.loaded.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert cache.loads >= 4
    assert runner.exception() is None
