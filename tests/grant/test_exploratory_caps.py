"""Per-PI and per-institution caps on exploratory awards, against the real grant service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from acsp.v1 import grant_pb2, grant_pb2_grpc
from services.runtime.db import quote_ident
from tests.grant.conftest import TEST_DSN
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_input_checks import apply_request
from tests.grant.test_service_rpc import rid

SUBMITTED = grant_pb2.APPLICATION_STATE_SUBMITTED
AWARDED = grant_pb2.APPLICATION_STATE_AWARDED
Stub = grant_pb2_grpc.GrantServiceStub


@asynccontextmanager
async def service_with_caps(
    schema: str, data_dir: Path, pi_limit: str, institution_limit: str
) -> AsyncIterator[RunningGrant]:
    extra = {
        "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": pi_limit,
        "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": institution_limit,
    }
    async with running_grant(schema, data_dir, extra) as running:
        office = running.stub("office", ["program_office"])
        for institution in ("uni-a", "uni-b"):
            await office.CreateInstitution(
                grant_pb2.CreateInstitutionRequest(
                    request_id=rid(),
                    institution=grant_pb2.Institution(
                        institution_id=institution, display_name=institution, country_code="NO"
                    ),
                )
            )
        yield running


async def new_project(svc: RunningGrant, project_id: str, pi: str, institution: str) -> Stub:
    """Create a project led by ``pi`` through the PI's own token; return the PI's stub."""
    stub = svc.stub(pi, ["pi"], institution)
    await stub.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id=rid(),
            project=grant_pb2.Project(
                project_id=project_id,
                institution_id=institution,
                display_name=project_id,
                pi_subject=pi,
            ),
        )
    )
    return stub


async def pool_outflow(svc: RunningGrant) -> str:
    """Return the PF-days awarded from the program pool, as the ledger summary has it."""
    office = svc.stub("office", ["program_office"])
    summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    # Awards move budget out of the pool, so its balance is the negated total awarded.
    return str(-Decimal(summary.program_pool_pf_days.value))


def review_reason(app: grant_pb2.Application) -> str:
    steps = [h for h in app.history if h.trigger == "application:sent_to_review"]
    assert len(steps) == 1
    return steps[0].reason


@pytest.mark.timeout(120)
async def test_pi_cap_sends_new_projects_to_review(schema: str, tmp_path: Path) -> None:
    async with service_with_caps(schema, tmp_path, "20", "200") as svc:
        outcomes = []
        for index in range(1, 6):
            alice = await new_project(svc, f"auto-{index}", "alice", "uni-a")
            outcomes.append(
                await alice.SubmitApplication(apply_request("10", project_id=f"auto-{index}"))
            )
        assert [a.state for a in outcomes] == [AWARDED, AWARDED, SUBMITTED, SUBMITTED, SUBMITTED]
        held = outcomes[2]
        assert held.grant_id == ""
        reason = review_reason(held)
        assert "PI 'alice'" in reason
        assert "awarded 20 PF-days without review" in reason
        assert "limit of 20 PF-days" in reason
        assert "peer review" in reason
        assert await pool_outflow(svc) == "20"
        # Another PI of the same institution still gets an award without review.
        bob = await new_project(svc, "bob-1", "bob", "uni-a")
        other = await bob.SubmitApplication(apply_request("10", project_id="bob-1"))
        assert other.state == AWARDED


@pytest.mark.timeout(120)
async def test_institution_cap_counts_every_pi(schema: str, tmp_path: Path) -> None:
    async with service_with_caps(schema, tmp_path, "10", "15") as svc:
        alice = await new_project(svc, "alice-1", "alice", "uni-a")
        first = await alice.SubmitApplication(apply_request("10", project_id="alice-1"))
        assert first.state == AWARDED
        bob = await new_project(svc, "bob-1", "bob", "uni-a")
        second = await bob.SubmitApplication(apply_request("6", project_id="bob-1"))
        assert second.state == SUBMITTED
        reason = review_reason(second)
        assert "institution 'uni-a'" in reason
        assert "limit of 15 PF-days" in reason
        # bob-1 already has 6 PF-days pending, which the per-project limit counts too.
        within = await bob.SubmitApplication(apply_request("4", project_id="bob-1"))
        assert within.state == AWARDED
        eve = await new_project(svc, "eve-1", "eve", "uni-b")
        elsewhere = await eve.SubmitApplication(apply_request("10", project_id="eve-1"))
        assert elsewhere.state == AWARDED
        assert await pool_outflow(svc) == "24"


@pytest.mark.timeout(120)
async def test_concurrent_applications_share_pi_cap(schema: str, tmp_path: Path) -> None:
    async with service_with_caps(schema, tmp_path, "10", "200") as svc:
        stubs = [await new_project(svc, f"race-{i}", "alice", "uni-a") for i in range(6)]
        calls = [
            stub.SubmitApplication(apply_request("6", project_id=f"race-{i}"))
            for i, stub in enumerate(stubs)
        ]
        outcomes = await asyncio.gather(*calls)
        states = sorted(a.state for a in outcomes)
        assert states == [SUBMITTED] * 5 + [AWARDED]
        assert await pool_outflow(svc) == "6"


@pytest.mark.timeout(120)
async def test_awards_before_period_not_counted(schema: str, tmp_path: Path) -> None:
    async with service_with_caps(schema, tmp_path, "10", "200") as svc:
        alice = await new_project(svc, "old-1", "alice", "uni-a")
        old = await alice.SubmitApplication(apply_request("10", project_id="old-1"))
        assert old.state == AWARDED
        alice = await new_project(svc, "new-1", "alice", "uni-a")
        held = await alice.SubmitApplication(apply_request("10", project_id="new-1"))
        assert held.state == SUBMITTED
        conn = await asyncpg.connect(TEST_DSN, timeout=10)
        try:
            await conn.execute(
                f"UPDATE {quote_ident(schema)}.applications"
                " SET decided_at = decided_at - interval '366 days' WHERE id = $1",
                old.application_id,
            )
        finally:
            await conn.close()
        alice = await new_project(svc, "new-2", "alice", "uni-a")
        fresh = await alice.SubmitApplication(apply_request("10", project_id="new-2"))
        assert fresh.state == AWARDED


@pytest.mark.timeout(120)
async def test_reviewed_award_not_counted(schema: str, tmp_path: Path) -> None:
    async with service_with_caps(schema, tmp_path, "10", "200") as svc:
        alice = await new_project(svc, "one", "alice", "uni-a")
        await alice.SubmitApplication(apply_request("10", project_id="one"))
        alice = await new_project(svc, "two", "alice", "uni-a")
        held = await alice.SubmitApplication(apply_request("4", project_id="two"))
        assert held.state == SUBMITTED
        office = svc.stub("office", ["program_office"])
        rita = svc.stub("rita", ["reviewer"], "uni-b")
        await office.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=rid(),
                application_id=held.application_id,
                reviewer_subject="rita",
                reviewer_institution_id="uni-b",
            )
        )
        await rita.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=rid(), application_id=held.application_id, score=4, comments="fine"
            )
        )
        decided = await office.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=rid(),
                application_id=held.application_id,
                decision=grant_pb2.Decision(
                    outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="reviewed"
                ),
            )
        )
        assert decided.state == AWARDED
        assert await pool_outflow(svc) == "14"
