"""Who may do what in the grant service, on top of the roles the runtime authenticates.

Researchers and PIs see only the projects they belong to, and the members of a sub-project
also the sub-allocations it holds. Only a project's PI changes its members and
sub-allocations, and only the program office awards. Only the service identities named in
ACSP_GRANT_MONEY_SERVICES (scheduler and metering by default) move money.
"""

from __future__ import annotations

import asyncpg

from services.grant.errors import NotFound, PermissionDenied
from services.runtime.auth import Principal, Role, current_principal

OVERSEERS = frozenset({Role.PROGRAM_OFFICE})
"""Roles that see every project, application and grant."""


def is_overseer(principal: Principal) -> bool:
    return principal.has_any(OVERSEERS) or principal.kind == "service"


def require_role(role: Role, action: str) -> Principal:
    """Return the caller if it has ``role``, else raise PermissionDenied naming who may act.

    ``action`` completes the sentence "only <role> may ...", e.g. "award grants".
    """
    principal = current_principal()
    if not principal.has_any({role}):
        granted = ", ".join(sorted(principal.roles)) or "no role"
        raise PermissionDenied(
            f"{principal.kind} {principal.subject!r} has {granted}: only the {role} role may "
            f"{action}"
        )
    return principal


def require_program_office(action: str) -> Principal:
    return require_role(Role.PROGRAM_OFFICE, action)


def require_money_service(allowed: frozenset[str], action: str) -> Principal:
    """Return the caller if it is one of the service identities that move money.

    ``action`` completes the sentence "only the service identities ... may ...".
    """
    principal = current_principal()
    if principal.kind != "service" or principal.subject not in allowed:
        names = ", ".join(sorted(allowed))
        raise PermissionDenied(
            f"{principal.kind} {principal.subject!r} may not {action}: only the service "
            f"identities {names} may"
        )
    return principal


async def project_role(conn: asyncpg.Connection, project_id: str, subject: str) -> str | None:
    role: str | None = await conn.fetchval(
        "SELECT role FROM project_members WHERE project_id = $1 AND member = $2",
        project_id,
        subject,
    )
    return role


_SUB_PROJECT_DRAWER = (
    "EXISTS (SELECT 1 FROM projects sub JOIN project_members sm ON sm.project_id = sub.id "
    "WHERE sub.id = a.holder AND sub.pi = own.pi AND sub.id <> own.id "
    "AND sm.member = {subject} AND sm.role <> 'viewer')"
)
"""SQL that is true when ``{subject}`` may draw on the sub-allocation ``a`` of a grant of the
project ``own`` as a member of the sub-project that holds it. A sub-project is another project
led by the same PI, and its viewers may not draw."""


def allocation_readable_sql(subject: str) -> str:
    """Return SQL that is true when ``subject`` may read the sub-allocation ``a`` of a grant of
    the project ``own``: as anyone who may read the project, or as a member of the sub-project
    that holds it. ``subject`` is the SQL parameter, e.g. ``$2``."""
    return (
        "(EXISTS (SELECT 1 FROM project_members om WHERE om.project_id = own.id "
        f"AND om.member = {subject}) OR {_SUB_PROJECT_DRAWER.format(subject=subject)})"
    )


def allocation_drawable_sql(subject: str) -> str:
    """Return SQL that is true when the project roles of ``subject`` let their jobs draw on the
    sub-allocation ``a`` of a grant of the project ``own``.

    The PI of ``own`` may draw on every sub-allocation of its grants, a member (not a viewer)
    on the ones they hold, and a member (not a viewer) of a sub-project on the ones it holds.
    ``subject`` is the SQL parameter, e.g. ``$2``.
    """
    return (
        f"(own.pi = {subject} OR EXISTS (SELECT 1 FROM project_members om "
        f"WHERE om.project_id = own.id AND om.member = {subject} AND om.role <> 'viewer' "
        f"AND a.holder = {subject}) OR {_SUB_PROJECT_DRAWER.format(subject=subject)})"
    )


async def drawing_sub_projects(
    conn: asyncpg.Connection, project_id: str, grant_id: str, subject: str
) -> frozenset[str]:
    """Return the sub-projects that hold sub-allocations of ``grant_id``, a grant of
    ``project_id``, and whose jobs ``subject`` may submit.

    A sub-project is another project led by the same PI. Its members and PI, but not its
    viewers, may draw on the sub-allocations it holds of ``project_id``'s grants, so they may
    also read those sub-allocations. A sub-project that holds none of ``grant_id`` is left
    out, so that the grant reads to its members as not found.
    """
    rows = await conn.fetch(
        "SELECT DISTINCT a.holder FROM allocations a JOIN projects own ON own.id = $1 "
        f"WHERE a.grant_id = $3 AND {_SUB_PROJECT_DRAWER.format(subject='$2')}",
        project_id,
        subject,
        grant_id,
    )
    return frozenset(row["holder"] for row in rows)


async def require_project_visible(
    conn: asyncpg.Connection, project_id: str, *, as_reviewer: bool = False
) -> Principal:
    """Return the caller if it may see the project; raise NotFound otherwise.

    A project the caller may not see is reported as not found, so that its existence does
    not leak. With ``as_reviewer``, reviewers also see the projects of applications assigned
    to them; they never see those projects' grants.
    """
    principal = current_principal()
    exists = await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", project_id)
    if exists is None:
        raise NotFound("project", project_id)
    if is_overseer(principal):
        return principal
    if await project_role(conn, project_id, principal.subject) is not None:
        return principal
    if not as_reviewer:
        raise NotFound("project", project_id)
    reviewing = await conn.fetchval(
        "SELECT 1 FROM application_reviewers r JOIN applications a ON a.id = r.application_id "
        "WHERE a.project_id = $1 AND r.reviewer = $2 LIMIT 1",
        project_id,
        principal.subject,
    )
    if reviewing is not None:
        return principal
    raise NotFound("project", project_id)


async def require_project_pi(conn: asyncpg.Connection, project_id: str, action: str) -> Principal:
    """Return the caller if it is the project's PI; raise PermissionDenied otherwise.

    ``action`` completes the sentence "only the project's PI may ...", e.g. "add members".
    """
    principal = await require_project_visible(conn, project_id)
    if await project_role(conn, project_id, principal.subject) != "pi":
        raise PermissionDenied(
            f"{principal.subject!r} is not the PI of project {project_id!r}: only the "
            f"project's PI may {action}"
        )
    return principal
