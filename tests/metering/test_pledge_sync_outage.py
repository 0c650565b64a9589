"""The periodic pledge copy outlives a database that is down for a while."""

from __future__ import annotations

import asyncio

import pytest

from services.metering.pledges import PledgeSync
from services.runtime.errors import Unavailable

pytestmark = pytest.mark.timeout(30)


class FlakySync(PledgeSync):
    """A pledge copy whose first syncs fail as they do while PostgreSQL restarts."""

    def __init__(self, failures: int) -> None:
        super().__init__(db=None, replicas=None, interval_s=0.01)  # type: ignore[arg-type]
        self.failures = failures
        self.syncs = 0
        self.synced = asyncio.Event()

    async def sync_once(self, provider: str = "") -> tuple[int, int]:
        self.syncs += 1
        if self.syncs <= self.failures:
            raise Unavailable("cannot connect to the database; retry later")
        self.synced.set()
        return 0, 0


async def test_sync_retries_unavailable_database() -> None:
    sync = FlakySync(failures=3)
    stop = asyncio.Event()
    runner = asyncio.create_task(sync.run(stop))
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert sync.syncs >= 4
    assert runner.exception() is None
