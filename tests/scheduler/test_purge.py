"""The leader's purge of acknowledged rows: its interval, its logging and its failures."""

from __future__ import annotations

import logging
from typing import cast

import asyncpg
import pytest

from scheduler.service.purge import AckedRowPurge
from scheduler.service.store import JobStore


class FakeStore:
    """Returns queued purge results, or raises the queued errors, in order."""

    def __init__(self, *outcomes: tuple[int, int] | Exception) -> None:
        self.outcomes = list(outcomes)
        self.retentions: list[float] = []

    async def purge_acked(self, retention_s: float) -> tuple[int, int]:
        self.retentions.append(retention_s)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def make_purge(store: FakeStore, interval_s: float = 0.0) -> AckedRowPurge:
    return AckedRowPurge(cast(JobStore, store), retention_s=3600.0, interval_s=interval_s)


def test_purge_waits_one_interval() -> None:
    purge = make_purge(FakeStore(), interval_s=60.0)
    assert not purge.claim()


async def test_purge_runs_one_at_a_time() -> None:
    store = FakeStore((0, 0))
    purge = make_purge(store)
    assert purge.claim()
    assert not purge.claim(), "the claimed purge has not run yet"
    await purge.run()
    assert purge.claim()
    assert store.retentions == [3600.0]


async def test_purge_logs_deleted_rows(caplog: pytest.LogCaptureFixture) -> None:
    purge = make_purge(FakeStore((3, 5), (0, 0)))
    with caplog.at_level(logging.INFO, logger="scheduler.service.purge"):
        assert purge.claim()
        await purge.run()
        assert purge.claim()
        await purge.run()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["deleted 3 commands and 5 job events acknowledged over 3600 s ago"]


async def test_purge_failure_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    failure = asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")
    store = FakeStore(failure, TimeoutError(), (1, 0))
    purge = make_purge(store)
    with caplog.at_level(logging.INFO, logger="scheduler.service.purge"):
        for _ in range(3):
            assert purge.claim()
            await purge.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "failed (1 in a row)" in warnings[0]
    assert "statement timeout" in warnings[0]
    assert "failed (2 in a row)" in warnings[1]
    assert store.outcomes == [], "the third purge ran after two failures"
