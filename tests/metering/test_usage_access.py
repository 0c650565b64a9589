"""Usage reads show a researcher only the projects they are a member of.

Membership comes from a real grant service (in-process), which the metering service queries
with its own service token, as the scheduler does at submit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from acsp.cli import usage as usage_cli
from acsp.cli.main import main
from acsp.subjects import usage_subject
from acsp.v1 import common_pb2, grant_pb2, metering_pb2, metering_pb2_grpc
from services.metering.attempts import AttemptFacts, record_attempt
from services.metering.service import build_service
from services.metering.settings import MeteringSettings
from services.runtime.auth import mint_token
from services.runtime.channel import open_channel
from services.runtime.db import Database
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    count,
    drain,
    make_charger,
    report,
    sample,
    wait_until,
)
from tests.metering.test_service import BlockingStub


class Callers:
    """A metering stub and bearer tokens signed with the grant service's key."""

    def __init__(self, channel: grpc.aio.Channel, grant: RunningGrant, address: str) -> None:
        self.stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self.address = address
        """The metering service's address, for blocking calls such as the CLI makes."""
        self.grant = grant

    def metadata(self, subject: str, *roles: str) -> list[tuple[str, str]]:
        token = mint_token(self.grant.key, subject, list(roles), institution="uni-a")
        return [("authorization", f"Bearer {token}")]

    async def usage(
        self, subject: str, role: str, project_id: str = "", grant_id: str = ""
    ) -> list[str]:
        """Return the project keys of a QueryUsage grouped by project."""
        response = await self.stub.QueryUsage(
            metering_pb2.QueryUsageRequest(
                grouping=metering_pb2.USAGE_GROUPING_PROJECT,
                range=_window(),
                project_id=project_id,
                grant_id=grant_id,
            ),
            metadata=self.metadata(subject, role),
            timeout=20,
        )
        return [row.key for row in response.rows]

    async def usage_error(
        self, subject: str, role: str, project_id: str = "", grant_id: str = ""
    ) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await self.usage(subject, role, project_id, grant_id)
        return raised.value

    async def charged_jobs(self, subject: str, role: str, job_id: str = "") -> list[str]:
        """Return the job of each charge ListCharges shows ``subject``."""
        response = await self.stub.ListCharges(
            metering_pb2.ListChargesRequest(job_id=job_id),
            metadata=self.metadata(subject, role),
            timeout=20,
        )
        return [charge.job_id for charge in response.charges]

    async def efficiency_jobs(self, subject: str, role: str, project_id: str = "") -> list[str]:
        """Return the jobs ListJobEfficiency shows ``subject``."""
        response = await self.stub.ListJobEfficiency(
            metering_pb2.ListJobEfficiencyRequest(project_id=project_id),
            metadata=self.metadata(subject, role),
            timeout=20,
        )
        return [job.job_id for job in response.jobs]

    async def refunds_code(self, subject: str, role: str, job_id: str = "") -> grpc.StatusCode:
        """Return the status of a ListRefunds call by ``subject``."""
        try:
            await self.refunds(subject, role, job_id)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    async def refunds(
        self, subject: str, role: str, job_id: str = "", provider_id: str = ""
    ) -> metering_pb2.ListRefundsResponse:
        return await self.stub.ListRefunds(
            metering_pb2.ListRefundsRequest(job_id=job_id, provider_id=provider_id),
            metadata=self.metadata(subject, role),
            timeout=20,
        )

    async def error_code(self, call: Awaitable[object]) -> grpc.StatusCode:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


def _window() -> common_pb2.TimeWindow:
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(T0)
    end.FromDatetime(T0 + timedelta(hours=2))
    return common_pb2.TimeWindow(start_time=start, end_time=end)


@pytest.fixture
async def callers(
    database_url: str, nats_url: str, grant_schema: str, tmp_path: Path, db: Database
) -> AsyncIterator[tuple[Callers, str]]:
    """Run a grant service and a metering service, and yield the callers and proj-a's grant.

    Project proj-a has PI alice and member bob. Metering stores usage of proj-a and proj-b.
    """
    async with running_grant(grant_schema, tmp_path) as grant:
        await setup_project(grant)
        grant_id = await standard_grant(grant, "10")
        env = {
            "ACSP_DATABASE_URL": database_url,
            "ACSP_NATS_URL": nats_url,
            "ACSP_GRPC_LISTEN": "127.0.0.1:0",
            "ACSP_TOKEN_PUBLIC_KEY": str(tmp_path / "token" / "signing.pub"),
            # The grant service's signing key is here, so metering mints its service token.
            "ACSP_DATA_DIR": str(tmp_path),
            "ACSP_GRANT_ADDRESS": grant.address,
        }
        service = build_service(MeteringSettings.from_env(env))
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        channel = open_channel(service.address)
        try:
            assert service.runtime is not None and service.runtime.js is not None
            await _store_usage(service.runtime.js, db, grant_id)
            yield Callers(channel, grant, service.address), grant_id
        finally:
            await channel.close()
            service.stop(grace_s=1.0)
            await asyncio.wait_for(task, 30)


async def _store_usage(js: JetStreamContext, db: Database, grant_id: str) -> None:
    """Store and charge an hour of usage for job-a of proj-a and job-b of proj-b."""
    # Each job has an accelerator of its own: two jobs on one whole accelerator are rejected.
    items = [
        sample(f"node-1/{job}-{i}", job, T0 + timedelta(minutes=i), accelerator_id=accelerator)
        for job, accelerator in (("job-a", "GPU-0"), ("job-b", "GPU-1"))
        for i in range(60)
    ]
    await js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))
    await wait_until(
        lambda: _rows_equal(db, "SELECT count(*) FROM metering.usage_samples", len(items))
    )
    async with db.acquire() as conn:
        for job, project, grant in (("job-a", "proj-a", grant_id), ("job-b", "proj-b", "g-b")):
            await record_attempt(
                conn,
                AttemptFacts(
                    job_id=job,
                    attempt=0,
                    hold_id=f"hold-{job}",
                    grant_id=grant,
                    project_id=project,
                    institution_id="uni-a",
                    started_at=T0,
                    ended_at=T0 + timedelta(hours=1),
                    end_reason="completed",
                    cause="test",
                ),
            )
    await drain(make_charger(db, LedgerDouble(), Clock(T0 + timedelta(hours=2))))


async def _rows_equal(db: Database, sql: str, expected: int) -> bool:
    return await count(db, sql) == expected


async def test_office_sees_every_project(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    assert await client.usage("office", "program_office") == ["proj-a", "proj-b"]
    assert await client.usage("scheduler", "service") == ["proj-a", "proj-b"]


async def test_member_sees_own_project(callers: tuple[Callers, str]) -> None:
    client, grant_id = callers
    assert await client.usage("bob", "researcher", project_id="proj-a") == ["proj-a"]
    assert await client.usage("alice", "pi", project_id="proj-a") == ["proj-a"]
    assert await client.usage("bob", "researcher", grant_id=grant_id) == ["proj-a"]


async def test_other_projects_are_not_found(callers: tuple[Callers, str]) -> None:
    client, grant_id = callers
    other = await client.usage_error("mallory", "researcher", project_id="proj-a")
    assert other.code() == grpc.StatusCode.NOT_FOUND
    assert other.details() == "project 'proj-a' not found"
    by_grant = await client.usage_error("mallory", "researcher", grant_id=grant_id)
    assert by_grant.code() == grpc.StatusCode.NOT_FOUND
    assert by_grant.details() == f"grant {grant_id!r} not found"
    unnamed = await client.usage_error("bob", "researcher")
    assert unnamed.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "set project_id or grant_id" in (unnamed.details() or "")


async def test_unknown_project_or_grant_not_found(callers: tuple[Callers, str]) -> None:
    client, grant_id = callers
    project = await client.usage_error("bob", "researcher", project_id="proj-b")
    assert project.code() == grpc.StatusCode.NOT_FOUND
    grant = await client.usage_error("bob", "researcher", grant_id=f"g-{uuid.uuid4().hex}")
    assert grant.code() == grpc.StatusCode.NOT_FOUND
    mismatch = await client.usage_error("bob", "researcher", project_id="proj-b", grant_id=grant_id)
    assert mismatch.code() == grpc.StatusCode.NOT_FOUND


async def test_charges_scoped_to_member_jobs(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    assert set(await client.charged_jobs("office", "program_office")) == {"job-a", "job-b"}
    assert set(await client.charged_jobs("bob", "researcher", job_id="job-a")) == {"job-a"}
    other = client.charged_jobs("mallory", "researcher", job_id="job-a")
    assert await client.error_code(other) == grpc.StatusCode.NOT_FOUND
    unnamed = client.charged_jobs("bob", "researcher")
    assert await client.error_code(unnamed) == grpc.StatusCode.PERMISSION_DENIED
    unknown = client.charged_jobs("bob", "researcher", job_id="job-z")
    assert await client.error_code(unknown) == grpc.StatusCode.NOT_FOUND


async def test_efficiency_scoped_to_member_projects(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    assert await client.efficiency_jobs("office", "program_office") == ["job-a", "job-b"]
    assert await client.efficiency_jobs("bob", "researcher", project_id="proj-a") == ["job-a"]
    other = client.efficiency_jobs("mallory", "researcher", project_id="proj-a")
    assert await client.error_code(other) == grpc.StatusCode.NOT_FOUND
    unnamed = client.efficiency_jobs("bob", "researcher")
    assert await client.error_code(unnamed) == grpc.StatusCode.PERMISSION_DENIED


async def test_refunds_scoped_to_member_jobs(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    assert await client.refunds_code("office", "program_office") == grpc.StatusCode.OK
    assert await client.refunds_code("bob", "researcher", job_id="job-a") == grpc.StatusCode.OK
    other = await client.refunds_code("mallory", "researcher", job_id="job-a")
    assert other == grpc.StatusCode.NOT_FOUND
    unnamed = await client.refunds_code("bob", "researcher")
    assert unnamed == grpc.StatusCode.PERMISSION_DENIED


async def test_job_of_other_project_looks_unknown(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    answers = []
    for job_id in ("job-a", "job-z"):
        for call in (
            client.stub.ListCharges(
                metering_pb2.ListChargesRequest(job_id=job_id), **_as_mallory(client)
            ),
            client.stub.ListRefunds(
                metering_pb2.ListRefundsRequest(job_id=job_id), **_as_mallory(client)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            answers.append((raised.value.code(), raised.value.details()))
    for code, details in answers:
        assert code == grpc.StatusCode.NOT_FOUND
        assert "proj-a" not in (details or "")
    assert answers[0] == (grpc.StatusCode.NOT_FOUND, "job 'job-a' not found")
    assert answers[1] == answers[0]
    assert answers[2] == (grpc.StatusCode.NOT_FOUND, "job 'job-z' not found")


async def test_grant_of_other_project_looks_unknown(
    callers: tuple[Callers, str], db: Database
) -> None:
    client, grant_id = callers
    await _carol_with_job(client, db)
    carol = {"metadata": client.metadata("carol", "pi"), "timeout": 20}
    # Carol names her own job or project with a grant of proj-a, then with an unknown grant.
    for grant in (grant_id, f"g-{uuid.uuid4().hex}"):
        charges = metering_pb2.ListChargesRequest(job_id="job-c", grant_id=grant)
        usage = metering_pb2.QueryUsageRequest(range=_window(), project_id="proj-c", grant_id=grant)
        for call in (
            client.stub.ListCharges(charges, **carol),
            client.stub.QueryUsage(usage, **carol),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            assert raised.value.details() == f"grant {grant!r} not found"
    assert await client.charged_jobs("carol", "pi", job_id="job-c") == []


async def _carol_with_job(client: Callers, db: Database) -> None:
    """Create project proj-c of PI carol, and store an attempt of its job job-c."""
    pi = client.grant.stub("carol", ["pi"], "uni-a")
    await pi.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id=uuid.uuid4().hex,
            project=grant_pb2.Project(
                project_id="proj-c",
                institution_id="uni-a",
                display_name="Project C",
                pi_subject="carol",
            ),
        )
    )
    async with db.acquire() as conn:
        await record_attempt(
            conn,
            AttemptFacts(
                job_id="job-c",
                attempt=0,
                hold_id="hold-job-c",
                grant_id="g-c",
                project_id="proj-c",
                institution_id="uni-a",
                started_at=T0,
                ended_at=T0 + timedelta(minutes=1),
                end_reason="completed",
                cause="test",
            ),
        )


def _as_mallory(client: Callers) -> dict[str, Any]:
    """Return the call options of a researcher who is a member of no project here."""
    return {"metadata": client.metadata("mallory", "researcher"), "timeout": 20}


async def test_provider_refunds_denial_names_refunds(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await client.refunds("bob", "researcher", provider_id="prov-a")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not see the refunds of provider 'prov-a'" in (denied.value.details() or "")
    assert "settlement" not in (denied.value.details() or "")


async def test_unfiltered_listing_asks_for_filter(callers: tuple[Callers, str]) -> None:
    client, _ = callers
    with pytest.raises(grpc.aio.AioRpcError) as charges:
        await client.charged_jobs("bob", "researcher")
    assert charges.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a filter is required" in (charges.value.details() or "")
    assert "set grant_id or job_id" in (charges.value.details() or "")
    assert "only of projects" not in (charges.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refunds:
        await client.refunds("bob", "researcher")
    assert refunds.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a filter is required" in (refunds.value.details() or "")
    assert "set job_id" in (refunds.value.details() or "")


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (["charges"], ["--grant GRANT", "--job JOB"]),
        (["refunds"], ["--job JOB", "--provider"]),
        (["query", "--from", "2026-01-01", "--to", "2026-02-01"], ["--project", "--grant"]),
        (["efficiency"], ["--project PROJECT"]),
    ],
)
async def test_unfiltered_cli_listing_names_options(
    callers: tuple[Callers, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    options: list[str],
) -> None:
    client, _ = callers

    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(client.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            yield BlockingStub(stub, client.metadata("bob", "researcher"))

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    code = await asyncio.to_thread(main, ["usage", *command])
    captured = capsys.readouterr()
    assert code == 2
    assert "a filter is required" in captured.err
    for option in options:
        assert option in captured.err
    assert "job_id" not in captured.err
    assert "project_id" not in captured.err
    assert captured.out == ""
