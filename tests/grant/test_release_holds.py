"""ReleaseHolds: many releases in one call, each with its own result."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant

OK = grpc.StatusCode.OK.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


def release(request_id: str, hold_id: str, settle: bool = False) -> grant_pb2.ReleaseHoldRequest:
    return grant_pb2.ReleaseHoldRequest(request_id=request_id, hold_id=hold_id, settle=settle)


async def place(svc: RunningGrant, grant_id: str, *amounts: str) -> list[str]:
    """Place one hold per amount on the grant and return their ids."""
    scheduler = svc.stub("scheduler", ["service"])
    requests = [
        grant_pb2.PlaceHoldRequest(
            request_id=f"job-{index}/0",
            grant_id=grant_id,
            job_id=f"job-{index}",
            amount_pf_days=common_pb2.Decimal(value=amount),
        )
        for index, amount in enumerate(amounts)
    ]
    response = await scheduler.PlaceHolds(grant_pb2.PlaceHoldsRequest(holds=requests))
    assert [r.code for r in response.results] == [OK] * len(amounts)
    return [r.hold.hold_id for r in response.results]


async def entry_count(office: grant_pb2_grpc.GrantServiceStub, grant_id: str) -> int:
    response = await office.ListLedgerEntries(
        grant_pb2.ListLedgerEntriesRequest(
            grant_id=grant_id, page=common_pb2.PageRequest(page_size=1000)
        )
    )
    return len(response.entries)


async def test_release_holds_one_result_per_hold(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        first, second, third = await place(svc, grant_id, "3", "2", "1")
        metering = svc.stub("metering", ["service"])
        office = svc.stub("office", ["program_office"])
        entries_before = await entry_count(office, grant_id)

        response = await metering.ReleaseHolds(
            grant_pb2.ReleaseHoldsRequest(
                holds=[
                    release("release/job-0", first),
                    release("release/lost", "hold-missing"),
                    release("", third),
                    release("settle/job-1", second, settle=True),
                    release("release/blank", ""),
                ]
            )
        )

        entries_after = await entry_count(office, grant_id)
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
        # The single call with a request id the batch used returns the hold it released.
        settled = await metering.ReleaseHold(release("settle/job-1", second, settle=True))
        untouched = await metering.ReleaseHold(release("release/job-2", third))

    results = response.results
    assert [r.request_id for r in results] == [
        "release/job-0",
        "release/lost",
        "",
        "settle/job-1",
        "release/blank",
    ]
    assert [r.code for r in results] == [OK, NOT_FOUND, INVALID_ARGUMENT, OK, INVALID_ARGUMENT]
    assert results[0].message == ""
    assert "hold-missing" in results[1].message
    assert "holds[2].request_id" in results[2].message
    assert "holds[4].hold_id" in results[4].message
    assert entries_after == entries_before + 2
    assert balance.held_pf_days.value == "1"
    assert balance.available_pf_days.value == "9"
    assert summary.postings_sum_pf_days.value == "0"
    assert settled.settled is True
    assert settled.released_pf_days.value == "2"
    assert untouched.released_pf_days.value == "1"


async def test_release_holds_repeat_applies_once(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        first, second = await place(svc, grant_id, "4", "3")
        metering = svc.stub("metering", ["service"])
        office = svc.stub("office", ["program_office"])
        request = grant_pb2.ReleaseHoldsRequest(
            holds=[
                release("release/job-0", first),
                # A repeat inside one call is applied once, like a repeat across calls.
                release("release/job-0", first),
                release("settle/job-1", second, settle=True),
            ]
        )
        once = await metering.ReleaseHolds(request)
        entries_once = await entry_count(office, grant_id)
        balance_once = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        twice = await metering.ReleaseHolds(request)
        entries_twice = await entry_count(office, grant_id)
        balance_twice = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        reused = await metering.ReleaseHolds(
            grant_pb2.ReleaseHoldsRequest(holds=[release("release/job-0", first, settle=True)])
        )
    assert [r.code for r in once.results] == [OK, OK, OK]
    assert [r.code for r in twice.results] == [OK, OK, OK]
    assert balance_once.available_pf_days.value == "10"
    assert balance_once.held_pf_days.value == "0"
    assert entries_twice == entries_once
    assert balance_twice == balance_once
    assert reused.results[0].code == FAILED_PRECONDITION
    assert "already used for a different request" in reused.results[0].message


async def test_release_holds_rejects_whole_call(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        (hold_id,) = await place(svc, grant_id, "2")
        metering = svc.stub("metering", ["service"])
        too_many = grant_pb2.ReleaseHoldsRequest(
            holds=[release(f"release/{i}", hold_id) for i in range(1001)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await metering.ReleaseHolds(too_many)
        single = grant_pb2.ReleaseHoldsRequest(holds=[release("release/x", hold_id)])
        with pytest.raises(grpc.aio.AioRpcError) as researcher:
            await svc.stub("alice", ["researcher"]).ReleaseHolds(single)
        with pytest.raises(grpc.aio.AioRpcError) as other_service:
            await svc.stub("agent", ["service"]).ReleaseHolds(single)
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 1000" in (oversized.value.details() or "")
    assert researcher.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert other_service.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert balance.held_pf_days.value == "2"
