"""Reads of a sub-allocation by the members of the sub-project that holds it.

A sub-project's members (not its viewers) may submit jobs paid by the sub-allocation the
sub-project holds, so they may read that sub-allocation and its balance, and nothing else of
the parent project's grant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from acsp.v1 import grant_pb2, grant_pb2_grpc
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_holders_and_names import create_project, delegate
from tests.grant.test_input_checks import create_eve_project, end_grant_window, rejected
from tests.grant.test_service_rpc import dec, rid, setup_project, standard_grant

Stub = grant_pb2_grpc.GrantServiceStub


@dataclass(frozen=True)
class Delegated:
    """A grant of proj-a with one sub-allocation to sub-project proj-a-sub and one to bob."""

    grant_id: str
    sub_project_allocation: str
    """The sub-allocation that proj-a-sub holds."""
    member_allocation: str
    """The sub-allocation that bob, a member of proj-a, holds."""


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    async with running_grant(schema, tmp_path) as running:
        await setup_project(running)
        yield running


@pytest.fixture
async def delegated(grant_service: RunningGrant) -> Delegated:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await create_project(
        alice,
        "proj-a-sub",
        "alice",
        {"sam": grant_pb2.PROJECT_ROLE_MEMBER, "vera": grant_pb2.PROJECT_ROLE_VIEWER},
    )
    to_sub_project = await alice.CreateSubAllocation(delegate(grant_id, "proj-a-sub"))
    to_member = await alice.CreateSubAllocation(delegate(grant_id, "bob"))
    return Delegated(grant_id, to_sub_project.sub_allocation_id, to_member.sub_allocation_id)


def balance_request(grant_id: str, sub_allocation_id: str = "") -> grant_pb2.GetBalanceRequest:
    return grant_pb2.GetBalanceRequest(grant_id=grant_id, sub_allocation_id=sub_allocation_id)


def funds_request(grant_id: str, sub_allocation_id: str = "") -> grant_pb2.CheckFundsRequest:
    return grant_pb2.CheckFundsRequest(
        grant_id=grant_id, sub_allocation_id=sub_allocation_id, amount_pf_days=dec("0.5")
    )


def list_request(grant_id: str) -> grant_pb2.ListSubAllocationsRequest:
    return grant_pb2.ListSubAllocationsRequest(grant_id=grant_id)


async def hidden_grant(call: object, grant_id: str) -> None:
    """Assert that ``call`` fails as a call on a grant that does not exist would."""
    error = await rejected(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"grant {grant_id!r} not found"


@pytest.mark.timeout(120)
async def test_sub_project_member_reads_balance(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    sam = grant_service.stub("sam", ["researcher"], "uni-a")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    request = balance_request(delegated.grant_id, delegated.sub_project_allocation)
    balance = await sam.GetBalance(request)
    assert balance.available_pf_days.value == "1"
    assert balance == await alice.GetBalance(request)
    funds = await sam.CheckFunds(
        funds_request(delegated.grant_id, delegated.sub_project_allocation)
    )
    assert funds.sufficient
    assert funds.grant_id == delegated.grant_id
    assert funds.available_pf_days.value == "1"


@pytest.mark.timeout(120)
async def test_sub_project_member_lists_only_its_own(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    sam = grant_service.stub("sam", ["researcher"], "uni-a")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    listed = await sam.ListSubAllocations(list_request(delegated.grant_id))
    assert [s.sub_allocation_id for s in listed.sub_allocations] == [
        delegated.sub_project_allocation
    ]
    assert listed.sub_allocations[0].holder == "proj-a-sub"
    assert listed.sub_allocations[0].balance.available_pf_days.value == "1"
    everything = await alice.ListSubAllocations(list_request(delegated.grant_id))
    assert len(everything.sub_allocations) == 2


@pytest.mark.timeout(120)
async def test_sub_project_member_sees_no_more(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    sam = grant_service.stub("sam", ["researcher"], "uni-a")
    grant_id = delegated.grant_id
    await hidden_grant(sam.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id)), grant_id)
    await hidden_grant(sam.GetBalance(balance_request(grant_id)), grant_id)
    await hidden_grant(
        sam.GetBalance(balance_request(grant_id, delegated.member_allocation)), grant_id
    )
    await hidden_grant(sam.GetBalance(balance_request(grant_id, "sub-missing")), grant_id)
    await hidden_grant(sam.CheckFunds(funds_request(grant_id)), grant_id)
    await hidden_grant(
        sam.CheckFunds(funds_request(grant_id, delegated.member_allocation)), grant_id
    )
    await hidden_grant(
        sam.ListLedgerEntries(grant_pb2.ListLedgerEntriesRequest(grant_id=grant_id)), grant_id
    )
    listed = await sam.ListGrants(grant_pb2.ListGrantsRequest())
    assert list(listed.grants) == []


@pytest.mark.timeout(120)
async def test_sub_project_member_cannot_delegate(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    sam = grant_service.stub("sam", ["researcher", "pi"], "uni-a")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    child = delegate(delegated.grant_id, "proj-a-sub")
    child.parent_sub_allocation_id = delegated.sub_project_allocation
    await hidden_grant(sam.CreateSubAllocation(child), delegated.grant_id)
    everything = await alice.ListSubAllocations(list_request(delegated.grant_id))
    assert len(everything.sub_allocations) == 2
    listed = await sam.ListSubAllocations(list_request(delegated.grant_id))
    assert [s.sub_allocation_id for s in listed.sub_allocations] == [
        delegated.sub_project_allocation
    ]
    balance = await sam.GetBalance(
        balance_request(delegated.grant_id, delegated.sub_project_allocation)
    )
    assert balance.delegated_pf_days.value == "0"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("subject", ["vera", "mallory"])
async def test_sub_allocation_hidden_from_others(
    grant_service: RunningGrant, delegated: Delegated, subject: str
) -> None:
    """A viewer of the sub-project cannot draw, and a stranger is no member at all."""
    caller = grant_service.stub(subject, ["researcher"], "uni-a")
    grant_id = delegated.grant_id
    await hidden_grant(
        caller.GetBalance(balance_request(grant_id, delegated.sub_project_allocation)), grant_id
    )
    await hidden_grant(
        caller.CheckFunds(funds_request(grant_id, delegated.sub_project_allocation)), grant_id
    )
    await hidden_grant(caller.ListSubAllocations(list_request(grant_id)), grant_id)


@pytest.mark.timeout(120)
async def test_holder_named_like_project_hidden(grant_service: RunningGrant) -> None:
    """A member holder named like another PI's project gives that project's members nothing."""
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    eve = await create_eve_project(grant_service)
    await alice.AddProjectMember(
        grant_pb2.AddProjectMemberRequest(
            request_id=rid(),
            project_id="proj-a",
            member=grant_pb2.ProjectMember(subject="proj-e", role=grant_pb2.PROJECT_ROLE_MEMBER),
        )
    )
    allocation = await alice.CreateSubAllocation(delegate(grant_id, "proj-e"))
    request = balance_request(grant_id, allocation.sub_allocation_id)
    await hidden_grant(eve.GetBalance(request), grant_id)
    await hidden_grant(eve.ListSubAllocations(list_request(grant_id)), grant_id)


@pytest.mark.timeout(120)
async def test_grant_without_its_allocation_hidden(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    """Another grant of the parent project, of which the sub-project holds nothing, is hidden."""
    other_grant = await standard_grant(grant_service, "50")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await alice.CreateSubAllocation(delegate(other_grant, "bob"))
    sam = grant_service.stub("sam", ["researcher"], "uni-a")
    await hidden_grant(sam.ListSubAllocations(list_request(other_grant)), other_grant)
    await hidden_grant(sam.GetBalance(balance_request(other_grant)), other_grant)
    listed = await sam.ListSubAllocations(list_request(delegated.grant_id))
    assert [s.sub_allocation_id for s in listed.sub_allocations] == [
        delegated.sub_project_allocation
    ]


def drawable_request() -> grant_pb2.ListSubAllocationsRequest:
    return grant_pb2.ListSubAllocationsRequest(caller_may_draw=True)


async def listed_ids(call: object) -> list[str]:
    reply = await call  # type: ignore[misc]
    return [s.sub_allocation_id for s in reply.sub_allocations]


@pytest.mark.timeout(120)
async def test_drawable_listed_without_grant_id(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    """Each caller lists, across grants, the sub-allocations their project roles draw on."""
    sam = grant_service.stub("sam", ["researcher"], "uni-a")
    bob = grant_service.stub("bob", ["researcher"], "uni-a")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    listed = await sam.ListSubAllocations(drawable_request())
    assert [s.sub_allocation_id for s in listed.sub_allocations] == [
        delegated.sub_project_allocation
    ]
    assert listed.sub_allocations[0].grant_id == delegated.grant_id
    assert listed.sub_allocations[0].holder == "proj-a-sub"
    assert listed.sub_allocations[0].balance.available_pf_days.value == "1"
    assert await listed_ids(bob.ListSubAllocations(drawable_request())) == [
        delegated.member_allocation
    ]
    assert sorted(await listed_ids(alice.ListSubAllocations(drawable_request()))) == sorted(
        [delegated.sub_project_allocation, delegated.member_allocation]
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("subject", ["vera", "mallory", "office"])
async def test_drawable_list_empty_for_others(
    grant_service: RunningGrant, delegated: Delegated, subject: str
) -> None:
    """A viewer draws on nothing, and the program office's role adds no project roles."""
    roles = ["program_office"] if subject == "office" else ["researcher"]
    caller = grant_service.stub(subject, roles, "uni-a")
    assert await listed_ids(caller.ListSubAllocations(drawable_request())) == []


@pytest.mark.timeout(120)
async def test_holder_listed_without_grant_id(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    """A holder's sub-allocations list across grants, each only to callers who may read it."""
    request = grant_pb2.ListSubAllocationsRequest(holder="proj-a-sub")
    scheduler = grant_service.stub("scheduler", ["service"])
    expected = [delegated.sub_project_allocation]
    for subject in ("sam", "bob", "alice"):
        caller = grant_service.stub(subject, ["researcher"], "uni-a")
        assert await listed_ids(caller.ListSubAllocations(request)) == expected, subject
    assert await listed_ids(scheduler.ListSubAllocations(request)) == expected
    for subject in ("vera", "mallory"):
        caller = grant_service.stub(subject, ["researcher"], "uni-a")
        assert await listed_ids(caller.ListSubAllocations(request)) == [], subject


@pytest.mark.timeout(120)
async def test_list_without_grant_or_filter_rejected(
    grant_service: RunningGrant, delegated: Delegated
) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    error = await rejected(alice.ListSubAllocations(grant_pb2.ListSubAllocationsRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("invalid grant_id: is missing")


@pytest.mark.timeout(120)
async def test_drawable_list_skips_ended_grants(
    grant_service: RunningGrant, delegated: Delegated, schema: str
) -> None:
    """A sub-allocation of a grant whose window has ended can no longer pay for a job."""
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    later = await standard_grant(grant_service, "50")
    open_allocation = await alice.CreateSubAllocation(delegate(later, "proj-a-sub"))
    await end_grant_window(schema, delegated.grant_id)
    for subject in ("sam", "bob", "alice"):
        caller = grant_service.stub(subject, ["researcher"], "uni-a")
        listed = await listed_ids(caller.ListSubAllocations(drawable_request()))
        expected = [] if subject == "bob" else [open_allocation.sub_allocation_id]
        assert listed == expected, subject
    # Without caller_may_draw, the ended grant's sub-allocations still list.
    everything = await alice.ListSubAllocations(list_request(delegated.grant_id))
    assert len(everything.sub_allocations) == 2
