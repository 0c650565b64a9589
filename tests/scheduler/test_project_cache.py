"""The project directory calls the grant service once per key while its result is fresh."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import grpc
import pytest

from acsp.v1 import grant_pb2
from scheduler.service.award_check import AwardCeiling
from scheduler.service.model import JobSpec
from scheduler.service.projects import ProjectDirectory
from services.runtime.auth import Principal, Role
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied


class CountingGrants:
    """A grant service with one project ``p1`` (PI ``pi``, members ``bob`` and ``carol``,
    viewer ``vera``) and its grant ``g1``, which has sub-allocation ``s1`` held by ``bob``.

    Any other grant id is a grant of ``p1`` too: ``old`` has expired, and the validity of
    ``ended`` is over although the grant service has not yet expired it."""

    def __init__(self) -> None:
        self.calls = 0
        self.allocations = {"s1": "bob"}

    async def GetProject(
        self, request: grant_pb2.GetProjectRequest, **options: object
    ) -> grant_pb2.Project:
        self.calls += 1
        await asyncio.sleep(0.01)
        if request.project_id != "p1":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        member = grant_pb2.ProjectMember(subject="bob", role=grant_pb2.PROJECT_ROLE_MEMBER)
        other = grant_pb2.ProjectMember(subject="carol", role=grant_pb2.PROJECT_ROLE_MEMBER)
        viewer = grant_pb2.ProjectMember(subject="vera", role=grant_pb2.PROJECT_ROLE_VIEWER)
        return grant_pb2.Project(project_id="p1", pi_subject="pi", members=[member, other, viewer])

    async def GetGrant(
        self, request: grant_pb2.GetGrantRequest, **options: object
    ) -> grant_pb2.Grant:
        self.calls += 1
        grant = grant_pb2.Grant(grant_id=request.grant_id, project_id="p1")
        if request.grant_id == "old":
            grant.state = grant_pb2.GRANT_STATE_EXPIRED
            grant.validity.end_time.FromSeconds(1_700_000_000)
        elif request.grant_id == "ended":
            grant.validity.end_time.FromSeconds(1_700_000_000)
        return grant

    async def ListGrants(
        self, request: grant_pb2.ListGrantsRequest, **options: object
    ) -> grant_pb2.ListGrantsResponse:
        self.calls += 1
        await asyncio.sleep(0.01)
        if request.project_id != "p1":
            return grant_pb2.ListGrantsResponse()
        listed = []
        for grant_id, credited in (("g1", "10"), ("old", "5"), ("ended", "5"), ("g2", "2")):
            grant = grant_pb2.Grant(grant_id=grant_id, project_id="p1", supplemented=True)
            grant.balance.credited_pf_days.value = credited
            if grant_id == "old":
                grant.state = grant_pb2.GRANT_STATE_EXPIRED
            elif grant_id == "ended":
                grant.validity.end_time.FromSeconds(1_700_000_000)
            elif grant_id == "g2":
                grant.constraints.accelerator_models.append("H100-SXM5-80GB")
                grant.supplemented = False
            listed.append(grant)
        return grant_pb2.ListGrantsResponse(grants=listed)

    async def ListSubAllocations(
        self, request: grant_pb2.ListSubAllocationsRequest, **options: object
    ) -> grant_pb2.ListSubAllocationsResponse:
        self.calls += 1
        listed = self.allocations if request.grant_id == "g1" else {}
        return grant_pb2.ListSubAllocationsResponse(
            sub_allocations=[
                grant_pb2.SubAllocation(sub_allocation_id=k, grant_id="g1", holder=v)
                for k, v in listed.items()
            ]
        )


def user(subject: str) -> Principal:
    return Principal(subject=subject, kind="user", roles=frozenset({Role.RESEARCHER}))


def spec(project: str, grant: str = "", allocation: str = "") -> JobSpec:
    return JobSpec(
        name="j",
        project_id=project,
        grant_id=grant,
        sub_allocation_id=allocation,
        command=("true",),
    )


async def test_concurrent_lookups_share_one_call() -> None:
    grants = CountingGrants()
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]

    await asyncio.gather(*(directory.check_submitter(user("pi"), spec("p1")) for _ in range(50)))
    await directory.check_submitter(user("pi"), spec("p1"))

    assert grants.calls == 1


async def test_missing_project_and_outsider_rejected() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    with pytest.raises(NotFound) as missing:
        await directory.check_submitter(user("pi"), spec("p2"))
    with pytest.raises(NotFound) as outsider:
        await directory.check_submitter(user("mallory"), spec("p1", "g1"))

    # An outsider learns no more about p1 and its grant than about a project that is missing.
    assert outsider.value.kind == "project"
    assert outsider.value.message == missing.value.message.replace("'p2'", "'p1'")


async def test_viewer_cannot_submit() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    await directory.check_submitter(user("carol"), spec("p1", "g1"))
    with pytest.raises(PermissionDenied) as denied:
        await directory.check_submitter(user("vera"), spec("p1", "g1"))

    assert "'vera' is a viewer of project 'p1'" in denied.value.message


async def test_cache_stays_bounded() -> None:
    directory = ProjectDirectory(CountingGrants(), max_entries=3)  # type: ignore[arg-type]

    for i in range(10):
        await directory.project(f"missing-{i}")

    assert len(directory._projects) == 3


async def test_sub_allocation_holder_or_pi_only() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]
    service = Principal(subject="scheduler", kind="service", roles=frozenset({Role.SERVICE}))

    await directory.check_submitter(user("bob"), spec("p1", "g1", "s1"))
    await directory.check_submitter(user("pi"), spec("p1", "g1", "s1"))
    await directory.check_submitter(service, spec("p1", "g1", "s1"))
    with pytest.raises(PermissionDenied) as denied:
        await directory.check_submitter(user("carol"), spec("p1", "g1", "s1"), "jobs[2].spec")

    assert "jobs[2].spec.sub_allocation_id" in denied.value.message
    assert "held by 'bob'" in denied.value.message


async def test_unknown_sub_allocation_names_field() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    with pytest.raises(NotFound) as missing:
        await directory.check_submitter(user("pi"), spec("p1", "g1", "s9"))

    assert missing.value.message.startswith("spec.sub_allocation_id: sub-allocation 's9'")
    assert "grant 'g1'" in missing.value.message


async def test_sub_allocation_miss_refetched_when_stale() -> None:
    grants = CountingGrants()
    fresh = ProjectDirectory(grants)  # type: ignore[arg-type]
    stale = ProjectDirectory(grants, missing_ttl_s=0.0)  # type: ignore[arg-type]

    assert await fresh.sub_allocation_holder("g1", "s2") is None
    assert await stale.sub_allocation_holder("g1", "s2") is None
    grants.allocations["s2"] = "carol"
    calls = grants.calls

    assert await fresh.sub_allocation_holder("g1", "s2") is None
    assert grants.calls == calls
    assert await stale.sub_allocation_holder("g1", "s2") == "carol"
    assert grants.calls == calls + 1


@pytest.mark.parametrize("grant", ["old", "ended"])
async def test_expired_grant_rejected(grant: str) -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    with pytest.raises(FailedPrecondition) as caught:
        await directory.check_submitter(user("bob"), spec("p1", grant), "spec")

    assert caught.value.field == "spec.grant_id"
    assert f"grant '{grant}' has expired (its validity ended 2023-11-14 22:13:20 UTC)" in str(
        caught.value.reason
    )


async def test_reload_grant_skips_cache() -> None:
    grants = CountingGrants()
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]

    await directory.grant("g1")
    reloaded = await directory.reload_grant("g1")
    await directory.grant("g1")

    assert reloaded is not None
    assert reloaded.project_id == "p1"
    # The reload called the grant service again and refreshed the cached entry.
    assert grants.calls == 2


async def test_project_ceilings_cached_per_project() -> None:
    grants = CountingGrants()
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]

    first = await asyncio.gather(*(directory.project_ceilings("p1") for _ in range(20)))
    again = await directory.project_ceilings("p1")
    listed = await directory.grant("g2")

    assert grants.calls == 1
    assert first[0] == again
    assert again == [
        AwardCeiling("g1", "", Decimal(10), True),
        AwardCeiling("g2", "", Decimal(2), False, ("H100-SXM5-80GB",)),
    ]
    assert listed is not None
    assert listed.credited == Decimal(2)


async def test_project_without_grants_has_no_ceilings() -> None:
    directory = ProjectDirectory(CountingGrants())  # type: ignore[arg-type]

    assert await directory.project_ceilings("p2") == []


async def test_recent_ceilings_refetch_old_list() -> None:
    grants = CountingGrants()
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]
    stale_grants = CountingGrants()
    stale = ProjectDirectory(stale_grants, missing_ttl_s=0.0)  # type: ignore[arg-type]

    await directory.project_ceilings("p1")
    await directory.project_ceilings("p1", recent=True)
    await stale.project_ceilings("p1")
    await stale.project_ceilings("p1", recent=True)

    # A list younger than missing_ttl_s counts as recent, and an older one is fetched again.
    assert grants.calls == 1
    assert stale_grants.calls == 2


class SubProjectGrants(CountingGrants):
    """``CountingGrants`` plus project ``q1`` (PI ``pi``, member ``dana``, viewer ``vic``) and
    project ``x1`` of another PI (``olga``, member ``eve``). Grant ``g1`` of ``p1`` has
    sub-allocation ``sq`` held by the sub-project ``q1`` and ``sx`` held by ``x1``."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations.update({"sq": "q1", "sx": "x1"})

    async def GetProject(
        self, request: grant_pb2.GetProjectRequest, **options: object
    ) -> grant_pb2.Project:
        members = {
            "q1": ("pi", [("dana", grant_pb2.PROJECT_ROLE_MEMBER)], "vic"),
            "x1": ("olga", [("eve", grant_pb2.PROJECT_ROLE_MEMBER)], ""),
        }
        if request.project_id not in members:
            return await super().GetProject(request, **options)
        pi, listed, viewer = members[request.project_id]
        project = grant_pb2.Project(project_id=request.project_id, pi_subject=pi)
        for subject, role in listed:
            project.members.append(grant_pb2.ProjectMember(subject=subject, role=role))
        if viewer:
            project.members.append(
                grant_pb2.ProjectMember(subject=viewer, role=grant_pb2.PROJECT_ROLE_VIEWER)
            )
        return project


async def test_sub_project_members_draw_on_its_allocation() -> None:
    directory = ProjectDirectory(SubProjectGrants())  # type: ignore[arg-type]

    limits = await directory.check_submitter(user("dana"), spec("q1", "g1", "sq"))
    await directory.check_submitter(user("pi"), spec("q1", "g1", "sq"))

    assert limits is not None


async def test_sub_project_viewer_cannot_draw() -> None:
    directory = ProjectDirectory(SubProjectGrants())  # type: ignore[arg-type]

    with pytest.raises(PermissionDenied) as denied:
        await directory.check_submitter(user("vic"), spec("q1", "g1", "sq"))

    assert "'vic' is a viewer of project 'q1'" in denied.value.message


@pytest.mark.parametrize(
    ("who", "job"),
    [
        ("dana", spec("q1", "g1")),
        ("dana", spec("q1", "g1", "s1")),
        ("eve", spec("x1", "g1", "sx")),
    ],
    ids=["grant itself", "member's allocation", "project of another PI"],
)
async def test_other_project_cannot_draw_on_grant(who: str, job: JobSpec) -> None:
    directory = ProjectDirectory(SubProjectGrants())  # type: ignore[arg-type]

    with pytest.raises(NotFound) as missing:
        await directory.check_submitter(user(who), job)

    assert missing.value.kind == "grant"


class HeldGrants(SubProjectGrants):
    """``SubProjectGrants`` that also lists sub-allocations by holder across grants, with
    ``extra`` sub-allocations (id to grant and holder) of other grants of ``p1``."""

    def __init__(self, extra: dict[str, tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.extra = extra or {}

    async def ListSubAllocations(
        self, request: grant_pb2.ListSubAllocationsRequest, **options: object
    ) -> grant_pb2.ListSubAllocationsResponse:
        if request.grant_id:
            return await super().ListSubAllocations(request, **options)
        self.calls += 1
        held = {k: ("g1", v) for k, v in self.allocations.items()} | self.extra
        listed = []
        for allocation_id, (grant_id, holder) in sorted(held.items()):
            if holder == request.holder:
                allocation = grant_pb2.SubAllocation(
                    sub_allocation_id=allocation_id, grant_id=grant_id, holder=holder
                )
                allocation.balance.available_pf_days.value = "1.5"
                listed.append(allocation)
        return grant_pb2.ListSubAllocationsResponse(sub_allocations=listed)


async def test_sub_project_job_picks_its_allocation() -> None:
    directory = ProjectDirectory(HeldGrants())  # type: ignore[arg-type]

    picked = await directory.pick_sub_allocation(spec("q1"))
    limits = await directory.check_submitter(user("dana"), picked)

    assert picked.grant_id == "g1"
    assert picked.sub_allocation_id == "sq"
    assert picked.sub_allocation_picked
    assert limits is not None


@pytest.mark.parametrize(
    ("job", "extra"),
    [
        (spec("p1"), {}),
        (spec("x1"), {}),
        (spec("q1"), {"s-old": ("old", "q1"), "s-ended": ("ended", "q1")}),
        (spec("q1", "g1", "sq"), {}),
    ],
    ids=["project with grants", "project of another PI", "ended grants", "named"],
)
async def test_no_allocation_picked(job: JobSpec, extra: dict[str, tuple[str, str]]) -> None:
    grants = HeldGrants(extra)
    grants.allocations.pop("sq")
    grants.allocations["sp"] = "p1"
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]

    assert await directory.pick_sub_allocation(job) is job


async def test_several_allocations_listed_in_error() -> None:
    directory = ProjectDirectory(HeldGrants({"sq2": ("g2", "q1")}))  # type: ignore[arg-type]

    with pytest.raises(InvalidArgument) as caught:
        await directory.pick_sub_allocation(spec("q1"), "jobs[1].spec")

    assert caught.value.field == "jobs[1].spec.sub_allocation_id"
    assert "holds 2 sub-allocations" in caught.value.reason
    assert "--grant g1 --sub-allocation sq (1.5 PF-days available)" in caught.value.fix
    assert "--grant g2 --sub-allocation sq2 (1.5 PF-days available)" in caught.value.fix


async def test_parent_job_on_sub_project_allocation() -> None:
    """The PI may charge a job of the grant's project to a sub-project's sub-allocation, and
    the refusal of another member names who may draw on it."""
    directory = ProjectDirectory(SubProjectGrants())  # type: ignore[arg-type]

    await directory.check_submitter(user("pi"), spec("p1", "g1", "sq"))
    with pytest.raises(PermissionDenied) as denied:
        await directory.check_submitter(user("carol"), spec("p1", "g1", "sq"))

    assert "is held by sub-project 'q1'" in denied.value.message
    assert "submit with project_id 'q1'" in denied.value.message
    assert "only when the PI of project 'p1' submits them" in denied.value.message


async def test_pick_for_project_with_grants_cached() -> None:
    """A project with grants of its own costs no call once its grants are cached."""
    grants = HeldGrants()
    directory = ProjectDirectory(grants, missing_ttl_s=0.0)  # type: ignore[arg-type]
    await directory.project_ceilings("p1")
    calls = grants.calls

    job = spec("p1")
    picked = await directory.pick_sub_allocation(job)

    assert picked is job
    assert grants.calls == calls


async def test_picked_allocation_newer_than_grant_list() -> None:
    """A sub-allocation created seconds after its grant's list was cached can be picked and
    then drawn on, although the cached list of the grant's sub-allocations lacks it."""
    grants = HeldGrants()
    grants.allocations.pop("sq")
    directory = ProjectDirectory(grants)  # type: ignore[arg-type]
    await directory.check_submitter(user("bob"), spec("p1", "g1", "s1"))
    grants.allocations["sq"] = "q1"

    picked = await directory.pick_sub_allocation(spec("q1"))
    limits = await directory.check_submitter(user("dana"), picked)

    assert picked.sub_allocation_id == "sq"
    assert limits is not None


class OlderGrants(HeldGrants):
    """``HeldGrants`` that behaves as a grant service older than the holder filter, which
    rejects a list of sub-allocations without a grant id as invalid."""

    async def ListSubAllocations(
        self, request: grant_pb2.ListSubAllocationsRequest, **options: object
    ) -> grant_pb2.ListSubAllocationsResponse:
        if request.grant_id:
            return await super().ListSubAllocations(request, **options)
        self.calls += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "invalid grant_id: is missing",
        )


async def test_no_pick_from_older_grant_service() -> None:
    """A job of a project without a grant is accepted to wait for one, as before the scheduler
    picked sub-allocations, while the grant service is older than the holder filter."""
    job = spec("q1")
    directory = ProjectDirectory(OlderGrants())  # type: ignore[arg-type]

    assert await directory.pick_sub_allocation(job) is job
