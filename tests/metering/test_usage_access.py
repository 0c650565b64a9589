"""QueryUsage shows a researcher only the usage of projects they are a member of.

Membership comes from a real grant service (in-process), which the metering service queries
with its own service token, as the scheduler does at submit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from acsp.subjects import usage_subject
from acsp.v1 import common_pb2, metering_pb2, metering_pb2_grpc
from services.metering.attempts import AttemptFacts, record_attempt
from services.metering.service import build_service
from services.metering.settings import MeteringSettings
from services.runtime.auth import mint_token
from services.runtime.channel import open_channel
from services.runtime.db import Database
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant
from tests.metering.helpers import T0, count, report, sample, wait_until


class Callers:
    """A metering stub and bearer tokens signed with the grant service's key."""

    def __init__(self, channel: grpc.aio.Channel, grant: RunningGrant) -> None:
        self.stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self._grant = grant

    def metadata(self, subject: str, *roles: str) -> list[tuple[str, str]]:
        token = mint_token(self._grant.key, subject, list(roles), institution="uni-a")
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
            yield Callers(channel, grant), grant_id
        finally:
            await channel.close()
            service.stop(grace_s=1.0)
            await asyncio.wait_for(task, 30)


async def _store_usage(js: JetStreamContext, db: Database, grant_id: str) -> None:
    """Store an hour of usage for job-a of proj-a and job-b of proj-b."""
    items = [
        sample(f"node-1/{job}-{i}", job, T0 + timedelta(minutes=i))
        for job in ("job-a", "job-b")
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
                    cause="test",
                ),
            )


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


async def test_researcher_denied_other_projects(callers: tuple[Callers, str]) -> None:
    client, grant_id = callers
    other = await client.usage_error("mallory", "researcher", project_id="proj-a")
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a member of project 'proj-a'" in (other.details() or "")
    by_grant = await client.usage_error("mallory", "researcher", grant_id=grant_id)
    assert by_grant.code() == grpc.StatusCode.PERMISSION_DENIED
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
