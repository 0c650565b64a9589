"""A task stopped with its agent is charged for its run up to the stop, end to end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.metering.ratecard import AMOUNT_QUANTUM, default_rate_card
from services.runtime.db import Database
from tests.agent.natsserver import declare_agent_streams
from tests.agent.subprocess_agent import TASK_ID, run_task_then_stop, usage_of_task
from tests.metering.helpers import (
    Clock,
    LedgerDouble,
    admit,
    drain,
    make_charger,
    running_ingest,
    wait_until,
)

CARD = default_rate_card()


@pytest.mark.timeout(120)
async def test_stopped_agent_task_charged_to_stop(
    tmp_path: Path, nats_url: str, db: Database, ledger: LedgerDouble
) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    job_id, attempt, _index = TASK_ID.split("/")
    async with running_ingest(nats_url, db) as (_js, ingest):
        await declare_agent_streams(nats_url, usage=False)
        record, stopped_at, _exited_at = await run_task_then_stop(
            nats_url, state_dir, "--stop-tasks-on-exit"
        )
        samples = await usage_of_task(nats_url)
        assert samples, "the agent published no usage for the task"

        async def all_ingested() -> bool:
            return ingest.counters.inserted >= len(samples)

        await wait_until(all_ingested)
    assert ingest.counters.inserted == len(samples)

    started = datetime.fromtimestamp(record.started_at, UTC)
    ended = samples[-1].end_time.ToDatetime(tzinfo=UTC)
    assert ended >= datetime.fromtimestamp(stopped_at, UTC)
    await admit(
        db, job_id, attempt=int(attempt), started_at=started, ended_at=ended, end_reason="stopped"
    )
    clock = Clock(ended + timedelta(hours=1))
    await drain(make_charger(db, ledger, clock))
    run_us = samples[-1].end_time.ToMicroseconds() - round(record.started_at * 1_000_000)
    expected = CARD.charge("A100-SXM4-80GB", Decimal(run_us) / 1_000_000)
    # One charge per metering period, each rounded to the ledger quantum, and a run of a few
    # seconds falls in one period or two.
    assert 1 <= len(ledger.charges) <= 2
    assert abs(ledger.total_charged() - expected) <= AMOUNT_QUANTUM * len(ledger.charges)
