"""Money-moving RPCs end to end: concurrency, atomic charge batches, replays across restarts."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant


def dec(value: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=value)


def hold_request(grant_id: str, amount: str, job: str = "job") -> grant_pb2.PlaceHoldRequest:
    return grant_pb2.PlaceHoldRequest(
        request_id=uuid.uuid4().hex, grant_id=grant_id, job_id=job, amount_pf_days=dec(amount)
    )


async def test_hundred_holds_over_grpc(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "60")
        scheduler = svc.stub("scheduler", ["service"])

        async def place(index: int) -> grpc.StatusCode:
            try:
                await scheduler.PlaceHold(hold_request(grant_id, "1", f"job-{index}"))
            except grpc.aio.AioRpcError as error:
                assert "shortfall 1 PF-days" in (error.details() or "")
                return error.code()
            return grpc.StatusCode.OK

        codes = Counter(await asyncio.gather(*(place(i) for i in range(100))))
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    assert codes[grpc.StatusCode.OK] == 60
    assert codes[grpc.StatusCode.FAILED_PRECONDITION] == 40
    assert balance.available_pf_days.value == "0"
    assert balance.held_pf_days.value == "60"
    assert summary.postings_sum_pf_days.value == "0"


async def test_charge_replayed_after_restart(schema: str, tmp_path: Path) -> None:
    charge = grant_pb2.CommitChargesRequest(
        charges=[grant_pb2.ChargeItem(request_id="job-1/period-0", amount_pf_days=dec("2.5"))]
    )
    async with running_grant(schema, tmp_path / "first") as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        hold = await svc.stub("scheduler", ["service"]).PlaceHold(hold_request(grant_id, "4"))
        charge.charges[0].hold_id = hold.hold_id
        first = await svc.stub("metering", ["service"]).CommitCharges(charge)
    async with running_grant(schema, tmp_path / "second") as svc:
        second = await svc.stub("metering", ["service"]).CommitCharges(charge)
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    assert first.results[0].applied is True
    assert second.results[0].applied is False
    assert second.results[0].entry_id == first.results[0].entry_id
    assert balance.charged_pf_days.value == "2.5"
    assert balance.held_pf_days.value == "1.5"
    assert balance.available_pf_days.value == "6"


async def test_charge_batch_all_or_nothing(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        scheduler = svc.stub("scheduler", ["service"])
        metering = svc.stub("metering", ["service"])
        hold = await scheduler.PlaceHold(hold_request(grant_id, "2"))
        items = [
            grant_pb2.ChargeItem(request_id="a", hold_id=hold.hold_id, amount_pf_days=dec("1")),
            grant_pb2.ChargeItem(request_id="b", hold_id=hold.hold_id, amount_pf_days=dec("50")),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await metering.CommitCharges(grant_pb2.CommitChargesRequest(charges=items))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "charges[1]" in (caught.value.details() or "")
        balance = await metering.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        assert balance.charged_pf_days.value == "0"
        await scheduler.ReleaseHold(
            grant_pb2.ReleaseHoldRequest(request_id="r", hold_id=hold.hold_id, settle=True)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await metering.CommitCharges(grant_pb2.CommitChargesRequest(charges=items[:1]))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "settled" in (caught.value.details() or "")
        released = await scheduler.ReleaseHold(
            grant_pb2.ReleaseHoldRequest(request_id="r", hold_id=hold.hold_id, settle=True)
        )
    assert released.released_pf_days.value == "2"
    assert released.settled is True


async def test_check_funds_reports_shortfall(schema: str, tmp_path: Path) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10")
        scheduler = svc.stub("scheduler", ["service"])
        await scheduler.PlaceHold(hold_request(grant_id, "7"))
        by_grant = await scheduler.CheckFunds(
            grant_pb2.CheckFundsRequest(grant_id=grant_id, amount_pf_days=dec("5"))
        )
        by_project = await scheduler.CheckFunds(
            grant_pb2.CheckFundsRequest(project_id="proj-a", amount_pf_days=dec("2"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.CheckFunds(
                grant_pb2.CheckFundsRequest(grant_id=grant_id, amount_pf_days=dec("-5"))
            )
    assert by_grant.sufficient is False
    assert by_grant.available_pf_days.value == "3"
    assert by_grant.shortfall_pf_days.value == "2"
    assert by_project.sufficient is True
    assert by_project.grant_id == grant_id
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sub_allocation_needs_its_grant(schema: str, tmp_path: Path) -> None:
    """A hold or check that names a sub-allocation but no grant is rejected, naming grant_id."""
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "100")
        alice = svc.stub("alice", ["pi"], "uni-a")
        scheduler = svc.stub("scheduler", ["service"])
        delegated = await alice.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id="sub-bob", grant_id=grant_id, holder="bob", amount_pf_days=dec("90")
            )
        )
        sub_id = delegated.sub_allocation_id
        by_project = hold_request("", "50")
        by_project.project_id = "proj-a"
        by_project.sub_allocation_id = sub_id
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await scheduler.PlaceHold(by_project)
        batch = await scheduler.PlaceHolds(grant_pb2.PlaceHoldsRequest(holds=[by_project]))
        with pytest.raises(grpc.aio.AioRpcError) as check:
            await scheduler.CheckFunds(
                grant_pb2.CheckFundsRequest(
                    project_id="proj-a", sub_allocation_id=sub_id, amount_pf_days=dec("50")
                )
            )
        by_grant = hold_request(grant_id, "50")
        by_grant.sub_allocation_id = sub_id
        placed = await scheduler.PlaceHold(by_grant)
        balance = await alice.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    for error in (single.value, check.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grant_id: is missing" in (error.details() or "")
    assert batch.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "holds[0].grant_id: is missing" in batch.results[0].message
    assert placed.sub_allocation_id == sub_id
    assert balance.held_pf_days.value == "50"
