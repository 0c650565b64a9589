"""The project directory calls the grant service once per key while its result is fresh."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from acsp.v1 import grant_pb2
from scheduler.service.model import JobSpec
from scheduler.service.projects import ProjectDirectory
from services.runtime.auth import Principal, Role
from services.runtime.errors import NotFound, PermissionDenied


class CountingGrants:
    """A grant service with one project ``p1`` (PI ``pi``) and its grant ``g1``."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetProject(
        self, request: grant_pb2.GetProjectRequest, **options: object
    ) -> grant_pb2.Project:
        self.calls += 1
        await asyncio.sleep(0.01)
        if request.project_id != "p1":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        return grant_pb2.Project(project_id="p1", pi_subject="pi")

    async def GetGrant(
        self, request: grant_pb2.GetGrantRequest, **options: object
    ) -> grant_pb2.Grant:
        self.calls += 1
        return grant_pb2.Grant(grant_id=request.grant_id, project_id="p1")


def user(subject: str) -> Principal:
    return Principal(subject=subject, kind="user", roles=frozenset({Role.RESEARCHER}))


def spec(project: str, grant: str = "") -> JobSpec:
    return JobSpec(name="j", project_id=project, grant_id=grant, command=("true",))


async def test_concurrent_lookups_share_one_call() -> None:
    grants = CountingGrants()
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]

    await asyncio.gather(*(directory.check_submitter(user("pi"), spec("p1")) for _ in range(50)))
    await directory.check_submitter(user("pi"), spec("p1"))

    assert grants.calls == 1


async def test_missing_project_and_outsider_rejected() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    with pytest.raises(NotFound):
        await directory.check_submitter(user("pi"), spec("p2"))
    with pytest.raises(PermissionDenied):
        await directory.check_submitter(user("mallory"), spec("p1", "g1"))


async def test_cache_stays_bounded() -> None:
    directory = ProjectDirectory(CountingGrants(), max_entries=3)  # type: ignore[arg-type]

    for i in range(10):
        await directory.project(f"missing-{i}")

    assert len(directory._projects) == 3
