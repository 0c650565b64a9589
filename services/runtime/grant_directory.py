"""Projects, their members and grant owners, read from the grant service and cached.

The grant service stores projects, their members and their grants. Other services call it with
their service identity to decide what a caller may do, and cache each result for a short time,
so that a burst of requests for one project costs one call. Missing projects and grants are
cached too, for less time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TypeVar

import grpc

from acsp import decimals
from acsp.v1 import grant_pb2, grant_pb2_grpc
from services.runtime.auth import Principal, Role

from .errors import NotFound, Unavailable

logger = logging.getLogger(__name__)

_V = TypeVar("_V")

ANY_PROJECT: Final = (Role.PROGRAM_OFFICE, Role.SERVICE)
"""Roles that may act on any existing project."""


def sees_every_project(principal: Principal) -> bool:
    """Return whether ``principal`` acts for the program office or another acsp service."""
    return principal.has_any(ANY_PROJECT) or principal.kind == "service"


@dataclass(frozen=True, slots=True)
class ProjectAccess:
    """The members of one project, its PI included."""

    project_id: str
    subjects: frozenset[str]
    pi_subject: str = ""
    viewers: frozenset[str] = frozenset()
    """Members with the viewer role, who may read but not submit jobs."""
    institution_id: str = ""
    """The institution the project belongs to, which its jobs' usage is attributed to."""


@dataclass(frozen=True, slots=True)
class GrantInfo:
    """The project that owns a grant, and the grant's constraints (empty allows any)."""

    project_id: str
    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    """``<provider>/<region>`` keys."""
    accelerator_models: tuple[str, ...] = ()
    ends_at: float | None = None
    """End of the grant's validity in Unix seconds, or None when it sets none."""
    expired: bool = False
    """Whether the grant service has expired the grant."""
    credited_pf_days: Decimal | None = None
    """All the grant was ever credited (award and supplement), or None when not returned."""
    supplemented: bool = False
    """Whether the grant had its one supplement, after which nothing more is credited."""
    supplement_limit_pf_days: Decimal | None = None
    """The maximum PF-days the grant's one supplement may still add (0 once it had it), or
    None when the grant service did not return it."""

    def ended(self, now: float) -> bool:
        """Return whether the grant can no longer pay for new work at ``now``."""
        return self.expired or (self.ends_at is not None and self.ends_at <= now)


class ProjectDirectory:
    """Bounded, short-lived cache of projects and grants from the grant service.

    A member removed from a project keeps their access for up to ``ttl_s`` seconds.
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
        self._grants: OrderedDict[str, tuple[float, GrantInfo | None]] = OrderedDict()
        self._calls: dict[tuple[str, str], asyncio.Future[object]] = {}
        """Lookups in flight, shared by every request that needs the same one."""

    async def project(self, project_id: str) -> ProjectAccess | None:
        """Return the members of ``project_id``, or None when it does not exist."""
        cached = fresh_entry(self._projects, project_id)
        if cached is not None:
            return cached[1]
        found = await self._shared(("project", project_id), lambda: self._fetch_project(project_id))
        assert found is None or isinstance(found, ProjectAccess)
        return found

    async def member_project(
        self, principal: Principal, project_id: str, fix: str = ""
    ) -> ProjectAccess:
        """Look up ``project_id`` and check that ``principal`` is one of its members.

        Raises NotFound both for an unknown project and for one the caller is not a member
        of, so that a caller cannot probe which project ids exist. The message ends in
        ``fix``, which says what to do instead.
        """
        project = await self.project(project_id)
        if project is None or principal.subject not in project.subjects:
            raise NotFound("project", project_id, fix)
        return project

    async def grant_info(self, grant_id: str) -> GrantInfo | None:
        """Return the owner and constraints of ``grant_id``, or None when it does not exist."""
        cached = fresh_entry(self._grants, grant_id)
        if cached is not None:
            return cached[1]
        found = await self._shared(("grant", grant_id), lambda: self._fetch_grant(grant_id))
        assert found is None or isinstance(found, GrantInfo)
        return found

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
                raise grant_service_unavailable("project", project_id, exc) from exc
            self._store(self._projects, project_id, None, self._missing_ttl)
            return None
        subjects = frozenset(m.subject for m in msg.members) | {msg.pi_subject}
        viewers = frozenset(
            m.subject for m in msg.members if m.role == grant_pb2.PROJECT_ROLE_VIEWER
        )
        access = ProjectAccess(project_id, subjects, msg.pi_subject, viewers, msg.institution_id)
        self._store(self._projects, project_id, access, self._ttl)
        return access

    async def _fetch_grant(self, grant_id: str) -> GrantInfo | None:
        try:
            msg = await self._stub.GetGrant(
                grant_pb2.GetGrantRequest(grant_id=grant_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise grant_service_unavailable("grant", grant_id, exc) from exc
            self._store(self._grants, grant_id, None, self._missing_ttl)
            return None
        info = grant_info_from_proto(msg)
        self._store(self._grants, grant_id, info, self._ttl)
        return info

    def _store(
        self, cache: OrderedDict[str, tuple[float, _V]], key: str, value: _V, ttl_s: float
    ) -> None:
        cache[key] = (time.monotonic() + ttl_s, value)
        cache.move_to_end(key)
        while len(cache) > self._max:
            cache.popitem(last=False)


def grant_info_from_proto(msg: grant_pb2.Grant) -> GrantInfo:
    """Convert a grant the grant service returned to what the caches keep of it."""
    return GrantInfo(
        str(msg.project_id),
        tuple(msg.constraints.providers),
        tuple(msg.constraints.regions),
        tuple(msg.constraints.accelerator_models),
        msg.validity.end_time.ToMicroseconds() / 1e6 if msg.validity.HasField("end_time") else None,
        msg.state == grant_pb2.GRANT_STATE_EXPIRED,
        _credited(msg.balance),
        msg.supplemented,
        _supplement_limit(msg),
    )


def _supplement_limit(msg: grant_pb2.Grant) -> Decimal | None:
    if not msg.HasField("supplement_limit_pf_days"):
        return None
    try:
        return decimals.from_proto(msg.supplement_limit_pf_days)
    except ValueError:
        return None


def _credited(balance: grant_pb2.Balance) -> Decimal | None:
    if not balance.HasField("credited_pf_days"):
        return None
    try:
        return decimals.from_proto(balance.credited_pf_days)
    except ValueError:
        return None


def fresh_entry(cache: OrderedDict[str, tuple[float, _V]], key: str) -> tuple[float, _V] | None:
    """Return the cached (expiry, value) of ``key``, or None when it is missing or expired."""
    entry = cache.get(key)
    if entry is None:
        return None
    if entry[0] < time.monotonic():
        del cache[key]
        return None
    return entry


def grant_service_unavailable(kind: str, key: str, exc: grpc.aio.AioRpcError) -> Unavailable:
    """Log a failed lookup and return an Unavailable error whose message requests a retry."""
    logger.warning("looking up %s %s failed with %s: %s", kind, key, exc.code().name, exc.details())
    return Unavailable(
        f"the grant service could not confirm {kind} {key!r} ({exc.code().name}); retry shortly"
    )
