"""ExpireGrants is idempotent by request id, like the grant service's other mutating calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from acsp.v1 import grant_pb2
from services.runtime.errors import field_violations
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_input_checks import apply_request, rejected
from tests.grant.test_service_rpc import setup_project

GRANT_WINDOW = timedelta(seconds=2)
"""How long the test grants stay open, so they can be expired within the test."""


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    # The background scan must not expire the test grants before the calls under test do.
    extra = {"ACSP_GRANT_EXPIRY_INTERVAL_S": "3600"}
    async with running_grant(schema, tmp_path, extra) as running:
        await setup_project(running)
        yield running


async def ended_grant(svc: RunningGrant) -> str:
    """Award an exploratory grant whose window ends in two seconds, and wait until it has ended."""
    alice = svc.stub("alice", ["pi"], "uni-a")
    request = apply_request("10")
    ends_at = datetime.now(UTC) + GRANT_WINDOW
    request.application.validity.end_time.FromDatetime(ends_at)
    application = await alice.SubmitApplication(request)
    assert application.grant_id
    # Waiting for the clock, not for a condition that polling could see sooner.
    await asyncio.sleep((ends_at - datetime.now(UTC)).total_seconds() + 0.05)
    return application.grant_id


async def grant_state(svc: RunningGrant, grant_id: str) -> int:
    office = svc.stub("office", ["program_office"])
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    return grant.state


@pytest.mark.timeout(120)
async def test_expire_retry_returns_first_result(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    first_grant = await ended_grant(grant_service)
    request = grant_pb2.ExpireGrantsRequest(request_id="expire-1")
    racing = await asyncio.gather(*(office.ExpireGrants(request) for _ in range(3)))
    for response in racing:
        assert list(response.grant_ids) == [first_grant]
        assert response.returned_pf_days.value == racing[0].returned_pf_days.value
    second_grant = await ended_grant(grant_service)
    retried = await office.ExpireGrants(request)
    assert list(retried.grant_ids) == [first_grant]
    assert retried.returned_pf_days == racing[0].returned_pf_days
    assert await grant_state(grant_service, second_grant) == grant_pb2.GRANT_STATE_ACTIVE
    fresh = await office.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id="expire-2"))
    assert list(fresh.grant_ids) == [second_grant]
    assert await grant_state(grant_service, second_grant) == grant_pb2.GRANT_STATE_EXPIRED


@pytest.mark.timeout(120)
async def test_expire_request_id_reuse_rejected(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    await office.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id="expire-1"))
    grant_id = await ended_grant(grant_service)
    reused = grant_pb2.ExpireGrantsRequest(request_id="expire-1")
    reused.as_of_time.FromDatetime(datetime.now(UTC))
    error = await rejected(office.ExpireGrants(reused))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (error.details() or "")
    assert "as_of_time unset" in (error.details() or "")
    assert await grant_state(grant_service, grant_id) == grant_pb2.GRANT_STATE_ACTIVE


@pytest.mark.timeout(120)
async def test_expire_request_id_scoped_to_caller(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    other_office = grant_service.stub("olga", ["program_office"])
    await office.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id="expire-1"))
    grant_id = await ended_grant(grant_service)
    theirs = await other_office.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id="expire-1"))
    assert list(theirs.grant_ids) == [grant_id]


@pytest.mark.timeout(120)
async def test_expire_request_id_required(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    grant_id = await ended_grant(grant_service)
    error = await rejected(office.ExpireGrants(grant_pb2.ExpireGrantsRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in field_violations(error)
    assert await grant_state(grant_service, grant_id) == grant_pb2.GRANT_STATE_ACTIVE
