"""``acsp grants list`` and ``balance`` for sub-allocations, against a running grant service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acsp.v1 import grant_pb2
from services.grant.errors import InvalidArgument
from services.grant.rpc_ledger import LedgerHandlers
from tests.grant.service_helpers import running_grant
from tests.grant.test_cli import run_cli, use_identity
from tests.grant.test_holders_and_names import create_project
from tests.grant.test_service_rpc import setup_project, standard_grant
from tests.grant.test_sub_allocation_balance import CHARGE, delegate, hold_and_charge


@pytest.mark.timeout(120)
async def test_cli_lists_drawable_sub_allocations(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "100")
        alice = svc.stub("alice", ["pi"], "uni-a")
        await create_project(alice, "proj-a-sub", "alice", {"carol": grant_pb2.PROJECT_ROLE_MEMBER})
        await alice.CreateSubAllocation(delegate(grant_id, "bob", "1"))
        to_sub = await alice.CreateSubAllocation(delegate(grant_id, "proj-a-sub", "2"))
        sub_id = to_sub.sub_allocation_id

        use_identity(monkeypatch, svc, "carol", ["researcher"])
        code, table, err = await run_cli(capsys, "list")
        assert code == 0, err
        code, grants_json, err = await run_cli(capsys, "list", "--format", "json")
        assert code == 0, err
        code, drawable_json, err = await run_cli(
            capsys, "list", "--sub-allocations", "--format", "json"
        )
        assert code == 0, err

    assert "sub-allocations you may draw on" in table
    assert grant_id in table
    assert sub_id in table
    assert grants_json == ""
    [record] = map(json.loads, drawable_json.splitlines())
    assert record == {
        "grant": grant_id,
        "sub_allocation": sub_id,
        "holder": "proj-a-sub",
        "available": "2",
        "held": "0",
        "charged": "0",
        "credited": "2",
    }


@pytest.mark.timeout(120)
async def test_cli_balance_shows_delegated(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "100")
        alice = svc.stub("alice", ["pi"], "uni-a")
        await alice.CreateSubAllocation(delegate(grant_id, "bob", "1"))
        to_bob = await alice.CreateSubAllocation(delegate(grant_id, "bob", "2"))
        await hold_and_charge(svc, grant_id, to_bob.sub_allocation_id, "0.5", CHARGE)

        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, out, err = await run_cli(capsys, "balance", grant_id, "--format", "json")
        assert code == 0, err
        code, shown, err = await run_cli(capsys, "show", grant_id, "--format", "json")
        assert code == 0, err

    fields = {row["field"]: row["value"] for row in map(json.loads, out.splitlines())}
    assert fields["delegated PF-days"] == "3"
    assert fields["sub-allocations charged PF-days"] == CHARGE
    assert fields["sub-allocations held PF-days"] == "0.499999960798826388888888"
    assert fields["sub-allocations available PF-days"] == "2.5"
    assert fields["charged PF-days"] == CHARGE
    assert fields["available PF-days"] == "97"
    grant = json.loads(shown)
    assert grant["delegated_pf_days"] == "3"
    assert grant["sub_allocations_charged_pf_days"] == CHARGE
    assert grant["sub_allocations_available_pf_days"] == "2.5"


@pytest.mark.timeout(120)
async def test_cli_list_against_older_service(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grant service older than caller_may_draw rejects a list without a grant id, and the
    table of grants still prints, without the sub-allocations that --sub-allocations requests."""

    async def reject_missing_grant_id(
        self: LedgerHandlers, request: grant_pb2.ListSubAllocationsRequest, context: object
    ) -> grant_pb2.ListSubAllocationsResponse:
        raise InvalidArgument("grant_id", "is missing", "name the grant")

    # The service binds its handlers when it starts.
    monkeypatch.setattr(LedgerHandlers, "ListSubAllocations", reject_missing_grant_id)
    async with running_grant(schema, tmp_path) as svc:
        await setup_project(svc)
        grant_id = await standard_grant(svc, "100")
        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, table, err = await run_cli(capsys, "list")
        requested_code, _, requested_err = await run_cli(capsys, "list", "--sub-allocations")

    assert code == 0, err
    assert grant_id in table
    assert "sub-allocations you may draw on" not in table
    assert requested_code == 2
    assert "invalid grant_id: is missing" in requested_err
