"""Award and application limits checked against the providers the scheduler registered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, grant_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.errors import field_violations
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import application, rid, setup_project

PROVIDERS = [
    scheduler_pb2.Provider(
        provider_id="openb",
        regions=[scheduler_pb2.Region(region_id="east"), scheduler_pb2.Region(region_id="west")],
    ),
    scheduler_pb2.Provider(provider_id="cloud-a", regions=[scheduler_pb2.Region(region_id="eu")]),
]


@dataclass
class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Lists PROVIDERS one per page, so the grant service must follow page tokens."""

    failing: bool = False
    calls: list[str] = field(default_factory=list)

    async def ListProviders(
        self, request: scheduler_pb2.ListProvidersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListProvidersResponse:
        self.calls.append(request.page.page_token)
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no leader")
        index = int(request.page.page_token or "0")
        token = str(index + 1) if index + 1 < len(PROVIDERS) else ""
        return scheduler_pb2.ListProvidersResponse(
            providers=PROVIDERS[index : index + 1],
            page=common_pb2.PageResponse(next_page_token=token),
        )


@pytest.fixture
async def fake_scheduler() -> AsyncIterator[tuple[FakeScheduler, str]]:
    servicer = FakeScheduler()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def grant_service(
    schema: str, tmp_path: Path, fake_scheduler: tuple[FakeScheduler, str]
) -> AsyncIterator[RunningGrant]:
    extra = {"ACSP_SCHEDULER_ADDRESS": fake_scheduler[1]}
    async with running_grant(schema, tmp_path, extra) as running:
        await setup_project(running)
        yield running


async def reviewed_application(svc: RunningGrant, regions: tuple[str, ...] = ()) -> str:
    pi = svc.stub("alice", ["pi"], "uni-a")
    office = svc.stub("office", ["program_office"])
    reviewer = svc.stub("rita", ["reviewer"], "uni-b")
    message = application(grant_pb2.GRANT_TIER_STANDARD, "20")
    message.regions.extend(regions)
    app = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(request_id=rid(), application=message)
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
            request_id=rid(), application_id=app.application_id, score=4, comments="ok"
        )
    )
    return str(app.application_id)


def award(
    application_id: str, providers: tuple[str, ...] = (), regions: tuple[str, ...] = ()
) -> grant_pb2.DecideApplicationRequest:
    return grant_pb2.DecideApplicationRequest(
        request_id=rid(),
        application_id=application_id,
        decision=grant_pb2.Decision(outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="ok"),
        constraints=grant_pb2.GrantConstraints(providers=providers, regions=regions),
    )


async def assert_still_in_review(svc: RunningGrant, application_id: str) -> None:
    office = svc.stub("office", ["program_office"])
    app = await office.GetApplication(
        grant_pb2.GetApplicationRequest(application_id=application_id)
    )
    assert app.state == grant_pb2.APPLICATION_STATE_IN_REVIEW
    assert app.grant_id == ""


@pytest.mark.parametrize(
    ("providers", "regions", "bad_field", "words"),
    [
        (("nope",), (), "constraints.providers[0]", "provider 'nope' is not registered"),
        (("openb", "nope"), (), "constraints.providers[1]", "registered: cloud-a, openb"),
        ((), ("nope/east",), "constraints.regions[0]", "provider 'nope', which is not"),
        ((), ("openb/north",), "constraints.regions[0]", "its regions: openb/east, openb/west"),
    ],
)
async def test_award_rejects_unregistered_limits(
    grant_service: RunningGrant,
    providers: tuple[str, ...],
    regions: tuple[str, ...],
    bad_field: str,
    words: str,
) -> None:
    application_id = await reviewed_application(grant_service)
    office = grant_service.stub("office", ["program_office"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.DecideApplication(award(application_id, providers, regions))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert bad_field in violations
    assert words in violations[bad_field]
    await assert_still_in_review(grant_service, application_id)


async def test_award_accepts_registered_limits(
    grant_service: RunningGrant, fake_scheduler: tuple[FakeScheduler, str]
) -> None:
    application_id = await reviewed_application(grant_service)
    office = grant_service.stub("office", ["program_office"])
    decided = await office.DecideApplication(
        award(application_id, ("openb", "cloud-a"), ("openb/west", "cloud-a/eu"))
    )
    assert decided.state == grant_pb2.APPLICATION_STATE_AWARDED
    grant = await office.GetGrant(grant_pb2.GetGrantRequest(grant_id=decided.grant_id))
    assert list(grant.constraints.providers) == ["openb", "cloud-a"]
    assert list(grant.constraints.regions) == ["openb/west", "cloud-a/eu"]
    # Both pages of the listing were read.
    assert fake_scheduler[0].calls == ["", "1"]


async def test_award_without_limits_skips_scheduler(
    grant_service: RunningGrant, fake_scheduler: tuple[FakeScheduler, str]
) -> None:
    application_id = await reviewed_application(grant_service)
    fake_scheduler[0].failing = True
    office = grant_service.stub("office", ["program_office"])
    decided = await office.DecideApplication(award(application_id))
    assert decided.state == grant_pb2.APPLICATION_STATE_AWARDED
    assert fake_scheduler[0].calls == []


async def test_award_unavailable_when_scheduler_fails(
    grant_service: RunningGrant, fake_scheduler: tuple[FakeScheduler, str]
) -> None:
    application_id = await reviewed_application(grant_service)
    fake_scheduler[0].failing = True
    office = grant_service.stub("office", ["program_office"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await office.DecideApplication(award(application_id, ("openb",)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    message = caught.value.details() or ""
    assert "did not list its providers (UNAVAILABLE: no leader)" in message
    assert "nothing was changed" in message
    await assert_still_in_review(grant_service, application_id)


async def test_application_rejects_unregistered_region(grant_service: RunningGrant) -> None:
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    message = application(grant_pb2.GRANT_TIER_EXPLORATORY, "5")
    message.regions.append("openb/moon")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=rid(), application=message)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "application.regions[0]" in field_violations(caught.value)
    listed = await pi.ListApplications(grant_pb2.ListApplicationsRequest(project_id="proj-a"))
    assert list(listed.applications) == []


async def test_application_accepts_registered_region(grant_service: RunningGrant) -> None:
    application_id = await reviewed_application(grant_service, ("openb/east",))
    await assert_still_in_review(grant_service, application_id)


async def test_application_authorized_before_region_check(
    grant_service: RunningGrant, fake_scheduler: tuple[FakeScheduler, str]
) -> None:
    member = grant_service.stub("bob", ["researcher"], "uni-a")
    message = application(grant_pb2.GRANT_TIER_EXPLORATORY, "5")
    message.regions.append("openb/moon")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await member.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(request_id=rid(), application=message)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fake_scheduler[0].calls == []


async def test_application_retry_skips_scheduler(
    grant_service: RunningGrant, fake_scheduler: tuple[FakeScheduler, str]
) -> None:
    pi = grant_service.stub("alice", ["pi"], "uni-a")
    message = application(grant_pb2.GRANT_TIER_STANDARD, "20")
    message.regions.append("openb/east")
    request = grant_pb2.SubmitApplicationRequest(request_id=rid(), application=message)
    first = await pi.SubmitApplication(request)
    fake_scheduler[0].failing = True
    fake_scheduler[0].calls.clear()
    again = await pi.SubmitApplication(request)
    assert again.application_id == first.application_id
    assert fake_scheduler[0].calls == []
