"""Project membership, grant ownership and sub-allocations for submissions, from the grant service.

The shared :class:`services.runtime.grant_directory.ProjectDirectory` caches projects and
grants. The scheduler adds sub-allocations, which it also caches for a short time, and the
check of who may submit what.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal

import grpc

from acsp import decimals
from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from services.runtime import grant_directory
from services.runtime.auth import Principal
from services.runtime.errors import FailedPrecondition, NotFound, PermissionDenied
from services.runtime.evolve import evolve
from services.runtime.grant_directory import (
    ANY_PROJECT,
    ProjectAccess,
    fresh_entry,
    grant_service_unavailable,
)

from .award_check import AwardCeiling
from .errors import SubAllocationNotFound
from .grant_limits import GrantLimits
from .held_allocations import HeldSubAllocation, HeldSubAllocations, choose_held, fetch_held
from .model import JobSpec, utc_text

__all__ = ["ANY_PROJECT", "GrantRecord", "ProjectAccess", "ProjectDirectory", "SubAllocations"]


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """The project that owns a grant, and the grant's constraints."""

    project_id: str
    limits: GrantLimits
    ends_at: float | None = None
    """End of the grant's validity in Unix seconds, or None when it sets none."""
    expired: bool = False
    credited: Decimal | None = None
    """PF-days ever credited (award and supplement), or None when the grant service sent none."""
    supplemented: bool = False
    supplement_limit: Decimal | None = None
    """PF-days the grant's one supplement may still add, or None when unknown."""


@dataclass(frozen=True, slots=True)
class SubAllocations:
    """The holder of each sub-allocation of one grant, by sub-allocation id."""

    fetched_at: float
    """``time.monotonic()`` of the fetch."""
    holders: dict[str, str]
    credited: dict[str, Decimal] = field(default_factory=dict)
    """PF-days each sub-allocation was funded with, which never grows."""


@dataclass(frozen=True, slots=True)
class ProjectGrants:
    """The grants of one project, as one ListGrants call returned them."""

    fetched_at: float
    """``time.monotonic()`` of the fetch."""
    grants: tuple[tuple[str, grant_directory.GrantInfo], ...]
    """Each grant by id."""


class ProjectDirectory(grant_directory.ProjectDirectory):
    """Bounded, short-lived cache of projects, grants and sub-allocations from the grant service.

    A member removed from a project may still submit for up to ``ttl_s`` seconds. A
    sub-allocation missing from a cached list is looked up again once the list is older than
    ``missing_ttl_s``, so a new one can be used seconds after it is created.
    """

    def __init__(
        self,
        stub: grant_pb2_grpc.GrantServiceStub,
        *,
        ttl_s: float = 30.0,
        missing_ttl_s: float = 5.0,
        max_entries: int = 10_000,
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            stub,
            ttl_s=ttl_s,
            missing_ttl_s=missing_ttl_s,
            max_entries=max_entries,
            timeout_s=timeout_s,
        )
        self._allocations: OrderedDict[str, tuple[float, SubAllocations]] = OrderedDict()
        self._project_grants: OrderedDict[str, tuple[float, ProjectGrants]] = OrderedDict()
        self._held: OrderedDict[str, tuple[float, HeldSubAllocations]] = OrderedDict()

    async def check_submitter(
        self, principal: Principal, spec: JobSpec, prefix: str = "spec"
    ) -> GrantLimits | None:
        """Check who submits ``spec`` and what it draws on; return the named grant's limits.

        Raises NotFound for an unknown project or grant and for a project the caller is not a
        member of, and PermissionDenied for a viewer. A grant must belong to the job's project,
        or the job's project must be the sub-project (led by the same PI) that holds the named
        sub-allocation of it, and the grant must not have expired (FailedPrecondition). A
        sub-allocation must belong to the job's grant (SubAllocationNotFound). Only its
        holder, the PI of the grant's project or, for a sub-project's sub-allocation, the
        sub-project's members for its jobs may draw on it (PermissionDenied). Program office
        and service callers may submit for any project that exists and draw on any of its
        sub-allocations. Returns None when the spec names no grant.
        """
        privileged = grant_directory.sees_every_project(principal)
        project = await self.project(spec.project_id)
        # A project the caller is not a member of is reported as not found, before its grant
        # is looked at, so that neither the project nor its grants leak to non-members.
        if project is None or (not privileged and principal.subject not in project.subjects):
            raise NotFound("project", spec.project_id, "submit for a project you are a member of")
        grant: GrantRecord | None = None
        by_sub_project = False
        if spec.grant_id:
            grant = await self.grant(spec.grant_id)
            if grant is None:
                raise NotFound("grant", spec.grant_id)
            by_sub_project = grant.project_id != spec.project_id
            if by_sub_project and not await self._holds_as_sub_project(
                spec, grant.project_id, project
            ):
                # A grant of another project is reported as not found, like the grant service
                # reports what the caller may not see.
                raise NotFound("grant", spec.grant_id)
            if grant.expired:
                # The grant service places no hold on it, so the job would wait for budget.
                ended = ""
                if grant.ends_at is not None:
                    ended = f" (its validity ended {utc_text(grant.ends_at)})"
                raise FailedPrecondition(
                    f"grant {spec.grant_id!r} has expired{ended}; name an active grant of "
                    f"project {spec.project_id!r}, or none to use the one that expires first",
                    f"{prefix}.grant_id",
                )
        if not privileged and principal.subject in project.viewers:
            raise PermissionDenied(
                f"{principal.subject!r} is a viewer of project {spec.project_id!r} and may only "
                "read; ask its PI to make you a member to submit jobs"
            )
        if spec.sub_allocation_id:
            holder = await self.sub_allocation_holder(spec.grant_id, spec.sub_allocation_id)
            if holder is None:
                raise SubAllocationNotFound(
                    f"{prefix}.sub_allocation_id", spec.sub_allocation_id, spec.grant_id
                )
            # Every member of a sub-project that holds the sub-allocation may draw on it,
            # and viewers were rejected above. The PI controls the whole grant, so the PI may
            # also charge a job of the grant's project to any of its sub-allocations.
            drawers = (holder, project.pi_subject)
            if not privileged and not by_sub_project and principal.subject not in drawers:
                raise PermissionDenied(await self._not_a_drawer(spec, holder, project, prefix))
        return grant.limits if grant is not None else None

    async def _not_a_drawer(
        self, spec: JobSpec, holder: str, project: ProjectAccess, prefix: str
    ) -> str:
        """Explain who may draw on the sub-allocation ``spec`` names, which the caller may not."""
        allocation = f"{prefix}.sub_allocation_id: sub-allocation {spec.sub_allocation_id!r}"
        pi = f"the PI of project {spec.project_id!r}"
        # A holder that is a member of the grant's project is that member, even if a project
        # has the same id.
        if holder not in project.subjects and await self.project(holder) is not None:
            return (
                f"{allocation} is held by sub-project {holder!r}, so it pays for that "
                f"project's jobs, which its members submit with project_id {holder!r}, and "
                f"for jobs of project {spec.project_id!r} only when {pi} submits them; submit "
                f"with project_id {holder!r} or leave the field empty to draw on the grant "
                "itself"
            )
        return (
            f"{allocation} is held by {holder!r}, and only {holder!r} or {pi} may draw on it; "
            "leave the field empty to draw on the grant itself"
        )

    async def _holds_as_sub_project(
        self, spec: JobSpec, grant_project_id: str, project: ProjectAccess
    ) -> bool:
        """Return whether the job's project holds the sub-allocation ``spec`` names, as a
        sub-project of the grant's project.

        The two projects must have the same PI, as the grant service requires of a
        sub-project holder, so a holder that also reads as another PI's project id gives that
        project nothing.
        """
        if not spec.sub_allocation_id:
            return False
        holder = await self.sub_allocation_holder(spec.grant_id, spec.sub_allocation_id)
        if holder != spec.project_id:
            return False
        owner = await self.project(grant_project_id)
        if owner is None or not owner.pi_subject:
            return False
        return owner.pi_subject == project.pi_subject

    async def grant(self, grant_id: str) -> GrantRecord | None:
        """Return the owner and constraints of ``grant_id``, or None when it does not exist."""
        return _grant_record(grant_id, await self.grant_info(grant_id))

    async def reload_grant(self, grant_id: str) -> GrantRecord | None:
        """Read ``grant_id`` from the grant service past the cache, and cache what it returns.

        The call is not shared with lookups already in flight, so the result is no older than
        this call. Raises Unavailable when the grant service call fails.
        """
        return _grant_record(grant_id, await self._fetch_grant(grant_id))

    async def award_ceiling(self, spec: JobSpec) -> AwardCeiling | None:
        """Return all that the pot ``spec`` draws on was ever credited, from the cache.

        Call it after :meth:`check_submitter`, which fetched what it reads. Returns None when
        the spec names no grant or the amount is unknown.
        """
        if not spec.grant_id:
            return None
        grant = await self.grant(spec.grant_id)
        if grant is None:
            return None
        if not spec.sub_allocation_id:
            if grant.credited is None:
                return None
            return AwardCeiling(
                spec.grant_id,
                "",
                grant.credited,
                grant.supplemented,
                supplement_limit=grant.supplement_limit,
            )
        # The holder lookup of check_submitter cached the list, credited amounts included.
        await self.sub_allocation_holder(spec.grant_id, spec.sub_allocation_id)
        cached = fresh_entry(self._allocations, spec.grant_id)
        credited = cached[1].credited.get(spec.sub_allocation_id) if cached else None
        if credited is None:
            return None
        return AwardCeiling(spec.grant_id, spec.sub_allocation_id, credited, True)

    async def project_ceilings(
        self, project_id: str, *, recent: bool = False
    ) -> list[AwardCeiling] | None:
        """Return the credited totals of the grants of ``project_id`` that can still pay.

        Grants that expired or whose validity ended are left out, and grants that have not
        started yet are kept. Returns None when the grant service sent no credited total for
        one of them. The list is cached per project like the project itself, so a burst of
        submissions costs one ListGrants call. With ``recent``, a list older than
        ``missing_ttl_s`` is fetched again, so that a grant awarded since then is seen.
        """
        listed = await self._listed_grants(project_id, recent=recent)
        now = time.time()
        ceilings: list[AwardCeiling] = []
        for grant_id, info in listed.grants:
            if info.ended(now):
                continue
            if info.credited_pf_days is None:
                return None
            ceilings.append(
                AwardCeiling(
                    grant_id,
                    "",
                    info.credited_pf_days,
                    info.supplemented,
                    info.accelerator_models,
                    info.supplement_limit_pf_days,
                )
            )
        return ceilings

    async def _listed_grants(self, project_id: str, *, recent: bool) -> ProjectGrants:
        """Return the cached grants of ``project_id``, fetched again when missing or, with
        ``recent``, older than ``missing_ttl_s``."""
        cached = fresh_entry(self._project_grants, project_id)
        listed = cached[1] if cached is not None else None
        if listed is None or (recent and time.monotonic() - listed.fetched_at >= self._missing_ttl):
            found = await self._shared(
                ("project grants", project_id), lambda: self._fetch_project_grants(project_id)
            )
            assert isinstance(found, ProjectGrants)
            listed = found
        return listed

    async def pick_sub_allocation(self, spec: JobSpec, prefix: str = "spec") -> JobSpec:
        """Return ``spec`` set to draw on the sub-allocation its project holds, when it names
        no grant and its project has no grant of its own that can still pay.

        The project must hold exactly one sub-allocation of a grant that can still pay, of a
        project led by the same PI. With none, ``spec`` is returned unchanged and its job
        waits for a grant of its own. With several, InvalidArgument names
        ``<prefix>.sub_allocation_id`` and lists them. Call it after :meth:`check_submitter`,
        so that only the project's members learn what it holds. Both lists are read again
        when older than ``missing_ttl_s``, so a grant or sub-allocation created seconds ago
        counts.
        """
        if spec.grant_id or spec.sub_allocation_id:
            return spec
        now = time.time()
        # The cached list settles the common case, a project with grants, without a call.
        for recent in (False, True):
            own = await self._listed_grants(spec.project_id, recent=recent)
            if any(not info.ended(now) for _, info in own.grants):
                return spec
        project = await self.project(spec.project_id)
        if project is None:
            return spec
        usable: list[HeldSubAllocation] = []
        for held in await self._held_sub_allocations(spec.project_id):
            grant = await self.grant(held.grant_id)
            if grant is None or grant.expired:
                continue
            owner = await self.project(grant.project_id)
            if owner is not None and owner.pi_subject == project.pi_subject:
                usable.append(held)
        chosen = choose_held(spec.project_id, usable, f"{prefix}.sub_allocation_id")
        if chosen is None:
            return spec
        if await self.sub_allocation_holder(chosen.grant_id, chosen.sub_allocation_id) is None:
            # The grant's cached list predates the sub-allocation that the holder's list has,
            # and check_submitter reads that list next, so it is read again.
            await self._fetch_allocations(chosen.grant_id)
        return evolve(
            spec,
            grant_id=chosen.grant_id,
            sub_allocation_id=chosen.sub_allocation_id,
            sub_allocation_picked=True,
        )

    async def _held_sub_allocations(self, project_id: str) -> tuple[HeldSubAllocation, ...]:
        cached = fresh_entry(self._held, project_id)
        if cached is not None:
            return cached[1].allocations
        found = await self._shared(
            ("held sub-allocations", project_id), lambda: self._fetch_held(project_id)
        )
        assert isinstance(found, HeldSubAllocations)
        return found.allocations

    async def _fetch_held(self, project_id: str) -> HeldSubAllocations:
        held = await fetch_held(self._stub, project_id, self._timeout)
        listed = HeldSubAllocations(time.monotonic(), tuple(held))
        self._store(self._held, project_id, listed, self._missing_ttl)
        return listed

    async def _fetch_project_grants(self, project_id: str) -> ProjectGrants:
        grants: list[tuple[str, grant_directory.GrantInfo]] = []
        token = ""
        while True:
            request = grant_pb2.ListGrantsRequest(
                project_id=project_id,
                page=common_pb2.PageRequest(page_size=1000, page_token=token),
            )
            try:
                page = await self._stub.ListGrants(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                raise grant_service_unavailable("grants of project", project_id, exc) from exc
            for msg in page.grants:
                info = grant_directory.grant_info_from_proto(msg)
                grants.append((msg.grant_id, info))
                # Each grant is as fresh as one looked up alone.
                self._store(self._grants, msg.grant_id, info, self._ttl)
            token = page.page.next_page_token
            if not token:
                break
        listed = ProjectGrants(time.monotonic(), tuple(grants))
        self._store(self._project_grants, project_id, listed, self._ttl)
        return listed

    async def sub_allocation_holder(self, grant_id: str, allocation_id: str) -> str | None:
        """Return the holder of a sub-allocation of ``grant_id``, or None when it has none."""
        cached = fresh_entry(self._allocations, grant_id)
        if cached is not None:
            listed = cached[1]
            holder = listed.holders.get(allocation_id)
            if holder is not None or time.monotonic() - listed.fetched_at < self._missing_ttl:
                return holder
        found = await self._shared(
            ("sub-allocations", grant_id), lambda: self._fetch_allocations(grant_id)
        )
        assert isinstance(found, SubAllocations)
        return found.holders.get(allocation_id)

    async def _fetch_allocations(self, grant_id: str) -> SubAllocations:
        holders: dict[str, str] = {}
        credited: dict[str, Decimal] = {}
        token = ""
        while True:
            request = grant_pb2.ListSubAllocationsRequest(
                grant_id=grant_id, page=common_pb2.PageRequest(page_size=1000, page_token=token)
            )
            try:
                page = await self._stub.ListSubAllocations(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise grant_service_unavailable(
                        "sub-allocations of grant", grant_id, exc
                    ) from exc
                break
            for allocation in page.sub_allocations:
                holders[allocation.sub_allocation_id] = allocation.holder
                if allocation.balance.HasField("credited_pf_days"):
                    funded = allocation.balance.credited_pf_days
                    credited[allocation.sub_allocation_id] = decimals.from_proto(funded)
            token = page.page.next_page_token
            if not token:
                break
        listed = SubAllocations(time.monotonic(), holders, credited)
        self._store(self._allocations, grant_id, listed, self._ttl)
        return listed


def _grant_record(grant_id: str, info: grant_directory.GrantInfo | None) -> GrantRecord | None:
    if info is None:
        return None
    limits = GrantLimits(grant_id, info.providers, info.regions, info.accelerator_models)
    return GrantRecord(
        info.project_id,
        limits,
        info.ends_at,
        info.ended(time.time()),
        info.credited_pf_days,
        info.supplemented,
        info.supplement_limit_pf_days,
    )
