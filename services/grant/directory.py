"""Institutions, projects and their members."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.grant.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.runtime.auth import Principal


@dataclass(frozen=True, slots=True)
class NewInstitution:
    institution_id: str
    name: str
    country_code: str


@dataclass(frozen=True, slots=True)
class NewProject:
    project_id: str
    institution_id: str
    name: str
    pi: str
    members: tuple[tuple[str, str], ...]
    """(subject, role) pairs besides the PI."""


async def create_institution(
    conn: asyncpg.Connection, new: NewInstitution, actor: str
) -> asyncpg.Record:
    """Insert an institution; a repeat of the same request returns the stored row."""
    row = await conn.fetchrow(
        "INSERT INTO institutions (id, name, country_code, created_by) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (id) DO NOTHING RETURNING *",
        new.institution_id,
        new.name,
        new.country_code,
        actor,
    )
    if row is not None:
        return row
    existing = await get_institution(conn, new.institution_id)
    if existing["name"] != new.name or existing["country_code"] != new.country_code:
        raise AlreadyExists("institution", new.institution_id)
    return existing


async def get_institution(conn: asyncpg.Connection, institution_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM institutions WHERE id = $1", institution_id)
    if row is None:
        raise NotFound("institution", institution_id)
    return row


async def list_institutions(
    conn: asyncpg.Connection, after: str, limit: int
) -> Sequence[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM institutions WHERE id > $1 ORDER BY id LIMIT $2", after, limit
    )


async def create_project(
    conn: asyncpg.Connection, new: NewProject, request_id: str, actor: str
) -> asyncpg.Record:
    """Insert a project with its PI and members.

    The creator's retry of the request that created the project returns it. Another request for
    the same project id returns it only when it asks for exactly what exists (institution, name,
    PI and members) and raises AlreadyExists otherwise.
    """
    await get_institution(conn, new.institution_id)
    row = await conn.fetchrow(
        "INSERT INTO projects (id, institution_id, name, pi, created_by, request_id) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING *",
        new.project_id,
        new.institution_id,
        new.name,
        new.pi,
        actor,
        request_id,
    )
    members = [(new.pi, "pi"), *((s, r) for s, r in new.members if s != new.pi)]
    if row is None:
        existing = await get_project(conn, new.project_id)
        # A request id returns the project only to its creator: another caller learns no
        # members by guessing it.
        if existing["request_id"] == request_id and existing["created_by"] == actor:
            return existing
        current = {(m["member"], m["role"]) for m in await project_members(conn, new.project_id)}
        same = (
            existing["institution_id"] == new.institution_id
            and existing["name"] == new.name
            and existing["pi"] == new.pi
            and current == set(members)
        )
        if not same:
            raise AlreadyExists("project", new.project_id)
        return existing
    await conn.executemany(
        "INSERT INTO project_members (project_id, member, role, added_by) VALUES ($1, $2, $3, $4)",
        [(new.project_id, subject, role, actor) for subject, role in members],
    )
    return row


async def get_project(conn: asyncpg.Connection, project_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM projects WHERE id = $1", project_id)
    if row is None:
        raise NotFound("project", project_id)
    return row


async def project_members(conn: asyncpg.Connection, project_id: str) -> Sequence[asyncpg.Record]:
    return await conn.fetch(
        "SELECT member, role FROM project_members WHERE project_id = $1 "
        "ORDER BY role <> 'pi', member",
        project_id,
    )


async def list_projects(
    conn: asyncpg.Connection,
    principal: Principal,
    see_all: bool,
    institution_id: str,
    after: str,
    limit: int,
) -> Sequence[asyncpg.Record]:
    """Return a page of the projects the caller may see, ordered by id."""
    return await conn.fetch(
        """
        SELECT p.* FROM projects p
        WHERE p.id > $1
          AND ($2 = '' OR p.institution_id = $2)
          AND ($3 OR EXISTS (SELECT 1 FROM project_members m
                             WHERE m.project_id = p.id AND m.member = $4))
        ORDER BY p.id LIMIT $5
        """,
        after,
        institution_id,
        see_all,
        principal.subject,
        limit,
    )


async def set_member(
    conn: asyncpg.Connection, project_id: str, subject: str, role: str, actor: str
) -> None:
    """Add a member or change a member's role; the PI's own role cannot change here."""
    if role == "pi":
        raise InvalidArgument(
            "member.role", "cannot be pi", "a project has exactly one PI, set at creation"
        )
    current = await conn.fetchval(
        "SELECT role FROM project_members WHERE project_id = $1 AND member = $2 FOR UPDATE",
        project_id,
        subject,
    )
    if current == "pi":
        raise FailedPrecondition(
            f"{subject!r} is the PI of project {project_id!r}", field="member.subject"
        )
    await conn.execute(
        "INSERT INTO project_members (project_id, member, role, added_by) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (project_id, member) DO UPDATE SET role = EXCLUDED.role, "
        "added_by = EXCLUDED.added_by, added_at = now()",
        project_id,
        subject,
        role,
        actor,
    )


async def remove_member(
    conn: asyncpg.Connection, project_id: str, subject: str, request_id: str, actor: str
) -> None:
    """Remove a member; raise NotFound naming the subject when they are not a member.

    A retry of the request that removed the member, by the same caller, succeeds again. The
    same request id for a different removal, or from another caller, raises FailedPrecondition.
    """
    # Claimed first, so that two copies of one request in flight wait on each other's key.
    claimed = await conn.fetchval(
        "INSERT INTO member_removals (request_id, project_id, member, removed_by)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING RETURNING true",
        request_id,
        project_id,
        subject,
        actor,
    )
    if not claimed:
        done = await conn.fetchrow(
            "SELECT project_id, member, removed_by FROM member_removals WHERE request_id = $1",
            request_id,
        )
        # Only the caller who made the removal learns what it removed, as for projects.
        own = done is not None and done["removed_by"] == actor
        if own and (done["project_id"], done["member"]) == (project_id, subject):
            return
        removed = f"{done['member']!r} from project {done['project_id']!r}" if own else "a member"
        raise FailedPrecondition(
            f"request_id {request_id!r} already removed {removed}; give this removal a new "
            "request id",
            field="request_id",
        )
    role = await conn.fetchval(
        "SELECT role FROM project_members WHERE project_id = $1 AND member = $2 FOR UPDATE",
        project_id,
        subject,
    )
    if role is None:
        raise NotFound("project member", f"{project_id}/{subject}")
    if role == "pi":
        raise FailedPrecondition(
            f"{subject!r} is the PI of project {project_id!r} and cannot be removed",
            field="subject",
        )
    await conn.execute(
        "DELETE FROM project_members WHERE project_id = $1 AND member = $2", project_id, subject
    )


async def check_holder(conn: asyncpg.Connection, project_id: str, holder: str) -> None:
    """Raise unless ``holder`` may hold a sub-allocation of a grant of ``project_id``.

    A holder is the PI or a member (not a viewer) of the project, or another project led by
    the same PI, as a sub-project. Any other name raises NotFound naming ``holder``, with the
    same message whether or not a project of that id exists, so the error reveals no other
    PI's projects.
    """
    role = await conn.fetchval(
        "SELECT role FROM project_members WHERE project_id = $1 AND member = $2",
        project_id,
        holder,
    )
    if role == "viewer":
        raise FailedPrecondition(
            f"{holder!r} is a viewer of project {project_id!r}, who cannot submit jobs, so the "
            f"budget would sit unused; make them a member first with `acsp grants member "
            f"{project_id} {holder} --role member`",
            field="holder",
        )
    if role is not None:
        return
    sub_project = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM projects p JOIN projects own ON own.pi = p.pi "
        "WHERE own.id = $1 AND p.id = $2 AND p.id <> own.id)",
        project_id,
        holder,
    )
    if not sub_project:
        raise NotFound(
            "holder",
            holder,
            f"set holder to a member of project {project_id!r} (add one with `acsp grants "
            f"member {project_id} SUBJECT`) or to another project that its PI leads",
        )
