"""The periodic pledge copy survives failures of the database it copies into."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest

from services.metering.pledges import PledgeSync
from services.metering.scheduler_replicas import SchedulerReplicas


def _no_channel(address: str, host: str) -> grpc.aio.Channel:
    raise AssertionError("sync_once is replaced, so no channel is opened")


class FailingFirstSync(PledgeSync):
    """A sync whose first copies fail with ``errors`` in turn, then succeed."""

    def __init__(self, errors: list[BaseException], stop: asyncio.Event) -> None:
        replicas = SchedulerReplicas(["127.0.0.1:1"], _no_channel)
        super().__init__(None, replicas, interval_s=0.01)  # type: ignore[arg-type]
        self._errors = errors
        self._stop = stop
        self.calls = 0

    async def sync_once(self, provider: str = "") -> tuple[int, int]:
        self.calls += 1
        if self._errors:
            raise self._errors.pop(0)
        self._stop.set()
        return 0, 0


@pytest.mark.timeout(10)
async def test_database_errors_retried(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    errors: list[Any] = [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("pool is closing"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
    ]
    sync = FailingFirstSync(errors, stop)

    await sync.run(stop)

    assert sync.calls == 5
    assert caplog.text.count("could not store the pledge copy") == 4
