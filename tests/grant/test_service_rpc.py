"""The grant service over gRPC: the program flow, authorization, bad input, sub-allocations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from acsp.v1 import common_pb2, grant_pb2
from services.runtime.errors import details_from_error, field_violations
from tests.grant.conftest import open_database
from tests.grant.service_helpers import RunningGrant, running_grant


def dec(value: str) -> common_pb2.Decimal:
    return common_pb2.Decimal(value=value)


def rid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def grant_service(schema: str, tmp_path: Path) -> AsyncIterator[RunningGrant]:
    async with running_grant(schema, tmp_path) as running:
        yield running


async def setup_project(svc: RunningGrant) -> None:
    office = svc.stub("office", ["program_office"])
    for inst in ("uni-a", "uni-b"):
        await office.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(
                request_id=rid(),
                institution=grant_pb2.Institution(
                    institution_id=inst, display_name=inst, country_code="no"
                ),
            )
        )
    pi = svc.stub("alice", ["pi", "researcher"], "uni-a")
    await pi.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id=rid(),
            project=grant_pb2.Project(
                project_id="proj-a",
                institution_id="uni-a",
                display_name="Project A",
                pi_subject="alice",
                members=[
                    grant_pb2.ProjectMember(subject="bob", role=grant_pb2.PROJECT_ROLE_MEMBER)
                ],
            ),
        )
    )


def application(tier: int, amount: str, days: int = 30) -> grant_pb2.Application:
    now = datetime.now(UTC)
    message = grant_pb2.Application(
        project_id="proj-a",
        tier=tier,  # type: ignore[arg-type]
        requested_pf_days=dec(amount),
        justification="protein folding at scale",
    )
    message.validity.start_time.FromDatetime(now - timedelta(hours=1))
    message.validity.end_time.FromDatetime(now + timedelta(days=days))
    return message


async def standard_grant(
    svc: RunningGrant, amount: str = "100", constraints: grant_pb2.GrantConstraints | None = None
) -> str:
    pi = svc.stub("alice", ["pi"], "uni-a")
    office = svc.stub("office", ["program_office"])
    reviewer = svc.stub("rita", ["reviewer"], "uni-b")
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, amount)
        )
    )
    await office.AssignReviewer(
        grant_pb2.AssignReviewerRequest(
            request_id=rid(),
            application_id=app.application_id,
            reviewer_subject="rita",
            reviewer_institution_id="uni-b",
        )
    )
    await reviewer.SubmitReview(
        grant_pb2.SubmitReviewRequest(
            request_id=rid(), application_id=app.application_id, score=4, comments="sound plan"
        )
    )
    decided = await office.DecideApplication(
        grant_pb2.DecideApplicationRequest(
            request_id=rid(),
            application_id=app.application_id,
            decision=grant_pb2.Decision(
                outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="strong reviews"
            ),
            constraints=constraints,
        )
    )
    assert decided.state == grant_pb2.APPLICATION_STATE_AWARDED
    return decided.grant_id


async def test_exploratory_application_awarded_at_once(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_EXPLORATORY, "5")
        )
    )
    assert app.state == grant_pb2.APPLICATION_STATE_AWARDED
    assert app.grant_id
    grant = await pi.GetGrant(grant_pb2.GetGrantRequest(grant_id=app.grant_id))
    assert grant.balance.available_pf_days.value == "5"
    assert [h.trigger for h in app.history] == ["application:submitted", "application:awarded"]


async def test_exploratory_over_limit_rejected(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=rid(), application=application(grant_pb2.GRANT_TIER_EXPLORATORY, "11")
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "application.requested_pf_days" in field_violations(caught.value)


async def test_review_flow_records_every_step(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    office = grant_service.stub("office", ["program_office"])
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    app = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=grant.application_id)
    )
    actions = [(h.trigger, h.actor) for h in app.history]
    assert actions == [
        ("application:submitted", "alice"),
        ("application:reviewer_assigned", "office"),
        ("application:reviewed", "rita"),
        ("application:awarded", "office"),
    ]
    assert app.reviews[0].score == 4
    assert app.decision.decided_by == "office"
    reviewer = grant_service.stub("rita", ["reviewer"], "uni-b")
    seen = await reviewer.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=grant.application_id)
    )
    assert seen.application_id == grant.application_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reviewer.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_second_review_recorded_as_revision(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    rita = grant_service.stub("rita", ["reviewer"], "uni-b")
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "50")
        )
    )
    await office.AssignReviewer(
        grant_pb2.AssignReviewerRequest(
            request_id=rid(),
            application_id=app.application_id,
            reviewer_subject="rita",
            reviewer_institution_id="uni-b",
        )
    )
    for score in (4, 5):
        revised = await rita.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=rid(), application_id=app.application_id, score=score, comments="ok"
            )
        )
    assert [(r.reviewer_subject, r.score) for r in revised.reviews] == [("rita", 5)]
    steps = [(h.trigger, h.actor, h.reason) for h in revised.history]
    assert steps[-2:] == [
        ("application:reviewed", "rita", "score 4"),
        ("application:review_revised", "rita", "score 4 -> 5"),
    ]


async def test_pi_creates_only_own_projects(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    cases = [("uni-b", "alice"), ("uni-a", "somebody-else")]
    for institution, pi_subject in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pi.CreateProject(
                grant_pb2.CreateProjectRequest(
                    request_id=rid(),
                    project=grant_pb2.Project(
                        project_id="proj-x",
                        institution_id=institution,
                        display_name="X",
                        pi_subject=pi_subject,
                    ),
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, institution


async def test_reviewer_conflicts_rejected(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "50")
        )
    )
    cases = [("carol", "uni-a", "reviewer_institution_id"), ("bob", "uni-b", "reviewer_subject")]
    for reviewer, institution, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await office.AssignReviewer(
                grant_pb2.AssignReviewerRequest(
                    request_id=rid(),
                    application_id=app.application_id,
                    reviewer_subject=reviewer,
                    reviewer_institution_id=institution,
                )
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "conflict of interest" in (caught.value.details() or "")
        assert field in (caught.value.details() or "")
    again = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=app.application_id)
    )
    assert list(again.reviewer_subjects) == []


async def test_bad_input_named_and_nothing_written(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service)
    scheduler = grant_service.stub("scheduler", ["service"])
    office = grant_service.stub("office", ["program_office"])
    before = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    for amount in ("-1", "abc", "NaN", "1e-25", ""):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.PlaceHold(
                grant_pb2.PlaceHoldRequest(
                    request_id=rid(), grant_id=grant_id, job_id="j", amount_pf_days=dec(amount)
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, amount
        assert "amount_pf_days" in field_violations(caught.value), amount

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.PlaceHold(
            grant_pb2.PlaceHoldRequest(
                request_id=rid(), project_id="no-such", job_id="j", amount_pf_days=dec("1")
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    pi = grant_service.stub("alice", ["pi"], "uni-a")
    reversed_window = application(grant_pb2.GRANT_TIER_STANDARD, "5")
    reversed_window.validity.end_time.FromDatetime(datetime.now(UTC) - timedelta(days=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=rid(), application=reversed_window)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "application.validity.end_time" in field_violations(caught.value)

    after = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    assert after.entry_count == before.entry_count
    assert after.postings_sum_pf_days.value == "0"


async def test_only_money_services_move_budget(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service)
    for subject, roles in (
        ("alice", ["pi"]),
        ("office", ["program_office"]),
        ("agent", ["service"]),
    ):
        caller = grant_service.stub(subject, roles)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.PlaceHold(
                grant_pb2.PlaceHoldRequest(
                    request_id=rid(), grant_id=grant_id, job_id="j", amount_pf_days=dec("1")
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, subject
        assert "may not place holds" in (caught.value.details() or ""), subject


async def test_researchers_see_only_their_projects(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service)
    member = grant_service.stub("bob", ["researcher"], "uni-a")
    stranger = grant_service.stub("mallory", ["researcher", "pi"], "uni-b")
    assert (await member.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))).grant_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stranger.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stranger.ListGrants(grant_pb2.ListGrantsRequest())
    assert list(listed.grants) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await member.AddProjectMember(
            grant_pb2.AddProjectMemberRequest(
                request_id=rid(),
                project_id="proj-a",
                member=grant_pb2.ProjectMember(subject="eve", role=grant_pb2.PROJECT_ROLE_MEMBER),
            )
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await member.DecideApplication(
            grant_pb2.DecideApplicationRequest(request_id=rid(), application_id="x")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_shortfall_message_rounds_amounts(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "2.99996349399938425925926")
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id=rid(), grant_id=grant_id, holder="bob", amount_pf_days=dec("100")
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = caught.value.details() or ""
    assert "has 2.999963 PF-days available" in message
    assert "shortfall 97.000037 PF-days" in message
    status = details_from_error(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert info.metadata["available_pf_days"] == "2.99996349399938425925926"
    assert info.metadata["shortfall_pf_days"] == "97.00003650600061574074074"


async def test_sub_allocation_charge_reduces_parents(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    scheduler = grant_service.stub("scheduler", ["service"])
    metering = grant_service.stub("metering", ["service"])
    level1 = await pi.CreateSubAllocation(
        grant_pb2.CreateSubAllocationRequest(
            request_id=rid(), grant_id=grant_id, holder="bob", amount_pf_days=dec("40")
        )
    )
    level2 = await pi.CreateSubAllocation(
        grant_pb2.CreateSubAllocationRequest(
            request_id=rid(),
            grant_id=grant_id,
            parent_sub_allocation_id=level1.sub_allocation_id,
            holder="alice",
            amount_pf_days=dec("10"),
        )
    )
    hold = await scheduler.PlaceHold(
        grant_pb2.PlaceHoldRequest(
            request_id=rid(),
            grant_id=grant_id,
            sub_allocation_id=level2.sub_allocation_id,
            job_id="job-7",
            amount_pf_days=dec("6"),
        )
    )
    await metering.CommitCharges(
        grant_pb2.CommitChargesRequest(
            charges=[
                grant_pb2.ChargeItem(
                    request_id=rid(), hold_id=hold.hold_id, amount_pf_days=dec("4")
                )
            ]
        )
    )

    async def balance(sub: str = "") -> grant_pb2.Balance:
        return await pi.GetBalance(
            grant_pb2.GetBalanceRequest(grant_id=grant_id, sub_allocation_id=sub)
        )

    child, parent, root = (
        await balance(level2.sub_allocation_id),
        await balance(level1.sub_allocation_id),
        await balance(),
    )
    assert child.charged_pf_days.value == "4"
    assert child.available_pf_days.value == "4"
    assert parent.charged_pf_days.value == "4"
    assert parent.delegated_pf_days.value == "10"
    assert parent.sub_allocations_available_pf_days.value == "4"
    assert root.charged_pf_days.value == "4"
    assert root.held_pf_days.value == "2"
    assert root.sub_allocations_charged_pf_days.value == "4"
    assert root.sub_allocations_held_pf_days.value == "2"
    # Each level's own budget stays; only what its sub-allocations have left shrinks.
    assert parent.available_pf_days.value == "30"
    assert root.available_pf_days.value == "60"
    assert root.delegated_pf_days.value == "40"
    assert root.sub_allocations_available_pf_days.value == "34"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi.CreateSubAllocation(
            grant_pb2.CreateSubAllocationRequest(
                request_id=rid(),
                grant_id=grant_id,
                parent_sub_allocation_id=level2.sub_allocation_id,
                holder="bob",
                amount_pf_days=dec("5"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shortfall 1 PF-days" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.PlaceHold(
            grant_pb2.PlaceHoldRequest(
                request_id=rid(),
                grant_id=grant_id,
                sub_allocation_id=level2.sub_allocation_id,
                job_id="job-8",
                amount_pf_days=dec("4.5"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_supplement_once_and_half_limit(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    office = grant_service.stub("office", ["program_office"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.SupplementGrant(
            grant_pb2.SupplementGrantRequest(
                request_id=rid(), grant_id=grant_id, amount_pf_days=dec("251"), reason="more"
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    grant = await office.SupplementGrant(
        grant_pb2.SupplementGrantRequest(
            request_id=rid(), grant_id=grant_id, amount_pf_days=dec("250"), reason="more"
        )
    )
    assert grant.balance.available_pf_days.value == "350"
    assert grant.supplemented
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.SupplementGrant(
            grant_pb2.SupplementGrantRequest(
                request_id=rid(), grant_id=grant_id, amount_pf_days=dec("1"), reason="again"
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_grant_reports_supplement_limit(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    office = grant_service.stub("office", ["program_office"])

    before = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    after = await office.SupplementGrant(
        grant_pb2.SupplementGrantRequest(
            request_id=rid(), grant_id=grant_id, amount_pf_days=dec("10"), reason="more"
        )
    )

    # Half the standard tier's limit of 500 PF-days, then nothing once supplemented.
    assert before.supplement_limit_pf_days.value == "250"
    assert after.supplement_limit_pf_days.value == "0"


async def test_supplement_checks_role_before_grant(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    office = grant_service.stub("office", ["program_office"])
    alice = grant_service.stub("alice", ["pi"], "uni-a")
    await office.SupplementGrant(
        grant_pb2.SupplementGrantRequest(
            request_id=rid(), grant_id=grant_id, amount_pf_days=dec("10"), reason="more"
        )
    )
    # A PI gets PERMISSION_DENIED whether the grant was supplemented or does not exist.
    for target in (grant_id, "grant-unknown"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await alice.SupplementGrant(
                grant_pb2.SupplementGrantRequest(
                    request_id=rid(), grant_id=target, amount_pf_days=dec("1"), reason="again"
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, target
        assert "only the program_office role" in (caught.value.details() or ""), target


async def test_history_pages_in_order(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    scheduler = grant_service.stub("scheduler", ["service"])
    for i in range(5):
        await scheduler.PlaceHold(
            grant_pb2.PlaceHoldRequest(
                request_id=rid(), grant_id=grant_id, job_id=f"j{i}", amount_pf_days=dec("1")
            )
        )
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    seen: list[int] = []
    token = ""
    while True:
        page = await pi.ListLedgerEntries(
            grant_pb2.ListLedgerEntriesRequest(
                grant_id=grant_id, page=common_pb2.PageRequest(page_size=2, page_token=token)
            )
        )
        seen.extend(e.entry_id for e in page.entries)
        for entry in page.entries:
            assert sum(float(p.amount_pf_days.value) for p in entry.postings) == 0
        token = page.page.next_page_token
        if not token:
            break
    assert len(seen) == 6
    assert seen == sorted(seen)
    # Unicode calls '²' a digit, but it is no entry id; nor is a number past bigint.
    for bad in ("\u00b2", str(2**63), "-1"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pi.ListLedgerEntries(
                grant_pb2.ListLedgerEntriesRequest(
                    grant_id=grant_id, page=common_pb2.PageRequest(page_token=bad)
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page.page_token" in (caught.value.details() or "")


async def test_extend_only_later_and_recorded(grant_service: RunningGrant, schema: str) -> None:
    await setup_project(grant_service)
    grant_id = await standard_grant(grant_service, "100")
    office = grant_service.stub("office", ["program_office"])
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=grant_id))
    end = grant.validity.end_time.ToDatetime(tzinfo=UTC)
    earlier = grant_pb2.ExtendGrantRequest(request_id=rid(), grant_id=grant_id, reason="x")
    earlier.new_end_time.FromDatetime(end - timedelta(days=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.ExtendGrant(earlier)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "new_end_time" in field_violations(caught.value)
    later = grant_pb2.ExtendGrantRequest(request_id=rid(), grant_id=grant_id, reason="delays")
    later.new_end_time.FromDatetime(end + timedelta(days=10))
    extended = await office.ExtendGrant(later)
    assert extended.validity.end_time.ToDatetime(tzinfo=UTC) == end + timedelta(days=10)
    db = await open_database(schema, 1)
    try:
        async with db.acquire() as conn:
            rows = await conn.fetch("SELECT action, actor, detail FROM grant_changes")
    finally:
        await db.close()
    assert [(r["action"], r["actor"]) for r in rows] == [("extended", "office")]
    assert "delays" in rows[0]["detail"]


async def test_reviewer_token_institution_checked_at_review(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    office = grant_service.stub("office", ["program_office"])
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "50")
        )
    )
    # The office types uni-b, but the reviewer's own token says uni-a, the applicant's.
    await office.AssignReviewer(
        grant_pb2.AssignReviewerRequest(
            request_id=rid(),
            application_id=app.application_id,
            reviewer_subject="mallory",
            reviewer_institution_id="uni-b",
        )
    )
    mallory = grant_service.stub("mallory", ["reviewer"], "uni-a")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mallory.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=rid(), application_id=app.application_id, score=5, comments="great"
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "conflict of interest" in (caught.value.details() or "")
    assert "token.institution" in (caught.value.details() or "")
    rita = grant_service.stub("rita", ["reviewer"], "uni-b")

    async def assign(application_id: str, reviewer: str, institution: str) -> None:
        await office.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=rid(),
                application_id=application_id,
                reviewer_subject=reviewer,
                reviewer_institution_id=institution,
            )
        )

    async def review(score: int) -> None:
        await rita.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=rid(), application_id=app.application_id, score=score, comments="ok"
            )
        )

    await assign(app.application_id, "rita", "uni-b")
    await review(4)
    # Rita's own token said uni-b: the office may not now say she is from elsewhere.
    second = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "20")
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assign(second.application_id, "rita", "uni-c")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reviewer_institution_id" in (caught.value.details() or "")
    # Once rita joins the applying project, she may no longer revise her review.
    await pi.AddProjectMember(
        grant_pb2.AddProjectMemberRequest(
            request_id=rid(),
            project_id="proj-a",
            member=grant_pb2.ProjectMember(subject="rita", role=grant_pb2.PROJECT_ROLE_VIEWER),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await review(1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reviewer:" in (caught.value.details() or "")
    after = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=app.application_id)
    )
    assert [(r.reviewer_subject, r.score) for r in after.reviews] == [("rita", 4)]
    untouched = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=second.application_id)
    )
    assert list(untouched.reviewer_subjects) == []


async def test_create_project_with_taken_id_already_exists(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    first_key = rid()

    def request(key: str, name: str) -> grant_pb2.CreateProjectRequest:
        return grant_pb2.CreateProjectRequest(
            request_id=key,
            project=grant_pb2.Project(
                project_id="proj-c",
                institution_id="uni-a",
                display_name=name,
                pi_subject="alice",
            ),
        )

    created = await pi.CreateProject(request(first_key, "Climate"))
    # The retry of the creating request returns the project, even after it changed.
    await pi.AddProjectMember(
        grant_pb2.AddProjectMemberRequest(
            request_id=rid(),
            project_id="proj-c",
            member=grant_pb2.ProjectMember(subject="dan", role=grant_pb2.PROJECT_ROLE_MEMBER),
        )
    )
    retried = await pi.CreateProject(request(first_key, "Climate"))
    assert retried.project_id == created.project_id
    assert retried.display_name == "Climate"
    for key, name in [(rid(), "Something else"), (rid(), "Climate")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pi.CreateProject(request(key, name))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS, name
        assert "proj-c" in (caught.value.details() or "")
    stored = await pi.GetProject(grant_pb2.GetProjectRequest(project_id="proj-c"))
    assert stored.display_name == "Climate"
    assert sorted(m.subject for m in stored.members) == ["alice", "dan"]


async def test_refusals_name_the_role_each_action_needs(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    bob = grant_service.stub("bob", ["researcher"], "uni-a")
    submit = bob.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "10")
        )
    )
    add = bob.AddProjectMember(
        grant_pb2.AddProjectMemberRequest(
            request_id=rid(),
            project_id="proj-a",
            member=grant_pb2.ProjectMember(subject="eve", role=grant_pb2.PROJECT_ROLE_MEMBER),
        )
    )
    assign = bob.AssignReviewer(
        grant_pb2.AssignReviewerRequest(
            request_id=rid(),
            application_id="app-x",
            reviewer_subject="rita",
            reviewer_institution_id="uni-b",
        )
    )
    review = bob.SubmitReview(
        grant_pb2.SubmitReviewRequest(request_id=rid(), application_id="app-x", score=3)
    )
    cases = [
        (submit, "only the project's PI may submit applications"),
        (add, "only the project's PI may add members"),
        (assign, "only the program_office role may assign reviewers"),
        (review, "only the reviewer role may submit reviews"),
    ]
    for call, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call  # type: ignore[misc]
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, expected
        assert expected in (caught.value.details() or ""), caught.value.details()


async def test_unassigned_reviewer_sees_no_application(grant_service: RunningGrant) -> None:
    await setup_project(grant_service)
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(
            request_id=rid(), application=application(grant_pb2.GRANT_TIER_STANDARD, "50")
        )
    )
    # A reviewer of another institution, assigned to nothing, and one of the applicant's.
    outsiders = [
        grant_service.stub("victor", ["reviewer"], "uni-b"),
        grant_service.stub("mallory", ["reviewer"], "uni-a"),
    ]
    for outsider in outsiders:
        answers = []
        for application_id in (app.application_id, "app-missing"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await outsider.SubmitReview(
                    grant_pb2.SubmitReviewRequest(
                        request_id=rid(), application_id=application_id, score=5, comments="ok"
                    )
                )
            details = (caught.value.details() or "").replace(application_id, "ID")
            answers.append((caught.value.code(), details))
        assert answers[0][0] == grpc.StatusCode.NOT_FOUND
        assert answers[0] == answers[1]
