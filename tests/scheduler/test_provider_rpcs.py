"""RegisterProvider and ListProviders through gRPC, and jurisdiction constraints end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role
from services.runtime.errors import field_violations

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        await stack.start_metering()
        yield stack
    finally:
        await stack.close()


def register_request(
    provider_id: str, jurisdiction: str, request_id: str = ""
) -> scheduler_pb2.RegisterProviderRequest:
    return scheduler_pb2.RegisterProviderRequest(
        request_id=request_id,
        provider=scheduler_pb2.Provider(
            provider_id=provider_id,
            display_name=f"{provider_id} cloud",
            regions=[
                scheduler_pb2.Region(
                    region_id="reg", display_name="Region", jurisdiction=jurisdiction
                )
            ],
        ),
    )


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def list_all(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub, md: tuple[tuple[str, str], ...]
) -> tuple[list[scheduler_pb2.Provider], int]:
    """Every provider, one per page; return them with the number of pages."""
    providers: list[scheduler_pb2.Provider] = []
    token = ""
    pages = 0
    while True:
        response = await scheduler.ListProviders(
            scheduler_pb2.ListProvidersRequest(
                page=common_pb2.PageRequest(page_size=1, page_token=token)
            ),
            metadata=md,
            timeout=10,
        )
        providers += response.providers
        pages += 1
        token = response.page.next_page_token
        if not token:
            return providers, pages


def job_spec(project: str, grant: str, jurisdiction: str) -> scheduler_pb2.JobSpec:
    return scheduler_pb2.JobSpec(
        name="resident",
        project_id=project,
        grant_id=grant,
        task_count=2,
        accelerator_millis_per_task=1000,
        gang=True,
        wall_time_seconds=600,
        command=["true"],
        allowed_regions=[f"jurisdiction:{jurisdiction}"],
    )


async def placed_providers(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: tuple[tuple[str, str], ...],
    job_id: str,
) -> set[str]:
    async def placements() -> set[str]:
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
        return {p.provider_id for p in job.placements}

    found: set[str] = await wait_for(placements, 40, f"job {job_id} to be placed", 0.2)
    return found


async def test_registry_authorizes_validates_and_lists(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, name="agents-eu", provider="eu")
    stack.start_agents(nodes=1, name="agents-cn", provider="cn")
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    eu_operator = metadata(stack.token("op-eu", Role.PROVIDER_OPERATOR, provider="eu"))
    service = metadata(stack.token("metering", Role.SERVICE))
    researcher = metadata(stack.token("alice", Role.RESEARCHER))
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def both_auto_registered() -> list[scheduler_pb2.Provider]:
            providers, _ = await list_all(scheduler, researcher)
            return providers if len(providers) == 2 else []

        auto = await wait_for(both_auto_registered, 30, "the agents' providers to register", 0.2)
        denied_researcher = await rpc_error(
            scheduler.RegisterProvider(register_request("eu", "EU"), metadata=researcher)
        )
        denied_other = await rpc_error(
            scheduler.RegisterProvider(register_request("cn", "CN"), metadata=eu_operator)
        )
        denied_service = await rpc_error(
            scheduler.RegisterProvider(register_request("eu", "EU"), metadata=service)
        )
        invalid = await rpc_error(
            scheduler.RegisterProvider(register_request("eu", "eu-1"), metadata=eu_operator)
        )
        missing = await rpc_error(
            scheduler.RegisterProvider(
                scheduler_pb2.RegisterProviderRequest(request_id="x"), metadata=office
            )
        )
        first = await scheduler.RegisterProvider(
            register_request("eu", "EU", "register-eu"), metadata=eu_operator, timeout=10
        )
        retried = await scheduler.RegisterProvider(
            register_request("eu", "EU", "register-eu"), metadata=eu_operator, timeout=10
        )
        reused = await rpc_error(
            scheduler.RegisterProvider(
                register_request("eu", "CH", "register-eu"), metadata=eu_operator
            )
        )
        await scheduler.RegisterProvider(register_request("cn", "CN"), metadata=office, timeout=10)
        listed, pages = await list_all(scheduler, researcher)
        bad_token = await rpc_error(
            scheduler.ListProviders(
                scheduler_pb2.ListProvidersRequest(page=common_pb2.PageRequest(page_token="bogus")),
                metadata=researcher,
            )
        )
    assert {p.provider_id: [r.jurisdiction for r in p.regions] for p in auto} == {
        "cn": [""],
        "eu": [""],
    }
    assert denied_researcher.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied_other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied_service.code() == grpc.StatusCode.PERMISSION_DENIED
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(invalid)) == {"provider.regions[0].jurisdiction"}
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "provider" in (missing.details() or "")
    assert first.regions[0].jurisdiction == "EU"
    assert retried == first
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (reused.details() or "")
    assert pages == 2
    assert {p.provider_id: p.regions[0].jurisdiction for p in listed} == {"cn": "CN", "eu": "EU"}
    assert {p.provider_id: p.display_name for p in listed} == {"cn": "cn cloud", "eu": "eu cloud"}
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_jurisdiction_jobs_run_in_their_regions_across_restart(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    stack.start_agents(nodes=1, name="agents-eu", provider="eu")
    stack.start_agents(nodes=1, name="agents-cn", provider="cn")
    project, grant, pi = await fund_grant(stack)
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        await scheduler.RegisterProvider(register_request("eu", "EU"), metadata=office, timeout=10)
        await scheduler.RegisterProvider(register_request("cn", "CN"), metadata=office, timeout=10)
        unknown = await rpc_error(
            scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, "US")), metadata=md
            )
        )
        cn_job = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, "CN")),
            metadata=md,
            timeout=10,
        )
        cn_providers = await placed_providers(scheduler, md, cn_job.job.job_id)
    scheduler_process.stop()
    _, address = await stack.start_scheduler("scheduler-2")
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def submit_eu() -> scheduler_pb2.SubmitJobResponse | None:
            try:
                return await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(
                        request_id="eu-job", spec=job_spec(project, grant, "EU")
                    ),
                    metadata=md,
                    timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return None

        eu_job = await wait_for(submit_eu, 30, "the restarted scheduler to lead", 0.2)
        eu_providers = await placed_providers(scheduler, md, eu_job.job.job_id)
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CN, EU" in field_violations(unknown)["spec.allowed_regions[0]"]
    assert cn_providers == {"cn"}
    assert eu_providers == {"eu"}
