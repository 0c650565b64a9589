"""PlaceHolds: many holds in one call, each with its own result."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant


def hold(request_id: str, grant_id: str, amount: str, job: str) -> grant_pb2.PlaceHoldRequest:
    return grant_pb2.PlaceHoldRequest(
        request_id=request_id,
        grant_id=grant_id,
        job_id=job,
        amount_pf_days=common_pb2.Decimal(value=amount),
    )


async def test_place_holds_one_result_per_hold(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        scheduler = svc.stub("scheduler", ["service"])
        holds = [hold(f"job-{i}/0", grant_id, "1", f"job-{i}") for i in range(12)]
        holds.insert(3, hold("bad/0", grant_id, "-1", "bad"))
        holds.insert(5, hold("lost/0", "grant-missing", "1", "lost"))
        response = await scheduler.PlaceHolds(grant_pb2.PlaceHoldsRequest(holds=holds))
        again = await scheduler.PlaceHolds(grant_pb2.PlaceHoldsRequest(holds=holds[:3]))
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    results = response.results
    assert [r.request_id for r in results] == [h.request_id for h in holds]
    assert results[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "holds[3].amount_pf_days" in results[3].message
    assert results[5].code == grpc.StatusCode.NOT_FOUND.value[0]
    placed = [r for r in results if r.code == 0]
    short = [r for r in results if r.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]]
    assert len(placed) == 10
    assert len(short) == 2
    assert all(f"grant {grant_id} has " in r.message for r in short)
    assert all("requested; shortfall" in r.message and "grant:" not in r.message for r in short)
    assert all(r.available_pf_days.value == "0" for r in short)
    assert all(r.credited_pf_days.value == "10" for r in short)
    assert not results[5].HasField("available_pf_days")
    assert all(r.hold.grant_id == grant_id and r.hold.held_pf_days.value == "1" for r in placed)
    assert len({r.hold.hold_id for r in placed}) == 10
    assert [r.hold.hold_id for r in again.results] == [r.hold.hold_id for r in results[:3]]
    assert balance.held_pf_days.value == "10"
    assert balance.available_pf_days.value == "0"
    assert summary.postings_sum_pf_days.value == "0"


async def test_place_holds_rejects_other_callers(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        researcher = svc.stub("alice", ["researcher"])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await researcher.PlaceHolds(
                grant_pb2.PlaceHoldsRequest(holds=[hold("x/0", grant_id, "1", "x")])
            )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
