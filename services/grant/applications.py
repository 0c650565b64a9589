"""Applications and their review: submit, assign reviewers, review, decide.

Every step writes an ``application_events`` row with who, when and what, in the same
transaction as the change.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.grant import budget, exploratory
from services.grant.amounts import format_amount
from services.grant.budget import NewGrant
from services.grant.errors import FailedPrecondition, NotFound
from services.grant.ledger_ops import Cause
from services.grant.review_rules import (
    ApplicationState,
    Decision,
    ExploratoryCaps,
    ExploratoryHolding,
    RatePolicy,
    Tier,
    check_exploratory_room,
    check_known_institution,
    check_requested,
    check_reviewer_conflict,
    check_score,
    decide_amount,
    is_auto_approved,
)

SYSTEM_ACTOR = "acsp-grant"
"""Actor recorded for steps the service takes by itself, such as exploratory awards."""


@dataclass(frozen=True, slots=True)
class NewApplication:
    project_id: str
    tier: Tier
    requested: Decimal
    starts_at: datetime
    ends_at: datetime
    accelerator_models: tuple[str, ...]
    regions: tuple[str, ...]
    justification: str


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    request_id: str
    decision: Decision
    awarded: Decimal | None
    reason: str
    providers: tuple[str, ...]
    regions: tuple[str, ...]
    accelerator_models: tuple[str, ...]
    rate_policy: RatePolicy
    rate_card_version: int | None = None
    """The current rate-card version, fixed for a ``fixed_at_award`` grant."""


async def _event(
    conn: asyncpg.Connection, application_id: str, action: str, actor: str, detail: str
) -> None:
    await conn.execute(
        "INSERT INTO application_events (application_id, action, actor, detail) "
        "VALUES ($1, $2, $3, $4)",
        application_id,
        action,
        actor,
        detail,
    )


async def lock_application(conn: asyncpg.Connection, application_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM applications WHERE id = $1 FOR UPDATE", application_id)
    if row is None:
        raise NotFound("application", application_id)
    return row


async def earlier_submission(
    conn: asyncpg.Connection, new: NewApplication, request_id: str, actor: str
) -> str | None:
    """Return the id of the application that ``actor`` submitted with ``request_id`` for the
    project of ``new``, or None. Raise FailedPrecondition naming ``request_id`` if that
    request was for another application."""
    existing = await conn.fetchrow(
        "SELECT * FROM applications WHERE submitted_by = $1 AND project_id = $2 "
        "AND request_id = $3",
        actor,
        new.project_id,
        request_id,
    )
    if existing is None:
        return None
    _check_same_application(existing, new, request_id)
    return str(existing["id"])


async def submit(
    conn: asyncpg.Connection,
    new: NewApplication,
    request_id: str,
    actor: str,
    limits: Mapping[Tier, Decimal],
    caps: ExploratoryCaps,
    now: datetime,
) -> str:
    """Record an application and return its id; award exploratory ones at once.

    An exploratory request that would take its PI or institution over ``caps`` stays
    submitted for peer review instead, with the reason in its history.

    A request id is scoped to the submitter and the project. The same caller's retry returns
    the application the first request created, and a reuse of the id for another application
    raises FailedPrecondition naming ``request_id``.
    """
    # One submission of a project at a time, so that two concurrent exploratory applications
    # cannot both fit under the tier limit, and a concurrent retry finds the first one's row.
    await conn.execute("SELECT 1 FROM projects WHERE id = $1 FOR NO KEY UPDATE", new.project_id)
    earlier = await earlier_submission(conn, new, request_id, actor)
    if earlier is not None:
        return earlier
    check_requested(new.tier, new.requested, limits)
    review_reason = None
    if is_auto_approved(new.tier):
        holdings = await _exploratory_holdings(conn, new.project_id, now)
        check_exploratory_room(new.project_id, holdings, new.requested, limits[new.tier])
        review_reason = await exploratory.review_reason(
            conn, new.project_id, new.requested, caps, SYSTEM_ACTOR, now
        )
    application_id = f"app-{uuid.uuid4().hex[:16]}"
    await conn.execute(
        """
        INSERT INTO applications (id, request_id, project_id, tier, requested, starts_at, ends_at,
                                  accelerator_models, regions, justification, state,
                                  submitted_by, submitted_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'submitted', $11, $12)
        """,
        application_id,
        request_id,
        new.project_id,
        new.tier.value,
        new.requested,
        new.starts_at,
        new.ends_at,
        list(new.accelerator_models),
        list(new.regions),
        new.justification,
        actor,
        now,
    )
    await _event(
        conn,
        application_id,
        "submitted",
        actor,
        f"{new.tier} tier, {format_amount(new.requested)} PF-days requested",
    )
    if review_reason is not None:
        await _event(conn, application_id, "sent_to_review", SYSTEM_ACTOR, review_reason)
    elif is_auto_approved(new.tier):
        reason = "exploratory tier: awarded without review within the tier limit"
        await _award(
            conn,
            application_id,
            new.project_id,
            new.tier,
            new.requested,
            new.starts_at,
            new.ends_at,
            DecisionRequest(
                request_id=request_id,
                decision=Decision.AWARD,
                awarded=None,
                reason=reason,
                providers=(),
                regions=new.regions,
                accelerator_models=new.accelerator_models,
                rate_policy=RatePolicy.CURRENT,
            ),
            SYSTEM_ACTOR,
            now,
        )
    return application_id


def _check_same_application(row: asyncpg.Record, new: NewApplication, request_id: str) -> None:
    """Raise FailedPrecondition unless a stored application matches ``new`` field by field."""
    same = (
        row["tier"] == new.tier.value
        and row["requested"] == new.requested
        and row["starts_at"] == new.starts_at
        and row["ends_at"] == new.ends_at
        and tuple(row["accelerator_models"]) == new.accelerator_models
        and tuple(row["regions"]) == new.regions
        and row["justification"] == new.justification
    )
    if not same:
        raise FailedPrecondition(
            f"request id {request_id!r} was already used for application {row['id']}, which "
            "differs from this request; use a new request id for a new application",
            field="request_id",
        )


async def _exploratory_holdings(
    conn: asyncpg.Connection, project_id: str, now: datetime
) -> list[ExploratoryHolding]:
    """Return a project's live exploratory grants and pending exploratory applications."""
    grants = await conn.fetch(
        "SELECT id, credited FROM grants WHERE project_id = $1 AND tier = 'exploratory' "
        "AND NOT expired AND ends_at > $2 ORDER BY id",
        project_id,
        now,
    )
    pending = await conn.fetch(
        "SELECT id, requested FROM applications WHERE project_id = $1 AND tier = 'exploratory' "
        "AND state IN ('submitted', 'in_review') ORDER BY id",
        project_id,
    )
    return [
        *(ExploratoryHolding("grant", r["id"], r["credited"]) for r in grants),
        *(ExploratoryHolding("application", r["id"], r["requested"]) for r in pending),
    ]


async def assign_reviewer(
    conn: asyncpg.Connection,
    application_id: str,
    reviewer: str,
    reviewer_institution: str,
    actor: str,
) -> None:
    """Assign a reviewer, rejecting a conflict of interest or an unregistered institution.

    Assigning twice changes nothing.
    """
    row = await lock_application(conn, application_id)
    if row["state"] not in (ApplicationState.SUBMITTED, ApplicationState.IN_REVIEW):
        raise FailedPrecondition(
            f"application {application_id} is {row['state']}: reviewers can no longer be assigned",
            field="application_id",
        )
    applicant_institution, members = await _applicant(conn, row["project_id"])
    check_reviewer_conflict(reviewer, reviewer_institution, applicant_institution, members)
    check_known_institution(
        reviewer,
        reviewer_institution,
        await known_institutions(conn, reviewer),
        field="reviewer_institution_id",
    )
    registered = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM institutions WHERE id = $1)", reviewer_institution
    )
    if not registered:
        raise NotFound(
            "institution",
            reviewer_institution,
            "set reviewer_institution_id to a registered institution; ListInstitutions lists them",
        )
    inserted = await conn.fetchval(
        "INSERT INTO application_reviewers (application_id, reviewer, institution_id, "
        "assigned_by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING reviewer",
        application_id,
        reviewer,
        reviewer_institution,
        actor,
    )
    if inserted is None:
        return
    await conn.execute("UPDATE applications SET state = 'in_review' WHERE id = $1", application_id)
    await _event(conn, application_id, "reviewer_assigned", actor, reviewer)


async def _applicant(conn: asyncpg.Connection, project_id: str) -> tuple[str, set[str]]:
    """Return the institution and the member subjects of an applying project."""
    institution: str = await conn.fetchval(
        "SELECT institution_id FROM projects WHERE id = $1", project_id
    )
    members = await conn.fetch(
        "SELECT member FROM project_members WHERE project_id = $1", project_id
    )
    return institution, {m["member"] for m in members}


async def known_institutions(conn: asyncpg.Connection, reviewer: str) -> set[str]:
    """Return the institutions the service has seen for a reviewer.

    Those are the institutions of the reviewer's own tokens, recorded with each submitted
    review, and of the projects the reviewer leads as PI.
    """
    rows = await conn.fetch(
        "SELECT institution_id FROM application_reviewers "
        "WHERE reviewer = $1 AND reviewed_at IS NOT NULL "
        "UNION SELECT institution_id FROM projects WHERE pi = $1",
        reviewer,
    )
    return {r["institution_id"] for r in rows}


async def submit_review(
    conn: asyncpg.Connection,
    application_id: str,
    reviewer: str,
    reviewer_institution: str | None,
    score: int,
    comments: str,
) -> None:
    """Store the caller's review; a reviewer may revise it until the decision.

    A first review is recorded as ``reviewed`` and each later one as ``review_revised`` with
    the old and the new score, so the history shows what changed.

    ``reviewer_institution`` comes from the caller's own token. A review is rejected as a
    conflict of interest when that token names the applicant's institution or the reviewer has
    joined the project since assignment. It is also rejected when the token names another
    institution than the one the program office gave at assignment.
    """
    check_score(score)
    row = await lock_application(conn, application_id)
    if row["state"] != ApplicationState.IN_REVIEW:
        raise FailedPrecondition(
            f"application {application_id} is {row['state']}, not in review",
            field="application_id",
        )
    applicant_institution, members = await _applicant(conn, row["project_id"])
    check_reviewer_conflict(
        reviewer,
        reviewer_institution,
        applicant_institution,
        members,
        subject_field="reviewer",
        institution_field="token.institution",
    )
    assigned = await conn.fetchval(
        "SELECT institution_id FROM application_reviewers "
        "WHERE application_id = $1 AND reviewer = $2",
        application_id,
        reviewer,
    )
    if assigned is not None and reviewer_institution is not None:
        check_known_institution(
            reviewer, reviewer_institution, {assigned}, field="token.institution"
        )
    # The old score is read in the same statement, so a revision records what it replaced.
    previous = await conn.fetchrow(
        "UPDATE application_reviewers r SET score = $3, comment = $4, reviewed_at = now() "
        "FROM application_reviewers old "
        "WHERE r.application_id = $1 AND r.reviewer = $2 "
        "AND old.application_id = r.application_id AND old.reviewer = r.reviewer "
        "RETURNING old.score, old.reviewed_at",
        application_id,
        reviewer,
        score,
        comments,
    )
    if previous is None:
        raise FailedPrecondition(
            f"{reviewer!r} is not assigned to review application {application_id}",
            field="application_id",
        )
    if previous["reviewed_at"] is None:
        await _event(conn, application_id, "reviewed", reviewer, f"score {score}")
    else:
        detail = f"score {previous['score']} -> {score}"
        await _event(conn, application_id, "review_revised", reviewer, detail)


async def decide(
    conn: asyncpg.Connection,
    application_id: str,
    request: DecisionRequest,
    actor: str,
    now: datetime,
) -> None:
    """Apply the program office's decision; an award creates the grant in the same transaction.

    The same caller's retry of the same decision changes nothing. An award needs at least one
    review.
    """
    row = await lock_application(conn, application_id)
    if row["decision"] is not None:
        if row["decision_request_id"] == request.request_id and row["decided_by"] == actor:
            _check_same_decision(row, request)
            return
        raise FailedPrecondition(
            f"application {application_id} was already decided ({row['decision']})",
            field="application_id",
        )
    if row["state"] not in (ApplicationState.SUBMITTED, ApplicationState.IN_REVIEW):
        raise FailedPrecondition(
            f"application {application_id} is {row['state']}", field="application_id"
        )
    amount = decide_amount(request.decision, row["requested"], request.awarded, request.reason)
    if request.decision is Decision.REJECT:
        await conn.execute(
            "UPDATE applications SET state = 'rejected', decision = 'reject', "
            "decision_request_id = $2, decision_reason = $3, decided_by = $4, decided_at = $5 "
            "WHERE id = $1",
            application_id,
            request.request_id,
            request.reason,
            actor,
            now,
        )
        await _event(conn, application_id, "rejected", actor, request.reason)
        return
    reviews = await conn.fetchval(
        "SELECT count(*) FROM application_reviewers WHERE application_id = $1 "
        "AND reviewed_at IS NOT NULL",
        application_id,
    )
    if reviews == 0:
        raise FailedPrecondition(
            f"application {application_id} has no review yet: assign reviewers and wait for "
            "a review before awarding",
            field="application_id",
        )
    await _award(
        conn,
        application_id,
        row["project_id"],
        Tier(row["tier"]),
        amount,
        row["starts_at"],
        row["ends_at"],
        request,
        actor,
        now,
    )


def _check_same_decision(row: asyncpg.Record, request: DecisionRequest) -> None:
    """Raise FailedPrecondition unless a stored decision is the one ``request`` repeats."""
    same = (
        row["decision"] == request.decision.value
        and row["decision_reason"] == request.reason
        and (request.awarded is None or row["awarded"] == request.awarded)
    )
    if not same:
        raise FailedPrecondition(
            f"request id {request.request_id!r} already decided application {row['id']} as "
            f"{row['decision']}, and this request asks for another decision; an application is "
            "decided once",
            field="request_id",
        )


async def _award(
    conn: asyncpg.Connection,
    application_id: str,
    project_id: str,
    tier: Tier,
    amount: Decimal,
    starts_at: datetime,
    ends_at: datetime,
    request: DecisionRequest,
    actor: str,
    now: datetime,
) -> str:
    new = NewGrant(
        project_id=project_id,
        application_id=application_id,
        tier=tier,
        amount=amount,
        starts_at=starts_at,
        ends_at=ends_at,
        providers=request.providers,
        regions=request.regions,
        accelerator_models=request.accelerator_models,
        rate_policy=request.rate_policy,
        rate_card_version=(
            request.rate_card_version if request.rate_policy is RatePolicy.FIXED_AT_AWARD else None
        ),
    )
    cause = Cause(actor=actor, trigger="rpc:DecideApplication", reason=request.reason)
    grant_id = await budget.award_grant(conn, new, f"award:{application_id}", cause, now)
    await conn.execute(
        "UPDATE applications SET state = 'awarded', decision = $2, decision_request_id = $3, "
        "awarded = $4, decision_reason = $5, decided_by = $6, decided_at = $7, grant_id = $8 "
        "WHERE id = $1",
        application_id,
        request.decision.value,
        request.request_id,
        amount,
        request.reason,
        actor,
        now,
        grant_id,
    )
    await _event(
        conn,
        application_id,
        "awarded",
        actor,
        f"{format_amount(amount)} PF-days as grant {grant_id}: {request.reason}",
    )
    return grant_id


async def load(
    conn: asyncpg.Connection, application_id: str
) -> tuple[asyncpg.Record, Sequence[asyncpg.Record], Sequence[asyncpg.Record]]:
    """Return an application with its reviewers and its history."""
    row = await conn.fetchrow("SELECT * FROM applications WHERE id = $1", application_id)
    if row is None:
        raise NotFound("application", application_id)
    reviewers = await conn.fetch(
        "SELECT * FROM application_reviewers WHERE application_id = $1 ORDER BY assigned_at",
        application_id,
    )
    history = await conn.fetch(
        "SELECT * FROM application_events WHERE application_id = $1 ORDER BY id", application_id
    )
    return row, reviewers, history
