"""Awards without review: the per-PI and per-institution totals that cap them."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from services.grant.review_rules import AutoAwardTotals, ExploratoryCaps, exploratory_review_reason


async def review_reason(
    conn: asyncpg.Connection,
    project_id: str,
    requested: Decimal,
    caps: ExploratoryCaps,
    awarded_by: str,
    now: datetime,
) -> str | None:
    """Return why an exploratory request of a project goes to peer review, or None.

    Call it inside the transaction that awards the request. It takes transaction-scoped
    advisory locks on the project's institution and PI, so two concurrent submissions that
    share either one are counted one after the other and cannot both fit under a cap.
    ``awarded_by`` is the actor recorded on awards without review: reviewed awards do not
    count against the caps.
    """
    project = await conn.fetchrow(
        "SELECT pi, institution_id FROM projects WHERE id = $1", project_id
    )
    pi: str = project["pi"]
    institution_id: str = project["institution_id"]
    # The institution is locked before the PI in every transaction, so no two wait on each
    # other in a cycle. The schema is part of the key, so that services sharing one database
    # in separate schemas do not wait on each other.
    for kind, name in (("institution", institution_id), ("pi", pi)):
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended("
            "current_schema() || ':exploratory:' || $1 || ':' || $2, 0))",
            kind,
            name,
        )
    # Read after the locks: under READ COMMITTED each statement reads every award committed
    # before it started, so the totals include a concurrent submission's award.
    row = await conn.fetchrow(
        """
        SELECT coalesce(sum(a.awarded) FILTER (WHERE p.pi = $1), 0) AS pi_total,
               coalesce(sum(a.awarded) FILTER (WHERE p.institution_id = $2), 0)
                   AS institution_total
        FROM projects p JOIN applications a ON a.project_id = p.id
        WHERE (p.pi = $1 OR p.institution_id = $2)
          AND a.tier = 'exploratory' AND a.state = 'awarded'
          AND a.decided_by = $3 AND a.decided_at > $4
        """,
        pi,
        institution_id,
        awarded_by,
        now - timedelta(days=caps.period_days),
    )
    totals = AutoAwardTotals(pi=row["pi_total"], institution=row["institution_total"])
    return exploratory_review_reason(pi, institution_id, requested, totals, caps)
