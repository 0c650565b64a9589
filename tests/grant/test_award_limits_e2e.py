"""Award limits checked against a real scheduler process, with the service token it accepts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2
from services.runtime.auth import Role
from services.runtime.errors import field_violations
from tests.scheduler.harness import Stack, free_port, metadata, scheduler_stub


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    stack = Stack(tmp_path)
    # The grant service needs the scheduler's address at start, and the scheduler the grant
    # service's, so the scheduler's port is chosen first.
    scheduler_address = f"127.0.0.1:{free_port()}"
    try:
        await stack.start_servers()
        _, stack.grant_address = await stack.start_service(
            "grant", "services.grant", ACSP_SCHEDULER_ADDRESS=scheduler_address
        )
        await stack.start_scheduler(ACSP_GRPC_LISTEN=scheduler_address)
        yield stack, scheduler_address
    finally:
        await stack.close()


def rid() -> str:
    return uuid.uuid4().hex


@pytest.mark.timeout(180)
async def test_award_checked_against_real_scheduler(stack: tuple[Stack, str]) -> None:
    running, scheduler_address = stack
    office = metadata(running.token("office", Role.PROGRAM_OFFICE))
    pi = metadata(running.token("alice", Role.PI, institution="uni-a"))
    rita = metadata(running.token("rita", Role.REVIEWER, institution="uni-b"))
    channel, scheduler = scheduler_stub(scheduler_address)
    async with channel, grpc.aio.insecure_channel(running.grant_address) as grant_channel:
        grants = grant_pb2_grpc.GrantServiceStub(grant_channel)
        openb = scheduler_pb2.Provider(
            provider_id="openb", regions=[scheduler_pb2.Region(region_id="east")]
        )
        await scheduler.RegisterProvider(
            scheduler_pb2.RegisterProviderRequest(request_id=rid(), provider=openb),
            metadata=office,
            timeout=10,
        )
        for institution in ("uni-a", "uni-b"):
            await grants.CreateInstitution(
                grant_pb2.CreateInstitutionRequest(
                    request_id=rid(),
                    institution=grant_pb2.Institution(
                        institution_id=institution, display_name=institution, country_code="NO"
                    ),
                ),
                metadata=office,
                timeout=10,
            )
        await grants.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=rid(),
                project=grant_pb2.Project(
                    project_id="proj-a",
                    institution_id="uni-a",
                    display_name="A",
                    pi_subject="alice",
                ),
            ),
            metadata=pi,
            timeout=10,
        )
        now = datetime.now(UTC)
        application = grant_pb2.Application(
            project_id="proj-a",
            tier=grant_pb2.GRANT_TIER_STANDARD,
            requested_pf_days=common_pb2.Decimal(value="20"),
            justification="j",
        )
        application.validity.start_time.FromDatetime(now - timedelta(hours=1))
        application.validity.end_time.FromDatetime(now + timedelta(days=30))
        app = await grants.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=rid(), application=application),
            metadata=pi,
            timeout=10,
        )
        await grants.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=rid(),
                application_id=app.application_id,
                reviewer_subject="rita",
                reviewer_institution_id="uni-b",
            ),
            metadata=office,
            timeout=10,
        )
        await grants.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=rid(), application_id=app.application_id, score=4, comments="ok"
            ),
            metadata=rita,
            timeout=10,
        )

        def award(provider: str) -> grant_pb2.DecideApplicationRequest:
            return grant_pb2.DecideApplicationRequest(
                request_id=rid(),
                application_id=app.application_id,
                decision=grant_pb2.Decision(outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="ok"),
                constraints=grant_pb2.GrantConstraints(providers=[provider]),
            )

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await grants.DecideApplication(award("nope"), metadata=office, timeout=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert "registered: openb" in violations["constraints.providers[0]"]

        decided = await grants.DecideApplication(award("openb"), metadata=office, timeout=20)
        assert decided.state == grant_pb2.APPLICATION_STATE_AWARDED
