"""Read and cancel rights on jobs.

Program office and service callers read and cancel every job. Anyone else reads the jobs they
submitted and the jobs of projects they are a member of. They cancel the jobs they submitted,
and a project's PI also cancels that project's jobs. Membership comes from the grant service through
the cached :class:`~services.runtime.grant_directory.ProjectDirectory`, so a member removed
from a project keeps reading its jobs until the cache entry expires (30 s by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.auth import Principal
from services.runtime.errors import PermissionDenied, require_id
from services.runtime.grant_directory import ProjectDirectory, sees_every_project

from .model import Job


@dataclass(frozen=True, slots=True)
class ReadScope:
    """The jobs a listing or a watch may return; empty fields match every job."""

    project_id: str = ""
    owner: str = ""

    def matches(self, job: Job) -> bool:
        if self.project_id and job.spec.project_id != self.project_id:
            return False
        return not self.owner or job.owner == self.owner


class JobAccess:
    """Read and cancel checks for one caller's job RPCs."""

    def __init__(self, projects: ProjectDirectory) -> None:
        self._projects = projects

    async def may_see(self, principal: Principal, job: Job) -> bool:
        """Return whether ``principal`` may read ``job``."""
        if sees_every_project(principal) or job.owner == principal.subject:
            return True
        project = await self._projects.project(job.spec.project_id)
        return project is not None and principal.subject in project.subjects

    async def read_scope(self, principal: Principal, project_id: str) -> ReadScope:
        """Return the jobs a listing or watch of ``project_id`` (empty: any) may return.

        A caller without program office or service rights gets the named project's jobs if
        they are a member of it, and only their own jobs when they name no project. Raises
        NotFound both for an unknown project and for one the caller is not a member of, as
        for a job they may not read, so that the answer does not tell whether it exists.
        """
        if project_id:
            # An over-long id would reach the grant service, whose INVALID_ARGUMENT reply
            # comes back as UNAVAILABLE and so invites endless retries.
            require_id("project_id", project_id, "pass the id of a project you belong to")
        if sees_every_project(principal):
            return ReadScope(project_id)
        if not project_id:
            return ReadScope(owner=principal.subject)
        await self._projects.member_project(
            principal,
            project_id,
            "pass the id of a project you are a member of, or leave project_id empty to see "
            "the jobs you submitted",
        )
        return ReadScope(project_id)

    async def check_cancel(self, principal: Principal, job: Job) -> None:
        """Raise PermissionDenied unless ``principal`` may cancel ``job``.

        The job's owner, its project's PI, and program office and service callers may.
        """
        if sees_every_project(principal) or job.owner == principal.subject:
            return
        project = await self._projects.project(job.spec.project_id)
        if project is not None and project.pi_subject == principal.subject:
            return
        raise PermissionDenied(
            f"job {job.job_id} belongs to {job.owner!r}, and only its owner, the PI of "
            f"project {job.spec.project_id!r} or the program office may cancel it"
        )
