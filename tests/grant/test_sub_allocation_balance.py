"""A grant's balance after delegating: what was handed to sub-allocations, and what they used.

``delegated`` is what the grant transferred to its sub-allocations and stays so while they are
charged. The ``sub_allocations_*`` amounts give what they have left, hold and were charged, and
the grant's held and charged amounts include theirs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from acsp.v1 import grant_pb2
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_holders_and_names import create_project
from tests.grant.test_service_rpc import dec, rid, setup_project, standard_grant

CHARGE = "0.000000039201173611111112"
"""A charge with every digit the ledger keeps, as metering sends for a few seconds of use."""


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    async with running_grant(schema, tmp_path) as running:
        await setup_project(running)
        yield running


def amount(message: object) -> Decimal:
    return Decimal(message.value)  # type: ignore[attr-defined]


def delegate(grant_id: str, holder: str, pf_days: str) -> grant_pb2.CreateSubAllocationRequest:
    return grant_pb2.CreateSubAllocationRequest(
        request_id=rid(), grant_id=grant_id, holder=holder, amount_pf_days=dec(pf_days)
    )


async def hold_and_charge(
    svc: RunningGrant, grant_id: str, sub_allocation_id: str, held: str, charged: str
) -> str:
    """Hold ``held`` PF-days for a job and charge ``charged`` of it; return the hold's id."""
    scheduler = svc.stub("scheduler", ["service"])
    metering = svc.stub("metering", ["service"])
    hold = await scheduler.PlaceHold(
        grant_pb2.PlaceHoldRequest(
            request_id=rid(),
            grant_id=grant_id,
            sub_allocation_id=sub_allocation_id,
            job_id=f"job-{rid()}",
            amount_pf_days=dec(held),
        )
    )
    await metering.CommitCharges(
        grant_pb2.CommitChargesRequest(
            charges=[
                grant_pb2.ChargeItem(
                    request_id=rid(), hold_id=hold.hold_id, amount_pf_days=dec(charged)
                )
            ]
        )
    )
    return hold.hold_id


def check_sums(balance: grant_pb2.Balance) -> None:
    """Check the two sums that the Balance message documents."""
    assert amount(balance.credited_pf_days) == (
        amount(balance.available_pf_days)
        + amount(balance.held_pf_days)
        + amount(balance.charged_pf_days)
        + amount(balance.sub_allocations_available_pf_days)
    )
    assert amount(balance.delegated_pf_days) == (
        amount(balance.sub_allocations_available_pf_days)
        + amount(balance.sub_allocations_held_pf_days)
        + amount(balance.sub_allocations_charged_pf_days)
    )


@pytest.mark.timeout(120)
async def test_delegated_unchanged_by_charges(grant_service: RunningGrant) -> None:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await create_project(alice, "proj-a-sub", "alice")
    await alice.CreateSubAllocation(delegate(grant_id, "bob", "1"))
    to_sub = await alice.CreateSubAllocation(delegate(grant_id, "proj-a-sub", "2"))
    await hold_and_charge(grant_service, grant_id, to_sub.sub_allocation_id, "0.5", CHARGE)

    balance = await alice.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))

    assert balance.credited_pf_days.value == "100"
    assert balance.delegated_pf_days.value == "3"
    assert balance.available_pf_days.value == "97"
    assert balance.sub_allocations_charged_pf_days.value == CHARGE
    assert balance.sub_allocations_held_pf_days.value == "0.499999960798826388888888"
    assert balance.sub_allocations_available_pf_days.value == "2.5"
    assert balance.charged_pf_days.value == CHARGE
    assert balance.held_pf_days.value == "0.499999960798826388888888"
    check_sums(balance)


@pytest.mark.timeout(120)
async def test_grant_charges_kept_apart(grant_service: RunningGrant) -> None:
    """Charges to the grant itself count in charged but not as the sub-allocations'."""
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    scheduler = grant_service.stub("scheduler", ["service"])
    to_bob = await alice.CreateSubAllocation(delegate(grant_id, "bob", "2"))
    hold_id = await hold_and_charge(grant_service, grant_id, to_bob.sub_allocation_id, "1", CHARGE)
    await hold_and_charge(grant_service, grant_id, "", "4", "0.25")
    await scheduler.ReleaseHold(
        grant_pb2.ReleaseHoldRequest(request_id=rid(), hold_id=hold_id, settle=True)
    )

    balance = await alice.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    listed = await alice.ListGrants(grant_pb2.ListGrantsRequest())

    assert balance.delegated_pf_days.value == "2"
    assert balance.charged_pf_days.value == "0.250000039201173611111112"
    assert balance.sub_allocations_charged_pf_days.value == CHARGE
    assert balance.sub_allocations_held_pf_days.value == "0"
    assert balance.sub_allocations_available_pf_days.value == "1.999999960798826388888888"
    assert balance.held_pf_days.value == "3.75"
    assert balance.available_pf_days.value == "94"
    check_sums(balance)
    assert [g.balance for g in listed.grants] == [balance]
