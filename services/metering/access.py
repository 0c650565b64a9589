"""Who may read which usage: projects for researchers, providers for operators.

Program office and service callers read everything. Anyone else names a project, a grant or a
job and must be a member of the project it belongs to. Membership comes from the grant service
through :class:`~services.runtime.grant_directory.ProjectDirectory`. A project, grant or job
that the caller may not read is reported as not found, as the grant service and the scheduler
report it, so that its existence and its project do not leak.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.runtime.auth import Principal, Role, current_principal
from services.runtime.db import Database
from services.runtime.errors import NotFound, PermissionDenied
from services.runtime.grant_directory import ProjectDirectory, sees_every_project


def check_provider_access(provider: str, records: str) -> None:
    """Raise PermissionDenied unless the caller may read ``provider``'s ``records``.

    The program office and services read every provider's records, and an operator reads
    only their own provider's. ``records`` names what is read in the error, e.g. ``refunds``.
    """
    principal = current_principal()
    if principal.has_any((Role.PROGRAM_OFFICE, Role.SERVICE)):
        return
    if Role.PROVIDER_OPERATOR in principal.roles and principal.provider == provider:
        return
    raise PermissionDenied(
        f"{principal.subject!r} may not see the {records} of provider {provider!r}: it needs "
        "the program office role or an operator token for that provider"
    )


async def usage_project(
    principal: Principal,
    directory: ProjectDirectory,
    db: Database,
    fields: Sequence[str],
    *,
    project_id: str = "",
    grant_id: str = "",
    job_id: str = "",
) -> str:
    """Return the project filter for a usage read by ``principal``.

    For program office and service callers it is ``project_id`` unchanged, which may be empty.
    Anyone else must name a project, a grant or a job, all of one project they are a member
    of, and gets that project. ``fields`` are the request's fields that name one, for the
    error message. Raises NotFound for a project, grant or job that is unknown, that
    belongs to a project the caller is not a member of, or that belongs to another project
    than the other ids given. Raises PermissionDenied when none is given.
    """
    if sees_every_project(principal):
        return project_id
    if not (project_id or grant_id or job_id):
        raise PermissionDenied(
            f"a filter is required: set {' or '.join(fields)} to name usage of a project you "
            "are a member of, because only the program office and services may read the usage "
            "of every project"
        )
    # Each id is checked on its own before the ids are compared, so that an id the caller may
    # not read gets the same error as an id that does not exist, whatever else the request
    # names.
    if project_id:
        await _require_member(principal, directory, project_id, "project", project_id)
    if grant_id:
        grant = await directory.grant_info(grant_id)
        grant_project = grant.project_id if grant is not None else ""
        await _require_member(principal, directory, grant_project, "grant", grant_id)
        if project_id and grant_project != project_id:
            raise NotFound("grant", grant_id, f"no such grant in project {project_id!r}")
        project_id = grant_project
    if job_id:
        async with db.acquire() as conn:
            job_project = await conn.fetchval(
                "SELECT project_id FROM metering.jobs WHERE job_id = $1 LIMIT 1", job_id
            )
        await _require_member(principal, directory, job_project or "", "job", job_id)
        if project_id and job_project != project_id:
            raise NotFound("job", job_id, f"no such job in project {project_id!r}")
        project_id = job_project
    return project_id


async def _require_member(
    principal: Principal,
    directory: ProjectDirectory,
    project_id: str,
    kind: str,
    object_id: str,
) -> None:
    """Raise NotFound for ``kind`` ``object_id`` unless ``principal`` is a member of
    ``project_id``, the project it belongs to. An empty ``project_id`` means that the object
    does not exist."""
    project = await directory.project(project_id) if project_id else None
    if project is None or principal.subject not in project.subjects:
        raise NotFound(kind, object_id)
