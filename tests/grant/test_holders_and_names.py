"""Sub-allocation holders, member names and country codes, against the real grant service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import grant_pb2, grant_pb2_grpc
from services.runtime.errors import field_violations
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_input_checks import create_eve_project, rejected
from tests.grant.test_service_rpc import dec, rid, setup_project, standard_grant

Stub = grant_pb2_grpc.GrantServiceStub


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    async with running_grant(schema, tmp_path) as running:
        await setup_project(running)
        yield running


def delegate(grant_id: str, holder: str) -> grant_pb2.CreateSubAllocationRequest:
    return grant_pb2.CreateSubAllocationRequest(
        request_id=rid(), grant_id=grant_id, holder=holder, amount_pf_days=dec("1")
    )


async def holders(pi: Stub, grant_id: str) -> list[str]:
    listed = await pi.ListSubAllocations(grant_pb2.ListSubAllocationsRequest(grant_id=grant_id))
    return [s.holder for s in listed.sub_allocations]


async def create_project(
    stub: Stub, project_id: str, pi: str, members: dict[str, int] | None = None
) -> grant_pb2.Project:
    return await stub.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id=rid(),
            project=grant_pb2.Project(
                project_id=project_id,
                institution_id="uni-a",
                display_name=project_id,
                pi_subject=pi,
                members=[
                    grant_pb2.ProjectMember(subject=s, role=r)  # type: ignore[arg-type]
                    for s, r in (members or {}).items()
                ],
            ),
        )
    )


@pytest.mark.timeout(120)
async def test_unknown_holder_not_found(grant_service: RunningGrant) -> None:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    before = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    error = await rejected(alice.CreateSubAllocation(delegate(grant_id, "nobody")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    message = error.details() or ""
    assert "holder 'nobody' not found" in message
    assert "member of project 'proj-a'" in message
    assert "acsp grants member" in message
    after = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    assert after.entry_count == before.entry_count
    assert await holders(alice, grant_id) == []


@pytest.mark.timeout(120)
async def test_other_pi_project_reads_as_missing(grant_service: RunningGrant) -> None:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await create_eve_project(grant_service)
    hidden = await rejected(alice.CreateSubAllocation(delegate(grant_id, "proj-e")))
    missing = await rejected(alice.CreateSubAllocation(delegate(grant_id, "proj-z")))
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    assert (hidden.details() or "").replace("proj-e", "proj-z") == missing.details()
    assert await holders(alice, grant_id) == []


@pytest.mark.timeout(120)
async def test_members_and_sub_projects_hold(grant_service: RunningGrant) -> None:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await create_project(alice, "proj-a-sub", "alice")
    for holder in ("bob", "alice", "proj-a-sub"):
        created = await alice.CreateSubAllocation(delegate(grant_id, holder))
        assert created.holder == holder
    assert sorted(await holders(alice, grant_id)) == ["alice", "bob", "proj-a-sub"]


@pytest.mark.timeout(120)
async def test_viewer_holder_rejected(grant_service: RunningGrant) -> None:
    grant_id = await standard_grant(grant_service, "100")
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await alice.AddProjectMember(
        grant_pb2.AddProjectMemberRequest(
            request_id=rid(),
            project_id="proj-a",
            member=grant_pb2.ProjectMember(subject="vic", role=grant_pb2.PROJECT_ROLE_VIEWER),
        )
    )
    error = await rejected(alice.CreateSubAllocation(delegate(grant_id, "vic")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = error.details() or ""
    assert message.startswith("holder:")
    assert "viewer" in message
    assert "--role member" in message
    assert await holders(alice, grant_id) == []


BAD_MEMBER_NAMES = {
    "space": ("bad name", "not a valid principal name"),
    "leading dot": (".alice", "not a valid principal name"),
    "slash": ("alice/bob", "not a valid principal name"),
    "too long": ("a" * 129, "not a valid principal name"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_MEMBER_NAMES))
async def test_bad_member_names_rejected(grant_service: RunningGrant, case: str) -> None:
    name, reason = BAD_MEMBER_NAMES[case]
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    created = await rejected(
        create_project(alice, "proj-n", "alice", {name: grant_pb2.PROJECT_ROLE_MEMBER})
    )
    assert created.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(created)["project.members[0].subject"]
    added = await rejected(
        alice.AddProjectMember(
            grant_pb2.AddProjectMemberRequest(
                request_id=rid(),
                project_id="proj-a",
                member=grant_pb2.ProjectMember(subject=name, role=grant_pb2.PROJECT_ROLE_MEMBER),
            )
        )
    )
    assert added.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(added)["member.subject"]
    pi = await rejected(create_project(office, "proj-n", name))
    assert pi.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(pi)["project.pi_subject"]
    listed = await office.ListProjects(grant_pb2.ListProjectsRequest())
    assert [p.project_id for p in listed.projects] == ["proj-a"]
    project = await office.GetProject(grant_pb2.GetProjectRequest(project_id="proj-a"))
    assert sorted(m.subject for m in project.members) == ["alice", "bob"]


@pytest.mark.timeout(120)
async def test_good_member_names_accepted(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    names = {"alice@uni.example": 1, "b.o_b-2": 1, "Carol+lab": 2, "a" * 128: 1}
    project = await create_project(alice, "proj-g", "alice", names)
    assert sorted(m.subject for m in project.members) == sorted([*names, "alice"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("code", "reason"),
    [("", "is missing"), ("XX", "not an assigned ISO 3166-1 alpha-2"), ("UK", "assigned")],
)
async def test_bad_country_codes_rejected(
    grant_service: RunningGrant, code: str, reason: str
) -> None:
    office = grant_service.stub("office", ["program_office"])
    institution = grant_pb2.Institution(
        institution_id="uni-z", display_name="University Z", country_code=code
    )
    error = await rejected(
        office.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(request_id=rid(), institution=institution)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(error)["institution.country_code"]
    missing = await rejected(
        office.GetInstitution(grant_pb2.GetInstitutionRequest(institution_id="uni-z"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(120)
async def test_assigned_country_code_stored(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    institution = grant_pb2.Institution(
        institution_id="uni-g", display_name="University G", country_code="gb"
    )
    stored = await office.CreateInstitution(
        grant_pb2.CreateInstitutionRequest(request_id=rid(), institution=institution)
    )
    assert stored.country_code == "GB"
