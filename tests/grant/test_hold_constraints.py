"""Holds outside a grant's provider, region and model constraints are refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2
from services.grant.constraints import OUTSIDE_CONSTRAINTS, OutsideConstraints, Placement
from services.grant.ledger import Ledger
from services.grant.ledger_ops import Cause, EntryResult, HoldRequest
from services.runtime.db import Database
from tests.grant.conftest import grant_row, postings_sum, seed_grant, seed_project
from tests.grant.service_helpers import running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant

SCHEDULER = Cause(actor="scheduler", trigger="test")


def held(grant_id: str | None, placement: Placement, project_id: str | None = None) -> HoldRequest:
    return HoldRequest(
        key=uuid.uuid4().hex,
        grant_id=grant_id,
        project_id=project_id,
        allocation_id=None,
        job_id="job-1",
        amount=Decimal("1"),
        cause=SCHEDULER,
        placement=placement,
    )


async def test_hold_outside_constraints_refused(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    grant_id = await seed_grant(
        db, "10", providers=("cloud-a",), regions=("cloud-a/east",), accelerator_models=("h100",)
    )
    refused = {
        "model": Placement(("cloud-a/east",), "mi300x"),
        "provider": Placement(("cloud-b/east",), "h100"),
        "region": Placement(("cloud-a/west",), "h100"),
        "one task outside": Placement(("cloud-a/east", "cloud-a/west"), "h100"),
    }
    fields = {
        "model": "accelerator_model",
        "provider": "placement_regions",
        "region": "placement_regions",
        "one task outside": "placement_regions",
    }
    for case, placement in refused.items():
        [outcome] = await ledger.apply([held(grant_id, placement)])
        assert isinstance(outcome, OutsideConstraints), case
        assert outcome.field == fields[case], case
    [model] = await ledger.apply([held(grant_id, refused["model"])])
    [provider] = await ledger.apply([held(grant_id, refused["provider"])])
    row = await grant_row(db, grant_id)
    [inside] = await ledger.apply([held(grant_id, Placement(("cloud-a/east",), "h100"))])
    [unsaid] = await ledger.apply([held(grant_id, Placement())])

    assert "it allows h100" in str(model)
    assert "it allows providers cloud-a" in str(provider)
    assert row["held"] == 0
    assert row["available"] == 10
    assert isinstance(inside, EntryResult)
    assert isinstance(unsaid, EntryResult)
    assert await postings_sum(db) == 0


async def test_project_hold_picks_allowed_grant(db: Database, ledger: Ledger) -> None:
    await seed_project(db)
    now = datetime.now(UTC)
    soon = await seed_grant(
        db, "10", ends_at=now + timedelta(days=5), accelerator_models=("mi300x",)
    )
    later = await seed_grant(db, "10", ends_at=now + timedelta(days=50), providers=("cloud-a",))

    [first] = await ledger.apply([held(None, Placement(("cloud-a/east",), "h100"), "proj-a")])
    [second] = await ledger.apply([held(None, Placement(("cloud-b/east",), "mi300x"), "proj-a")])
    [neither] = await ledger.apply([held(None, Placement(("cloud-b/east",), "h100"), "proj-a")])

    assert isinstance(first, EntryResult)
    assert first.grant_id == later
    assert isinstance(second, EntryResult)
    assert second.grant_id == soon
    assert isinstance(neither, OutsideConstraints)
    assert f"grant {soon}" in str(neither)


@pytest.mark.timeout(120)
async def test_place_holds_reports_constraint_reason(schema: str, tmp_path: Path) -> None:
    constraints = grant_pb2.GrantConstraints(
        providers=["cloud-a"], accelerator_models=["H100-SXM5-80GB"]
    )
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "10", constraints)
        scheduler = svc.stub("scheduler", ["service"])
        holds = [
            grant_pb2.PlaceHoldRequest(
                request_id=f"job-{i}/1",
                grant_id=grant_id,
                job_id=f"job-{i}",
                amount_pf_days=common_pb2.Decimal(value="1"),
                placement_regions=[region],
                accelerator_model="H100-SXM5-80GB",
            )
            for i, region in enumerate(["cloud-a/east", "cloud-b/east", "no-slash"])
        ]
        response = await scheduler.PlaceHolds(grant_pb2.PlaceHoldsRequest(holds=holds))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.PlaceHold(holds[1])
    placed, outside, malformed = response.results
    assert placed.code == 0
    assert outside.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert outside.reason == OUTSIDE_CONSTRAINTS
    assert "provider 'cloud-b'" in outside.message
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "holds[2].placement_regions[0]" in malformed.message
    assert malformed.reason == ""
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "placement_regions" in (caught.value.details() or "")
