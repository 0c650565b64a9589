"""Releasing and settling holds in ReleaseHolds calls: chunks, per-hold outcomes, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from services.metering import attempts
from services.metering.attempts import release_ended_attempts
from services.metering.ledger import (
    GrpcLedger,
    HoldRelease,
    LedgerRejected,
    LedgerUnavailable,
    ReleaseOutcome,
    ReleaseStatus,
)
from services.runtime.auth import mint_token
from services.runtime.channel import open_channel
from services.runtime.db import Database
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant
from tests.metering.helpers import T0, LedgerDouble, admit

NOW = T0 + timedelta(hours=1)


@dataclass
class ScriptedLedger(LedgerDouble):
    """A ledger double that fails chosen close_holds calls and reports chosen outcomes."""

    failures: dict[int, Exception] = field(default_factory=dict)
    """The error that close_holds call number N (from 0) raises."""
    statuses: dict[str, ReleaseStatus] = field(default_factory=dict)
    """Outcomes other than done, by hold id. A release with such an outcome is not applied."""
    call_sizes: list[int] = field(default_factory=list)

    async def close_holds(
        self, items: Sequence[HoldRelease], timeout_s: float
    ) -> list[ReleaseOutcome]:
        number = len(self.call_sizes)
        self.call_sizes.append(len(items))
        if number in self.failures:
            raise self.failures[number]
        outcomes = []
        for item in items:
            status = self.statuses.get(item.hold_id, "done")
            if status == "done":
                self.released.setdefault(item.request_id, item.hold_id)
            outcomes.append(ReleaseOutcome(item.request_id, status, f"{status} in test"))
        return outcomes


async def ended_jobs(db: Database, count: int) -> list[str]:
    """Record ``count`` ended attempts without usage, ending one second apart."""
    jobs = [f"job-{index}" for index in range(count)]
    for index, job in enumerate(jobs):
        await admit(db, job, ended_at=T0 + timedelta(seconds=index), end_reason="completed")
    return jobs


async def released_jobs(db: Database) -> list[str]:
    async with db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT job_id FROM metering.jobs WHERE released_at IS NOT NULL ORDER BY job_id"
        )
    return [row["job_id"] for row in rows]


async def release_round(db: Database, ledger: LedgerDouble, now: datetime = NOW) -> int:
    async with db.acquire() as conn:
        return await release_ended_attempts(conn, ledger, now=now, lateness_s=30, timeout_s=5)


async def test_close_holds_one_call_per_chunk(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempts, "MAX_RELEASES_PER_CALL", 2)
    jobs = await ended_jobs(db, 5)
    ledger = ScriptedLedger()
    recorded = await release_round(db, ledger)
    assert recorded == 5
    assert ledger.call_sizes == [2, 2, 1]
    assert ledger.released == {f"release/{job}/0": f"hold-{job}-0" for job in jobs}
    assert await released_jobs(db) == jobs


async def test_close_holds_outage_leaves_rest_open(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(attempts, "MAX_RELEASES_PER_CALL", 2)
    jobs = await ended_jobs(db, 5)
    ledger = ScriptedLedger(failures={1: LedgerUnavailable("UNAVAILABLE: grant down")})
    with caplog.at_level(logging.WARNING, logger="services.metering.attempts"):
        recorded = await release_round(db, ledger)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    released_in_outage = await released_jobs(db)
    later = await release_round(db, ScriptedLedger())
    assert recorded == 2
    assert ledger.call_sizes == [2, 2]
    assert released_in_outage == jobs[:2]
    assert len(warnings) == 1
    assert "release of 3 holds" in warnings[0].getMessage()
    assert later == 3
    assert await released_jobs(db) == jobs


async def test_close_holds_records_answered_holds(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = await ended_jobs(db, 3)
    ledger = ScriptedLedger(statuses={"hold-job-1-0": "rejected", "hold-job-2-0": "unavailable"})
    with caplog.at_level(logging.WARNING, logger="services.metering.attempts"):
        recorded = await release_round(db, ledger)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert recorded == 2
    assert await released_jobs(db) == jobs[:2]
    assert len(errors) == 1
    assert getattr(errors[0], "job_id", None) == "job-1"
    assert getattr(errors[0], "hold_id", None) == "hold-job-1-0"
    assert "rejected in test" in errors[0].getMessage()
    assert len(warnings) == 1
    assert "release of 1 holds" in warnings[0].getMessage()


async def test_close_holds_rejected_call_records_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await ended_jobs(db, 2)
    ledger = ScriptedLedger(failures={0: LedgerRejected("PERMISSION_DENIED: not metering")})
    with caplog.at_level(logging.ERROR, logger="services.metering.attempts"):
        recorded = await release_round(db, ledger)
    assert recorded == 0
    assert await released_jobs(db) == []
    assert any("PERMISSION_DENIED" in r.getMessage() for r in caplog.records)


async def test_grpc_close_holds_against_grant_service(grant_schema: str, tmp_path: Path) -> None:
    async with running_grant(grant_schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        placed = await svc.stub("scheduler", ["service"]).PlaceHolds(
            grant_pb2.PlaceHoldsRequest(
                holds=[
                    grant_pb2.PlaceHoldRequest(
                        request_id=f"job-{amount}/0",
                        grant_id=grant_id,
                        job_id=f"job-{amount}",
                        amount_pf_days=common_pb2.Decimal(value=amount),
                    )
                    for amount in ("3", "2")
                ]
            )
        )
        first, second = (r.hold.hold_id for r in placed.results)
        items = [
            HoldRelease("release/job-3/0", first, settle=False),
            HoldRelease("release/lost/0", "hold-missing", settle=False),
            HoldRelease("settle/job-2/0", second, settle=True),
        ]
        metering = open_channel(svc.address, token=mint_token(svc.key, "metering", ["service"]))
        researcher = open_channel(svc.address, token=mint_token(svc.key, "alice", ["researcher"]))
        try:
            outcomes = await GrpcLedger(metering).close_holds(items, timeout_s=10)
            with pytest.raises(LedgerRejected) as rejected:
                await GrpcLedger(researcher).close_holds(items, timeout_s=10)
        finally:
            await metering.close()
            await researcher.close()
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        # The single call with the batch's request id returns the hold that the batch settled.
        settled = await svc.stub("metering", ["service"]).ReleaseHold(
            grant_pb2.ReleaseHoldRequest(request_id="settle/job-2/0", hold_id=second, settle=True)
        )
    assert [o.request_id for o in outcomes] == [i.request_id for i in items]
    assert [o.status for o in outcomes] == ["done", "rejected", "done"]
    assert outcomes[1].message.startswith("NOT_FOUND: ")
    assert "hold-missing" in outcomes[1].message
    assert "PERMISSION_DENIED" in str(rejected.value)
    assert balance.held_pf_days.value == "0"
    assert balance.available_pf_days.value == "10"
    assert settled.settled is True
    assert settled.released_pf_days.value == "2"


class _SingleReleaseGrant(grant_pb2_grpc.GrantServiceServicer):
    """A grant service from before ReleaseHolds: it implements ReleaseHold only."""

    def __init__(self) -> None:
        self.released: list[tuple[str, bool]] = []

    async def ReleaseHold(
        self, request: grant_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Hold:
        if request.hold_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "hold missing not found")
        self.released.append((request.hold_id, request.settle))
        return grant_pb2.Hold(hold_id=request.hold_id)


async def _close_against(
    servicer: _SingleReleaseGrant, items: list[HoldRelease], timeout_s: float
) -> list[ReleaseOutcome]:
    """Run GrpcLedger.close_holds against ``servicer`` served on a free loopback port."""
    server = grpc.aio.server()
    grant_pb2_grpc.add_GrantServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await GrpcLedger(channel).close_holds(items, timeout_s=timeout_s)
    finally:
        await server.stop(None)


async def test_grpc_close_holds_falls_back_to_single_calls() -> None:
    servicer = _SingleReleaseGrant()
    items = [
        HoldRelease("release/j1/1", "h1", settle=False),
        HoldRelease("settle/j2/1", "missing", settle=True),
        HoldRelease("settle/j3/1", "h3", settle=True),
    ]
    outcomes = await _close_against(servicer, items, timeout_s=5)
    assert [o.status for o in outcomes] == ["done", "rejected", "done"]
    assert "NOT_FOUND" in outcomes[1].message
    assert servicer.released == [("h1", False), ("h3", True)]


class _StalledSingleReleaseGrant(_SingleReleaseGrant):
    """A grant service from before ReleaseHolds that stalls for 5 s on hold "stuck"."""

    async def ReleaseHold(
        self, request: grant_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Hold:
        if request.hold_id == "stuck":
            await asyncio.sleep(5)
        return await super().ReleaseHold(request, context)


async def test_grpc_fallback_stops_at_unavailable() -> None:
    servicer = _StalledSingleReleaseGrant()
    items = [
        HoldRelease("release/j1/1", "h1", settle=False),
        HoldRelease("release/j2/1", "stuck", settle=False),
        HoldRelease("release/j3/1", "h3", settle=False),
        HoldRelease("release/j4/1", "h4", settle=False),
    ]
    outcomes = await _close_against(servicer, items, timeout_s=0.2)
    # Each call after the one that timed out would wait its own timeout on a stalled service.
    assert [o.status for o in outcomes] == ["done", "unavailable", "unavailable", "unavailable"]
    assert "DEADLINE_EXCEEDED" in outcomes[1].message
    assert servicer.released == [("h1", False)]
