"""Bad input to the grant service over gRPC gets its status, names its field and writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from acsp.v1 import grant_pb2, grant_pb2_grpc
from services.runtime.db import quote_ident
from services.runtime.errors import field_violations
from tests.grant.conftest import TEST_DSN
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import application, dec, rid, setup_project, standard_grant

EXPLORATORY = grant_pb2.GRANT_TIER_EXPLORATORY
STANDARD = grant_pb2.GRANT_TIER_STANDARD
Stub = grant_pb2_grpc.GrantServiceStub


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    async with running_grant(schema, tmp_path) as running:
        await setup_project(running)
        yield running


async def create_eve_project(svc: RunningGrant) -> Stub:
    """Create project proj-e, whose PI eve is at uni-b, and return eve's stub."""
    eve = svc.stub("eve", ["pi"], "uni-b")
    await eve.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id=rid(),
            project=grant_pb2.Project(
                project_id="proj-e",
                institution_id="uni-b",
                display_name="Project E",
                pi_subject="eve",
            ),
        )
    )
    return eve


async def application_ids(svc: RunningGrant, project_id: str) -> list[str]:
    office = svc.stub("office", ["program_office"])
    listed = await office.ListApplications(grant_pb2.ListApplicationsRequest(project_id=project_id))
    return [a.application_id for a in listed.applications]


def apply_request(
    amount: str, request_id: str = "", tier: int = EXPLORATORY, project_id: str = "proj-a"
) -> grant_pb2.SubmitApplicationRequest:
    message = application(tier, amount)
    message.project_id = project_id
    return grant_pb2.SubmitApplicationRequest(request_id=request_id or rid(), application=message)


async def rejected(call: object) -> grpc.aio.AioRpcError:
    """Await a call that must fail and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


@pytest.mark.timeout(120)
async def test_application_request_id_scoped_to_caller(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    eve = await create_eve_project(grant_service)
    first = await alice.SubmitApplication(apply_request("2", "shared-1"))
    theirs = await eve.SubmitApplication(apply_request("3", "shared-1", project_id="proj-e"))
    assert theirs.application_id != first.application_id
    assert theirs.project_id == "proj-e"
    assert theirs.applicant_subject == "eve"
    assert theirs.grant_id != first.grant_id
    assert theirs.requested_pf_days.value == "3"
    assert await application_ids(grant_service, "proj-e") == [theirs.application_id]


@pytest.mark.timeout(120)
async def test_application_retry_returns_first(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    request = apply_request("2", "retry-1")
    first = await alice.SubmitApplication(request)
    again = await alice.SubmitApplication(request)
    assert again.application_id == first.application_id
    assert again.grant_id == first.grant_id
    assert await application_ids(grant_service, "proj-a") == [first.application_id]


@pytest.mark.timeout(120)
async def test_application_retry_other_body_rejected(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    first = await alice.SubmitApplication(apply_request("2", "retry-2"))
    error = await rejected(alice.SubmitApplication(apply_request("3", "retry-2")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (error.details() or "")
    assert first.application_id in (error.details() or "")
    assert await application_ids(grant_service, "proj-a") == [first.application_id]


@pytest.mark.timeout(120)
async def test_project_request_id_scoped_to_creator(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    mallory = grant_service.stub("mallory", ["pi"], "uni-a")
    request = grant_pb2.CreateProjectRequest(
        request_id="project-1",
        project=grant_pb2.Project(
            project_id="proj-m", institution_id="uni-a", display_name="M", pi_subject="alice"
        ),
    )
    created = await alice.CreateProject(request)
    assert (await alice.CreateProject(request)).project_id == created.project_id
    request.project.pi_subject = "mallory"
    error = await rejected(mallory.CreateProject(request))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "alice" not in (error.details() or "")


@pytest.mark.timeout(120)
async def test_decision_retry_checked(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    other_office = grant_service.stub("olga", ["program_office"])
    app = await alice.SubmitApplication(apply_request("50", tier=STANDARD))
    decide = grant_pb2.DecideApplicationRequest(
        request_id="decide-1",
        application_id=app.application_id,
        decision=grant_pb2.Decision(
            outcome=grant_pb2.DECISION_OUTCOME_REJECT, reason="out of scope"
        ),
    )
    await office.DecideApplication(decide)
    again = await office.DecideApplication(decide)
    assert again.state == grant_pb2.APPLICATION_STATE_REJECTED
    by_other = await rejected(other_office.DecideApplication(decide))
    assert by_other.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already decided" in (by_other.details() or "")
    decide.decision.reason = "changed my mind"
    changed = await rejected(office.DecideApplication(decide))
    assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (changed.details() or "")


@pytest.mark.timeout(120)
async def test_supplement_request_id_checked(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    first = await standard_grant(grant_service, "100")
    second = await standard_grant(grant_service, "100")
    supplement = grant_pb2.SupplementGrantRequest(
        request_id="supplement-1", grant_id=first, amount_pf_days=dec("20"), reason="more runs"
    )
    await office.SupplementGrant(supplement)
    supplement.grant_id = second
    error = await rejected(office.SupplementGrant(supplement))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (error.details() or "")
    untouched = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=second))
    assert untouched.balance.credited_pf_days.value == "100"
    assert not untouched.supplemented


@pytest.mark.timeout(120)
async def test_sub_allocation_request_id_scoped(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    eve = await create_eve_project(grant_service)
    alice_grant = (await alice.SubmitApplication(apply_request("5"))).grant_id
    eve_grant = (await eve.SubmitApplication(apply_request("5", project_id="proj-e"))).grant_id
    request = grant_pb2.CreateSubAllocationRequest(
        request_id="sub-1", grant_id=alice_grant, holder="bob", amount_pf_days=dec("1")
    )
    mine = await alice.CreateSubAllocation(request)
    assert (await alice.CreateSubAllocation(request)).sub_allocation_id == mine.sub_allocation_id
    theirs = await eve.CreateSubAllocation(
        grant_pb2.CreateSubAllocationRequest(
            request_id="sub-1", grant_id=eve_grant, holder="eve", amount_pf_days=dec("1")
        )
    )
    assert theirs.sub_allocation_id != mine.sub_allocation_id
    assert theirs.grant_id == eve_grant
    request.amount_pf_days.value = "2"
    error = await rejected(alice.CreateSubAllocation(request))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (error.details() or "")
    balance = await alice.GetBalance(grant_pb2.GetBalanceRequest(grant_id=alice_grant))
    assert balance.delegated_pf_days.value == "1"


async def outcomes(calls: list[Any]) -> list[str]:
    """Await calls at once and return each one's status code name, "OK" for a success."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    names = []
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            names.append(result.code().name)
        elif isinstance(result, BaseException):
            raise result
        else:
            names.append("OK")
    return names


@pytest.mark.timeout(120)
async def test_racing_retries_return_first(grant_service: RunningGrant) -> None:
    """Copies of one request sent at once all get the first one's result."""
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    grant_id = await standard_grant(grant_service, "100")
    create = grant_pb2.CreateSubAllocationRequest(
        request_id="sub-race", grant_id=grant_id, holder="bob", amount_pf_days=dec("1")
    )
    created = await asyncio.gather(*(alice.CreateSubAllocation(create) for _ in range(6)))
    assert len({c.sub_allocation_id for c in created}) == 1
    supplement = grant_pb2.SupplementGrantRequest(
        request_id="supplement-race", grant_id=grant_id, amount_pf_days=dec("10"), reason="more"
    )
    supplemented = await asyncio.gather(*(office.SupplementGrant(supplement) for _ in range(6)))
    assert {s.balance.credited_pf_days.value for s in supplemented} == {"110"}
    balance = await alice.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    assert balance.delegated_pf_days.value == "1"
    assert balance.credited_pf_days.value == "110"
    assert balance.available_pf_days.value == "109"


@pytest.mark.timeout(120)
async def test_racing_key_reuse_named(grant_service: RunningGrant) -> None:
    """One request id sent at once for two grants applies once and names request_id once."""
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    grants = [await standard_grant(grant_service, "100") for _ in range(2)]

    def create(grant_id: str) -> Any:
        return alice.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id="sub-shared", grant_id=grant_id, holder="bob", amount_pf_days=dec("1")
            )
        )

    def supplement(grant_id: str) -> Any:
        return office.SupplementGrant(
            grant_pb2.SupplementGrantRequest(
                request_id="supplement-shared",
                grant_id=grant_id,
                amount_pf_days=dec("10"),
                reason="more",
            )
        )

    for make in (create, supplement):
        assert sorted(await outcomes([make(g) for g in grants])) == ["FAILED_PRECONDITION", "OK"]
    summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    # Two awards, one transfer and one supplement.
    assert summary.entry_count == 4
    assert summary.postings_sum_pf_days.value == "0"


@pytest.mark.timeout(120)
async def test_exploratory_limit_per_project(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    first = await alice.SubmitApplication(apply_request("6"))
    second = await alice.SubmitApplication(apply_request("4"))
    assert second.state == grant_pb2.APPLICATION_STATE_AWARDED
    error = await rejected(alice.SubmitApplication(apply_request("1")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = error.details() or ""
    assert "application.requested_pf_days" in message
    assert first.grant_id in message
    assert second.grant_id in message
    assert "standard tier" in message
    assert len(await application_ids(grant_service, "proj-a")) == 2
    eve = await create_eve_project(grant_service)
    other = await eve.SubmitApplication(apply_request("10", project_id="proj-e"))
    assert other.state == grant_pb2.APPLICATION_STATE_AWARDED


@pytest.mark.timeout(120)
async def test_exploratory_limit_under_concurrency(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    calls = [alice.SubmitApplication(apply_request("6")) for _ in range(4)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    awarded = [o for o in outcomes if isinstance(o, grant_pb2.Application)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(awarded) == 1
    assert [e.code() for e in refused] == [grpc.StatusCode.FAILED_PRECONDITION] * 3
    assert await application_ids(grant_service, "proj-a") == [awarded[0].application_id]


@pytest.fixture
async def grant_service_without_scan(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    """The grant service with its background expiry scan an hour apart."""
    # The scan must not expire a test grant before the ExpireGrants call under test does.
    extra = {"ACSP_GRANT_EXPIRY_INTERVAL_S": "3600"}
    async with running_grant(schema, tmp_path, extra) as running:
        await setup_project(running)
        yield running


async def end_grant_window(schema: str, grant_id: str) -> None:
    """Move a grant's window end one second into the past, as if its window had run out.

    ExpireGrants rejects an ``as_of_time`` in the future, so a test that must not wait for a
    window to end moves the end instead.
    """
    conn = await asyncpg.connect(TEST_DSN, timeout=10)
    try:
        updated = await conn.execute(
            f"UPDATE {quote_ident(schema)}.grants "
            "SET starts_at = least(starts_at, now() - interval '2 seconds'), "
            "ends_at = now() - interval '1 second' WHERE id = $1",
            grant_id,
        )
    finally:
        await conn.close()
    assert updated == "UPDATE 1"


@pytest.mark.timeout(120)
async def test_exploratory_limit_frees_after_expiry(
    grant_service_without_scan: RunningGrant, schema: str
) -> None:
    service = grant_service_without_scan
    alice = service.stub("alice", ["pi"], "uni-a")
    office = service.stub("office", ["program_office"])
    # An hour-long window outlasts any slow call, so the second application meets a live grant.
    request = apply_request("10")
    request.application.validity.end_time.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    first = await alice.SubmitApplication(request)
    assert first.grant_id
    await rejected(alice.SubmitApplication(apply_request("10")))

    await end_grant_window(schema, first.grant_id)
    expired = await office.ExpireGrants(grant_pb2.ExpireGrantsRequest(request_id=rid()))
    assert list(expired.grant_ids) == [first.grant_id]
    again = await alice.SubmitApplication(apply_request("10"))
    assert again.state == grant_pb2.APPLICATION_STATE_AWARDED


BAD_APPLICATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "year 1": ("application.validity.start_time", {"start": datetime(1, 1, 2, tzinfo=UTC)}),
    "year 9999": ("application.validity.end_time", {"end": datetime(9999, 12, 31, tzinfo=UTC)}),
    "ended": ("application.validity.end_time", {"end": datetime.now(UTC) - timedelta(minutes=1)}),
    "too long": (
        "application.validity.end_time",
        {"end": datetime.now(UTC) + timedelta(days=1828)},
    ),
    "unknown model": ("application.accelerator_models[1]", {"models": ["H800", "NOPE"]}),
    "unknown region": ("application.regions[0]", {"regions": ["nope"]}),
    "empty region": ("application.regions[0]", {"regions": ["cloud-a/"]}),
    "control character": ("application.justification", {"justification": "ok\x00"}),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_APPLICATIONS))
async def test_bad_application_rejected(grant_service: RunningGrant, case: str) -> None:
    field, change = BAD_APPLICATIONS[case]
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    request = apply_request("2", tier=STANDARD)
    message = request.application
    if "start" in change:
        message.validity.start_time.FromDatetime(change["start"])
    if "end" in change:
        message.validity.end_time.FromDatetime(change["end"])
    message.accelerator_models.extend(change.get("models", []))
    message.regions.extend(change.get("regions", []))
    if "justification" in change:
        message.justification = change["justification"]
    error = await rejected(alice.SubmitApplication(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    assert await application_ids(grant_service, "proj-a") == []


@pytest.mark.timeout(120)
async def test_good_application_fields_accepted(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    request = apply_request("2", tier=STANDARD)
    request.application.accelerator_models.append("H100-SXM5-80GB")
    request.application.regions.append("cloud-a/us-east")
    request.application.justification = "line one\nline two\twith a tab"
    submitted = await alice.SubmitApplication(request)
    assert list(submitted.accelerator_models) == ["H100-SXM5-80GB"]
    assert list(submitted.regions) == ["cloud-a/us-east"]
    assert submitted.justification == "line one\nline two\twith a tab"


@pytest.mark.timeout(120)
async def test_decision_constraints_checked(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    app = await alice.SubmitApplication(apply_request("50", tier=STANDARD))
    error = await rejected(
        office.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=rid(),
                application_id=app.application_id,
                decision=grant_pb2.Decision(
                    outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="good"
                ),
                constraints=grant_pb2.GrantConstraints(accelerator_models=["NOPE"]),
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "constraints.accelerator_models[0]" in field_violations(error)


BAD_PROVIDER_CONSTRAINTS = {
    "space": (
        grant_pb2.GrantConstraints(providers=["bad id!"]),
        "constraints.providers[0]",
        "is not a provider id",
    ),
    "slash": (
        grant_pb2.GrantConstraints(providers=["cloud-a", "cloud-b/us-east"]),
        "constraints.providers[1]",
        "is not a provider id",
    ),
    "region of another provider": (
        grant_pb2.GrantConstraints(providers=["cloud-a"], regions=["cloud-b/us-east"]),
        "constraints.regions[0]",
        "is of provider 'cloud-b', which is not among the providers cloud-a",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_PROVIDER_CONSTRAINTS))
async def test_decision_providers_checked(grant_service: RunningGrant, case: str) -> None:
    constraints, field, reason = BAD_PROVIDER_CONSTRAINTS[case]
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    app = await alice.SubmitApplication(apply_request("50", tier=STANDARD))
    error = await rejected(
        office.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=rid(),
                application_id=app.application_id,
                decision=grant_pb2.Decision(
                    outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="good"
                ),
                constraints=constraints,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(error)[field]
    after = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=app.application_id)
    )
    assert after.state == grant_pb2.APPLICATION_STATE_SUBMITTED
    assert after.grant_id == ""


@pytest.mark.timeout(120)
async def test_decision_providers_accepted(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    constraints = grant_pb2.GrantConstraints(
        providers=["cloud-a", "cloud_b"], regions=["cloud-a/us-east", "cloud_b/eu-1"]
    )
    grant_id = await standard_grant(grant_service, "100", constraints)
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    assert list(grant.constraints.providers) == ["cloud-a", "cloud_b"]
    assert list(grant.constraints.regions) == ["cloud-a/us-east", "cloud_b/eu-1"]


@pytest.mark.timeout(120)
async def test_extend_end_checked(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    grant_id = await standard_grant(grant_service, "100")
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    start = grant.validity.start_time.ToDatetime(tzinfo=UTC)
    for end in (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), start + timedelta(days=1828)):
        extend = grant_pb2.ExtendGrantRequest(request_id=rid(), grant_id=grant_id, reason="x")
        extend.new_end_time.FromDatetime(end)
        error = await rejected(office.ExtendGrant(extend))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "new_end_time" in field_violations(error)
    after = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    assert after.validity.end_time == grant.validity.end_time


@pytest.mark.timeout(120)
async def test_extend_request_id_checked(grant_service: RunningGrant) -> None:
    office = grant_service.stub("office", ["program_office"])
    grant_id = await standard_grant(grant_service, "100")
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    end = grant.validity.end_time.ToDatetime(tzinfo=UTC)

    def extend(request_id: str, days: int) -> grant_pb2.ExtendGrantRequest:
        message = grant_pb2.ExtendGrantRequest(
            request_id=request_id, grant_id=grant_id, reason="delays"
        )
        message.new_end_time.FromDatetime(end + timedelta(days=days))
        return message

    async def current_end() -> datetime:
        grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
        return grant.validity.end_time.ToDatetime(tzinfo=UTC)

    racing = await asyncio.gather(*(office.ExtendGrant(extend("extend-1", 10)) for _ in range(4)))
    assert {g.validity.end_time.ToDatetime(tzinfo=UTC) for g in racing} == {
        end + timedelta(days=10)
    }
    await office.ExtendGrant(extend("extend-2", 20))
    # A late retry of the first extension succeeds and leaves the later end alone.
    retried = await office.ExtendGrant(extend("extend-1", 10))
    assert retried.validity.end_time.ToDatetime(tzinfo=UTC) == end + timedelta(days=20)
    error = await rejected(office.ExtendGrant(extend("extend-1", 30)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (error.details() or "")
    assert await current_end() == end + timedelta(days=20)


BAD_NAMES = {
    "bell": ("A\x07B", "control character U+0007"),
    "newline": ("A\nB", "control character U+000A"),
    "escape": ("\x1b[31mred", "control character U+001B"),
    "too long": ("x" * 201, "maximum of 200"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_NAMES))
async def test_bad_names_rejected(grant_service: RunningGrant, case: str) -> None:
    name, reason = BAD_NAMES[case]
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    project = await rejected(
        alice.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=rid(),
                project=grant_pb2.Project(
                    project_id="proj-n",
                    institution_id="uni-a",
                    display_name=name,
                    pi_subject="alice",
                ),
            )
        )
    )
    assert project.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in field_violations(project)["project.display_name"]
    institution = await rejected(
        office.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(
                request_id=rid(),
                institution=grant_pb2.Institution(institution_id="uni-n", display_name=name),
            )
        )
    )
    assert institution.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "institution.display_name" in field_violations(institution)
    listed = await office.ListProjects(grant_pb2.ListProjectsRequest())
    assert [p.project_id for p in listed.projects] == ["proj-a"]


@pytest.mark.timeout(120)
async def test_remove_non_member_not_found(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    error = await rejected(
        alice.RemoveProjectMember(
            grant_pb2.RemoveProjectMemberRequest(
                request_id=rid(), project_id="proj-a", subject="nobody"
            )
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in (error.details() or "")
    removed = await alice.RemoveProjectMember(
        grant_pb2.RemoveProjectMemberRequest(request_id=rid(), project_id="proj-a", subject="bob")
    )
    assert [m.subject for m in removed.members] == ["alice"]


@pytest.mark.timeout(120)
async def test_remove_member_retry_succeeds(grant_service: RunningGrant) -> None:
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    removal = grant_pb2.RemoveProjectMemberRequest(
        request_id=rid(), project_id="proj-a", subject="bob"
    )
    first = await alice.RemoveProjectMember(removal)
    retried = await alice.RemoveProjectMember(removal)
    assert [m.subject for m in first.members] == ["alice"]
    assert [m.subject for m in retried.members] == ["alice"]

    reused = await rejected(
        alice.RemoveProjectMember(
            grant_pb2.RemoveProjectMemberRequest(
                request_id=removal.request_id, project_id="proj-a", subject="carol"
            )
        )
    )
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already removed 'bob'" in (reused.details() or "")
    again = await rejected(
        alice.RemoveProjectMember(
            grant_pb2.RemoveProjectMemberRequest(
                request_id=rid(), project_id="proj-a", subject="bob"
            )
        )
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(120)
async def test_concurrent_removal_copies_succeed(grant_service: RunningGrant) -> None:
    # Both copies of one request succeed, and a PI stays, whatever request removes them.
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    removal = grant_pb2.RemoveProjectMemberRequest(
        request_id=rid(), project_id="proj-a", subject="bob"
    )

    copies = await asyncio.gather(*(alice.RemoveProjectMember(removal) for _ in range(4)))

    for project in copies:
        assert [m.subject for m in project.members] == ["alice"]
    pi = grant_pb2.RemoveProjectMemberRequest(
        request_id=rid(), project_id="proj-a", subject="alice"
    )
    for _ in range(2):
        denied = await rejected(alice.RemoveProjectMember(pi))
        assert denied.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is the PI" in (denied.details() or "")


@pytest.mark.timeout(120)
async def test_reused_removal_id_hides_member(grant_service: RunningGrant) -> None:
    # An error names what a request id removed to its own caller only.
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    eve = await create_eve_project(grant_service)
    removal = grant_pb2.RemoveProjectMemberRequest(
        request_id=rid(), project_id="proj-a", subject="bob"
    )
    await alice.RemoveProjectMember(removal)

    reused = await rejected(
        eve.RemoveProjectMember(
            grant_pb2.RemoveProjectMemberRequest(
                request_id=removal.request_id, project_id="proj-e", subject="bob"
            )
        )
    )
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = reused.details() or ""
    assert "request_id" in details
    assert "bob" not in details
    assert "proj-a" not in details


@pytest.mark.timeout(120)
async def test_ledger_request_id_reuse_rejected(grant_service: RunningGrant) -> None:
    scheduler = grant_service.stub("scheduler", ["service"])
    metering = grant_service.stub("metering", ["service"])
    grant_id = await standard_grant(grant_service, "100")
    hold = grant_pb2.PlaceHoldRequest(
        request_id="job-1/hold", grant_id=grant_id, job_id="job-1", amount_pf_days=dec("4")
    )
    first = await scheduler.PlaceHold(hold)
    assert (await scheduler.PlaceHold(hold)).hold_id == first.hold_id
    hold.amount_pf_days.value = "5"
    changed = await rejected(scheduler.PlaceHold(hold))
    assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (changed.details() or "")
    refund = grant_pb2.RefundRequest(
        request_id="job-1/hold", hold_id=first.hold_id, amount_pf_days=dec("1"), reason="fault"
    )
    other_kind = await rejected(metering.Refund(refund))
    assert other_kind.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (other_kind.details() or "")
    balance = await scheduler.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
    assert balance.held_pf_days.value == "4"
    assert balance.refunded_pf_days.value == "0"


@pytest.mark.parametrize("code", ["12", "D", "D1", "ß"])
async def test_country_code_must_be_letters(grant_service: RunningGrant, code: str) -> None:
    office = grant_service.stub("office", ["program_office"])
    institution = grant_pb2.Institution(
        institution_id="uni-z", display_name="University Z", country_code=code
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(request_id=rid(), institution=institution)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "institution.country_code" in field_violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await office.GetInstitution(grant_pb2.GetInstitutionRequest(institution_id="uni-z"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    institution.country_code = "de"
    stored = await office.CreateInstitution(
        grant_pb2.CreateInstitutionRequest(request_id=rid(), institution=institution)
    )
    assert stored.country_code == "DE"
