"""RPC handlers for institutions, projects, members, applications and review."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import grpc

from acsp.v1 import grant_pb2
from services.grant import access, applications, directory
from services.grant import convert as cv
from services.grant.app import (
    GrantApp,
    identifier_in,
    page_in,
    page_out,
    reference_in,
    request_id_in,
)
from services.grant.applications import DecisionRequest, NewApplication
from services.grant.countries import country_code_in
from services.grant.directory import NewInstitution, NewProject
from services.grant.errors import InvalidArgument, NotFound, PermissionDenied
from services.grant.ratecard import current_version
from services.grant.review_rules import Decision, RatePolicy, check_validity
from services.runtime.auth import (
    PRINCIPAL_NAME_RULE,
    Role,
    current_principal,
    is_principal_name,
)


async def _project_out(conn: asyncpg.Connection, project_id: str) -> grant_pb2.Project:
    row = await directory.get_project(conn, project_id)
    return cv.project_out(row, await directory.project_members(conn, project_id))


async def _application_out(conn: asyncpg.Connection, application_id: str) -> grant_pb2.Application:
    row, reviewers, history = await applications.load(conn, application_id)
    message = grant_pb2.Application(
        application_id=row["id"],
        project_id=row["project_id"],
        tier=cv.TIER_OUT[cv.Tier(row["tier"])],
        requested_pf_days=cv.amount_out(row["requested"]),
        accelerator_models=row["accelerator_models"],
        regions=row["regions"],
        justification=row["justification"],
        state=cv.APPLICATION_STATES[cv.ApplicationState(row["state"])],
        applicant_subject=row["submitted_by"],
        reviewer_subjects=[r["reviewer"] for r in reviewers],
        grant_id=row["grant_id"] or "",
    )
    cv.time_out(row["starts_at"], message.validity.start_time)
    cv.time_out(row["ends_at"], message.validity.end_time)
    cv.time_out(row["submitted_at"], message.create_time)
    for reviewer in reviewers:
        if reviewer["reviewed_at"] is None:
            continue
        review = message.reviews.add(
            reviewer_subject=reviewer["reviewer"],
            score=reviewer["score"],
            comments=reviewer["comment"] or "",
        )
        cv.time_out(reviewer["reviewed_at"], review.submit_time)
    if row["decision"] is not None:
        message.decision.outcome = cv.DECISION_OUT[cv.Decision(row["decision"])]
        message.decision.reason = row["decision_reason"] or ""
        message.decision.decided_by = row["decided_by"] or ""
        if row["awarded"] is not None:
            message.decision.awarded_pf_days.CopyFrom(cv.amount_out(row["awarded"]))
        cv.time_out(row["decided_at"], message.decision.decide_time)
    for event in history:
        cause = message.history.add(
            trigger=f"application:{event['action']}",
            reference_id=row["id"],
            actor=event["actor"],
            reason=event["detail"],
        )
        cv.time_out(event["at"], cause.time)
    return message


async def _require_application_visible(conn: asyncpg.Connection, application_id: str) -> str:
    """Return the application's project id if the caller may see it; else raise NotFound."""
    project_id = await conn.fetchval(
        "SELECT project_id FROM applications WHERE id = $1", application_id
    )
    if project_id is None:
        raise NotFound("application", application_id)
    try:
        await access.require_project_visible(conn, project_id, as_reviewer=True)
    except NotFound:
        raise NotFound("application", application_id) from None
    return str(project_id)


def _principal_name_in(field: str, text: str) -> str:
    """Return a PI or member name that follows the rule for principal names in tokens."""
    name = cv.text_in(field, text)
    if not is_principal_name(name):
        raise InvalidArgument(field, f"{name!r} is not a valid principal name", PRINCIPAL_NAME_RULE)
    return name


class ProgramHandlers:
    """Institutions, projects and applications."""

    app: GrantApp

    async def CreateInstitution(
        self, request: grant_pb2.CreateInstitutionRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Institution:
        principal = access.require_program_office("create institutions")
        request_id_in(request.request_id)
        new = NewInstitution(
            institution_id=identifier_in(
                "institution.institution_id", request.institution.institution_id
            ),
            name=cv.text_in("institution.display_name", request.institution.display_name),
            country_code=country_code_in(
                "institution.country_code", request.institution.country_code
            ),
        )
        async with self.app.database().transaction() as conn:
            row = await directory.create_institution(conn, new, principal.subject)
        return cv.institution_out(row)

    async def GetInstitution(
        self, request: grant_pb2.GetInstitutionRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Institution:
        current_principal()
        async with self.app.database().acquire() as conn:
            row = await directory.get_institution(
                conn, reference_in("institution_id", request.institution_id)
            )
        return cv.institution_out(row)

    async def ListInstitutions(
        self, request: grant_pb2.ListInstitutionsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListInstitutionsResponse:
        current_principal()
        limit, after = page_in(request.page)
        async with self.app.database().acquire() as conn:
            rows = await directory.list_institutions(conn, after, limit)
        return grant_pb2.ListInstitutionsResponse(
            institutions=[cv.institution_out(r) for r in rows],
            page=page_out([r["id"] for r in rows], limit),
        )

    async def CreateProject(
        self, request: grant_pb2.CreateProjectRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Project:
        principal = current_principal()
        if not principal.has_any({Role.PROGRAM_OFFICE, Role.PI}):
            raise PermissionDenied(
                f"{principal.subject!r} may not create projects: only the pi role (for their own "
                "projects) or the program_office role may"
            )
        request_key = request_id_in(request.request_id)
        project = request.project
        pi = _principal_name_in("project.pi_subject", project.pi_subject)
        institution_id = reference_in("project.institution_id", project.institution_id)
        if not principal.has_any({Role.PROGRAM_OFFICE}):
            if pi != principal.subject:
                raise PermissionDenied(
                    f"{principal.subject!r} may only create projects with themselves as PI"
                )
            if principal.institution is not None and principal.institution != institution_id:
                raise PermissionDenied(
                    f"{principal.subject!r} belongs to institution {principal.institution!r} "
                    f"and may not create projects for {institution_id!r}"
                )
        members = []
        for index, member in enumerate(project.members):
            role = cv.ROLES.get(member.role)  # type: ignore[call-overload]
            if role is None:
                raise InvalidArgument(
                    f"project.members[{index}].role", "is not set", "use member or viewer"
                )
            subject = _principal_name_in(f"project.members[{index}].subject", member.subject)
            members.append((subject, role))
        new = NewProject(
            project_id=identifier_in("project.project_id", project.project_id),
            institution_id=institution_id,
            name=cv.text_in("project.display_name", project.display_name),
            pi=pi,
            members=tuple(members),
        )
        async with self.app.database().transaction() as conn:
            await directory.create_project(conn, new, request_key, principal.subject)
            return await _project_out(conn, new.project_id)

    async def GetProject(
        self, request: grant_pb2.GetProjectRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Project:
        project_id = reference_in("project_id", request.project_id)
        async with self.app.database().acquire() as conn:
            await access.require_project_visible(conn, project_id)
            return await _project_out(conn, project_id)

    async def ListProjects(
        self, request: grant_pb2.ListProjectsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListProjectsResponse:
        principal = current_principal()
        limit, after = page_in(request.page)
        async with self.app.database().acquire() as conn:
            rows = await directory.list_projects(
                conn, principal, access.is_overseer(principal), request.institution_id, after, limit
            )
            projects = [await _project_out(conn, r["id"]) for r in rows]
        return grant_pb2.ListProjectsResponse(
            projects=projects, page=page_out([r["id"] for r in rows], limit)
        )

    async def AddProjectMember(
        self, request: grant_pb2.AddProjectMemberRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Project:
        request_id_in(request.request_id)
        project_id = reference_in("project_id", request.project_id)
        subject = _principal_name_in("member.subject", request.member.subject)
        role = cv.ROLES.get(request.member.role)  # type: ignore[call-overload]
        if role is None:
            raise InvalidArgument("member.role", "is not set", "use member or viewer")
        async with self.app.database().transaction() as conn:
            principal = await access.require_project_pi(conn, project_id, "add members")
            await directory.set_member(conn, project_id, subject, role, principal.subject)
            return await _project_out(conn, project_id)

    async def RemoveProjectMember(
        self, request: grant_pb2.RemoveProjectMemberRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Project:
        request_key = request_id_in(request.request_id)
        project_id = reference_in("project_id", request.project_id)
        subject = cv.text_in("subject", request.subject)
        async with self.app.database().transaction() as conn:
            principal = await access.require_project_pi(conn, project_id, "remove members")
            await directory.remove_member(conn, project_id, subject, request_key, principal.subject)
            return await _project_out(conn, project_id)

    async def SubmitApplication(
        self, request: grant_pb2.SubmitApplicationRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Application:
        request_key = request_id_in(request.request_id)
        application = request.application
        project_id = reference_in("application.project_id", application.project_id)
        starts_at = cv.time_in(
            "application.validity.start_time",
            application.validity.start_time,
            application.validity.HasField("start_time"),
        )
        ends_at = cv.time_in(
            "application.validity.end_time",
            application.validity.end_time,
            application.validity.HasField("end_time"),
        )
        check_validity(
            starts_at,
            ends_at,
            datetime.now(UTC),
            self.app.settings.max_validity_days,
            "application.validity.end_time",
        )
        new = NewApplication(
            project_id=project_id,
            tier=cv.tier_in("application.tier", application.tier),
            requested=cv.amount_in("application.requested_pf_days", application.requested_pf_days),
            starts_at=starts_at,
            ends_at=ends_at,
            accelerator_models=cv.models_in(
                "application.accelerator_models", application.accelerator_models
            ),
            regions=cv.regions_in("application.regions", application.regions),
            justification=cv.text_in(
                "application.justification", application.justification, limit=cv.MAX_JUSTIFICATION
            ),
        )
        async with self.app.database().acquire() as conn:
            principal = await access.require_project_pi(conn, project_id, "submit applications")
            earlier = await applications.earlier_submission(
                conn, new, request_key, principal.subject
            )
            if earlier is not None:
                return await _application_out(conn, earlier)
        # The regions become the grant's limits when an exploratory application is awarded.
        # The check calls the scheduler, so it runs after authorization, only for a new
        # application, and outside the transaction.
        await self.app.check_registered("", (), "application.regions", new.regions)
        limits = self.app.settings.tier_limits()
        async with self.app.database().transaction() as conn:
            principal = await access.require_project_pi(conn, project_id, "submit applications")
            application_id = await applications.submit(
                conn,
                new,
                request_key,
                principal.subject,
                limits,
                self.app.settings.exploratory_caps(),
                datetime.now(UTC),
            )
            return await _application_out(conn, application_id)

    async def GetApplication(
        self, request: grant_pb2.GetApplicationRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Application:
        application_id = reference_in("application_id", request.application_id)
        async with self.app.database().acquire() as conn:
            await _require_application_visible(conn, application_id)
            return await _application_out(conn, application_id)

    async def ListApplications(
        self, request: grant_pb2.ListApplicationsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListApplicationsResponse:
        principal = current_principal()
        limit, after = page_in(request.page)
        state = cv.APPLICATION_STATE_IN.get(request.state, "")  # type: ignore[call-overload]
        async with self.app.database().acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT a.id FROM applications a
                WHERE a.id > $1 AND ($2 = '' OR a.project_id = $2) AND ($3 = '' OR a.state = $3)
                  AND ($4
                       OR EXISTS (SELECT 1 FROM project_members m
                                  WHERE m.project_id = a.project_id AND m.member = $5)
                       OR EXISTS (SELECT 1 FROM application_reviewers r
                                  WHERE r.application_id = a.id AND r.reviewer = $5))
                ORDER BY a.id LIMIT $6
                """,
                after,
                request.project_id,
                str(state),
                access.is_overseer(principal),
                principal.subject,
                limit,
            )
            items = [await _application_out(conn, r["id"]) for r in rows]
        return grant_pb2.ListApplicationsResponse(
            applications=items, page=page_out([r["id"] for r in rows], limit)
        )

    async def AssignReviewer(
        self, request: grant_pb2.AssignReviewerRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Application:
        principal = access.require_program_office("assign reviewers")
        request_id_in(request.request_id)
        application_id = reference_in("application_id", request.application_id)
        reviewer = cv.text_in("reviewer_subject", request.reviewer_subject)
        institution = cv.text_in("reviewer_institution_id", request.reviewer_institution_id)
        async with self.app.database().transaction() as conn:
            await applications.assign_reviewer(
                conn, application_id, reviewer, institution, principal.subject
            )
            return await _application_out(conn, application_id)

    async def SubmitReview(
        self, request: grant_pb2.SubmitReviewRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Application:
        principal = access.require_role(Role.REVIEWER, "submit reviews")
        request_id_in(request.request_id)
        application_id = reference_in("application_id", request.application_id)
        comments = cv.text_in("comments", request.comments, limit=cv.MAX_JUSTIFICATION)
        async with self.app.database().transaction() as conn:
            # A reviewer who may not read the application gets the NOT_FOUND of a missing one,
            # not its state, its applicant's institution or whether they are assigned.
            await _require_application_visible(conn, application_id)
            await applications.submit_review(
                conn,
                application_id,
                principal.subject,
                principal.institution,
                request.score,
                comments,
            )
            return await _application_out(conn, application_id)

    async def DecideApplication(
        self, request: grant_pb2.DecideApplicationRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Application:
        principal = access.require_program_office("decide applications")
        request_key = request_id_in(request.request_id)
        application_id = reference_in("application_id", request.application_id)
        outcome = cv.DECISIONS.get(request.decision.outcome)  # type: ignore[call-overload]
        if outcome is None:
            raise InvalidArgument(
                "decision.outcome", "is not set", "use award, award_less or reject"
            )
        awarded = None
        if request.decision.HasField("awarded_pf_days"):
            awarded = cv.amount_in("decision.awarded_pf_days", request.decision.awarded_pf_days)
        providers = cv.providers_in("constraints.providers", request.constraints.providers)
        regions = cv.regions_in("constraints.regions", request.constraints.regions)
        cv.check_region_providers("constraints.regions", regions, providers)
        decision = DecisionRequest(
            request_id=request_key,
            decision=outcome,
            awarded=awarded,
            reason=cv.text_in("decision.reason", request.decision.reason, limit=2000),
            providers=providers,
            regions=regions,
            accelerator_models=cv.models_in(
                "constraints.accelerator_models", request.constraints.accelerator_models
            ),
            rate_policy=cv.rate_policy_in(request.rate_policy),
        )
        if outcome is not Decision.REJECT:
            await self.app.check_registered(
                "constraints.providers", providers, "constraints.regions", regions
            )
        if decision.rate_policy is RatePolicy.FIXED_AT_AWARD:
            version = await current_version(self.app.js)
            decision = replace(decision, rate_card_version=version)
        async with self.app.database().transaction() as conn:
            await applications.decide(
                conn, application_id, decision, principal.subject, datetime.now(UTC)
            )
            return await _application_out(conn, application_id)
