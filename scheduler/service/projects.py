"""Project membership, grant ownership and sub-allocations for submissions, from the grant service.

The grant service stores projects, their members, their grants with the grants' constraints,
and sub-allocations. The scheduler calls it with its service identity and caches each result for
a short time, so that a burst of submissions for one project costs one call. Missing projects
and grants are cached too, for less time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import grpc

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from services.runtime.auth import Principal, Role
from services.runtime.errors import NotFound, PermissionDenied, Unavailable

from .errors import SubAllocationNotFound
from .grant_limits import GrantLimits
from .model import JobSpec

logger = logging.getLogger(__name__)

_V = TypeVar("_V")

ANY_PROJECT: Final = (Role.PROGRAM_OFFICE, Role.SERVICE)
"""Roles that may submit for any existing project."""


@dataclass(frozen=True, slots=True)
class ProjectAccess:
    """The subjects that may submit for one project: its members and its PI."""

    project_id: str
    subjects: frozenset[str]
    pi_subject: str = ""


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """The project that owns a grant, and the grant's constraints."""

    project_id: str
    limits: GrantLimits


@dataclass(frozen=True, slots=True)
class SubAllocations:
    """The holder of each sub-allocation of one grant, by sub-allocation id."""

    fetched_at: float
    """``time.monotonic()`` of the fetch."""
    holders: dict[str, str]


class ProjectDirectory:
    """Bounded, short-lived cache of projects and grant owners from the grant service.

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
        self._stub = stub
        self._ttl = ttl_s
        self._missing_ttl = missing_ttl_s
        self._max = max_entries
        self._timeout = timeout_s
        self._projects: OrderedDict[str, tuple[float, ProjectAccess | None]] = OrderedDict()
        self._grants: OrderedDict[str, tuple[float, GrantRecord | None]] = OrderedDict()
        self._allocations: OrderedDict[str, tuple[float, SubAllocations]] = OrderedDict()
        self._calls: dict[tuple[str, str], asyncio.Future[object]] = {}
        """Lookups in flight, shared by every submission that needs the same one."""

    async def check_submitter(
        self, principal: Principal, spec: JobSpec, prefix: str = "spec"
    ) -> GrantLimits | None:
        """Check who submits ``spec`` and what it draws on; return the named grant's limits.

        Raises NotFound for an unknown project or grant, and PermissionDenied for a
        non-member. A grant must belong to the job's project. A sub-allocation must belong to
        the job's grant (SubAllocationNotFound), and only its holder or the project's PI may
        draw on it (PermissionDenied). Program office and service callers may submit for any
        project that exists and draw on any of its sub-allocations. Returns None when the spec
        names no grant.
        """
        project = await self.project(spec.project_id)
        if project is None:
            raise NotFound("project", spec.project_id)
        grant: GrantRecord | None = None
        if spec.grant_id:
            grant = await self.grant(spec.grant_id)
            if grant is None:
                raise NotFound("grant", spec.grant_id)
            if grant.project_id != spec.project_id:
                # A grant of another project is reported as not found, like the grant service
                # reports what the caller may not see.
                raise NotFound("grant", spec.grant_id)
        privileged = principal.has_any(ANY_PROJECT) or principal.kind == "service"
        if not privileged and principal.subject not in project.subjects:
            raise PermissionDenied(
                f"{principal.subject!r} is not a member of project {spec.project_id!r}; "
                "ask its PI to add you, or submit for a project you belong to"
            )
        if spec.sub_allocation_id:
            holder = await self.sub_allocation_holder(spec.grant_id, spec.sub_allocation_id)
            if holder is None:
                raise SubAllocationNotFound(
                    f"{prefix}.sub_allocation_id", spec.sub_allocation_id, spec.grant_id
                )
            if not privileged and principal.subject not in (holder, project.pi_subject):
                raise PermissionDenied(
                    f"{prefix}.sub_allocation_id: sub-allocation {spec.sub_allocation_id!r} "
                    f"is held by {holder!r}, and only its holder or the project's PI may "
                    "draw on it; leave the field empty to draw on the grant itself"
                )
        return grant.limits if grant is not None else None

    async def project(self, project_id: str) -> ProjectAccess | None:
        """Return who may submit for ``project_id``, or None when it does not exist."""
        cached = _fresh(self._projects, project_id)
        if cached is not None:
            return cached[1]
        found = await self._shared(("project", project_id), lambda: self._fetch_project(project_id))
        assert found is None or isinstance(found, ProjectAccess)
        return found

    async def grant(self, grant_id: str) -> GrantRecord | None:
        """Return the owner and constraints of ``grant_id``, or None when it does not exist."""
        cached = _fresh(self._grants, grant_id)
        if cached is not None:
            return cached[1]
        found = await self._shared(("grant", grant_id), lambda: self._fetch_grant(grant_id))
        assert found is None or isinstance(found, GrantRecord)
        return found

    async def sub_allocation_holder(self, grant_id: str, allocation_id: str) -> str | None:
        """Return the holder of a sub-allocation of ``grant_id``, or None when it has none."""
        cached = _fresh(self._allocations, grant_id)
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

    async def _shared(self, key: tuple[str, str], fetch: Callable[[], Awaitable[object]]) -> object:
        """Run one ``fetch`` per key at a time; concurrent callers wait for the same result."""
        call = self._calls.get(key)
        if call is None:
            call = asyncio.ensure_future(fetch())
            self._calls[key] = call
            call.add_done_callback(lambda done: self._finished(key, done))
        # A caller that is cancelled leaves the call running for the others.
        return await asyncio.shield(call)

    def _finished(self, key: tuple[str, str], call: asyncio.Future[object]) -> None:
        self._calls.pop(key, None)
        if not call.cancelled():
            call.exception()  # Retrieved here, so a call every caller left logs no warning.

    async def _fetch_project(self, project_id: str) -> ProjectAccess | None:
        try:
            msg = await self._stub.GetProject(
                grant_pb2.GetProjectRequest(project_id=project_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _unavailable("project", project_id, exc) from exc
            self._store(self._projects, project_id, None, self._missing_ttl)
            return None
        subjects = frozenset(m.subject for m in msg.members) | {msg.pi_subject}
        access = ProjectAccess(project_id, subjects, msg.pi_subject)
        self._store(self._projects, project_id, access, self._ttl)
        return access

    async def _fetch_grant(self, grant_id: str) -> GrantRecord | None:
        try:
            msg = await self._stub.GetGrant(
                grant_pb2.GetGrantRequest(grant_id=grant_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _unavailable("grant", grant_id, exc) from exc
            self._store(self._grants, grant_id, None, self._missing_ttl)
            return None
        limits = GrantLimits(
            grant_id,
            tuple(msg.constraints.providers),
            tuple(msg.constraints.regions),
            tuple(msg.constraints.accelerator_models),
        )
        record = GrantRecord(str(msg.project_id), limits)
        self._store(self._grants, grant_id, record, self._ttl)
        return record

    async def _fetch_allocations(self, grant_id: str) -> SubAllocations:
        holders: dict[str, str] = {}
        token = ""
        while True:
            request = grant_pb2.ListSubAllocationsRequest(
                grant_id=grant_id, page=common_pb2.PageRequest(page_size=1000, page_token=token)
            )
            try:
                page = await self._stub.ListSubAllocations(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise _unavailable("sub-allocations of grant", grant_id, exc) from exc
                break
            holders.update((a.sub_allocation_id, a.holder) for a in page.sub_allocations)
            token = page.page.next_page_token
            if not token:
                break
        listed = SubAllocations(time.monotonic(), holders)
        self._store(self._allocations, grant_id, listed, self._ttl)
        return listed

    def _store(
        self, cache: OrderedDict[str, tuple[float, _V]], key: str, value: _V, ttl_s: float
    ) -> None:
        cache[key] = (time.monotonic() + ttl_s, value)
        cache.move_to_end(key)
        while len(cache) > self._max:
            cache.popitem(last=False)


def _fresh(cache: OrderedDict[str, tuple[float, _V]], key: str) -> tuple[float, _V] | None:
    entry = cache.get(key)
    if entry is None:
        return None
    if entry[0] < time.monotonic():
        del cache[key]
        return None
    return entry


def _unavailable(kind: str, key: str, exc: grpc.aio.AioRpcError) -> Unavailable:
    logger.warning("looking up %s %s failed with %s: %s", kind, key, exc.code().name, exc.details())
    return Unavailable(
        f"the grant service could not confirm {kind} {key!r} ({exc.code().name}); retry shortly"
    )
