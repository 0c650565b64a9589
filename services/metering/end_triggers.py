"""Recording the health event that an agent names as the end of an attempt's work.

A task event that reports a hardware failure, or a fatal health event that lists the tasks on
the failed accelerator, names the health event as the attempt's end trigger, and the first
trigger recorded decides the attempt's refund. Only the providers whose nodes run the attempt's
tasks may name it. A trigger from another provider is logged and kept as a dead letter, as
usage from such a provider is, and the attempt is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

logger = logging.getLogger(__name__)

# One statement for the whole batch. An attempt whose providers are not known yet (NULL, or no
# row) accepts any provider's trigger, and each provider's first trigger is kept as a candidate.
# The upsert in attempts.py replaces such a trigger with the earliest candidate of a placed
# provider, or clears it, when the placements show that its provider runs none of the tasks.
# The ON CONFLICT condition repeats the provider check on the row it locks, in case the
# placements arrived meanwhile.
# Rows are inserted in key order, so that concurrent batches lock them in the same order.
_RECORD_END_TRIGGERS = """
WITH given AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bytea[])
        WITH ORDINALITY AS g(job_id, attempt, end_trigger, provider, subject, payload, position)
), checked AS (
    SELECT g.*, coalesce(g.provider <> ALL(j.providers), false) AS unplaced,
           j.providers IS NULL AS unknown
    FROM given g
    LEFT JOIN metering.jobs j ON j.job_id = g.job_id AND j.attempt = g.attempt
), recorded AS (
    INSERT INTO metering.jobs AS j
        (job_id, attempt, hold_id, grant_id, end_trigger, end_trigger_provider, cause)
    SELECT DISTINCT ON (job_id, attempt) job_id, attempt, '', '', end_trigger, provider,
           'event:task'
    FROM checked
    WHERE NOT unplaced
    ORDER BY job_id, attempt, position
    ON CONFLICT (job_id, attempt) DO UPDATE
    SET end_trigger = excluded.end_trigger, end_trigger_provider = excluded.end_trigger_provider
    WHERE j.end_trigger = ''
      AND (j.providers IS NULL OR excluded.end_trigger_provider = ANY(j.providers))
    RETURNING 1
), candidates AS (
    INSERT INTO metering.end_trigger_candidates (job_id, attempt, provider, end_trigger, position)
    SELECT DISTINCT ON (job_id, attempt, provider) job_id, attempt, provider, end_trigger, position
    FROM checked
    WHERE unknown
    ORDER BY job_id, attempt, provider, position
    ON CONFLICT (job_id, attempt, provider) DO NOTHING
    RETURNING 1
), rejected AS (
    INSERT INTO metering.dead_letters (dedupe_key, subject, stream_sequence, reason, payload)
    SELECT DISTINCT ON (key) key, subject, 0, reason, payload
    FROM (
        SELECT 'unplaced-trigger:' || job_id || '/' || attempt || '/' || provider || '/'
                   || end_trigger AS key,
               subject, payload, position,
               'provider ' || provider || ' named ' || end_trigger || ' as the end of job '
                   || job_id || ' attempt ' || attempt || ', which runs on none of its '
                   || 'nodes; the trigger is not recorded' AS reason
        FROM checked
        WHERE unplaced
    ) AS u
    ORDER BY key, position
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING 1
)
SELECT job_id, attempt, end_trigger, provider FROM checked WHERE unplaced ORDER BY position
"""


# Gives each given attempt that has no trigger the earliest candidate of a placed provider. Each
# side of a race needs it. Placements that commit while the statement above runs make its
# provider check on the locked row reject the batch's first trigger of an attempt, and the
# statement tries no other, so it runs after that statement. An upsert in attempts.py that waits
# on a row this batch locked reads the candidates with a snapshot taken before the batch
# committed, which misses the batch's candidates, so it runs this statement after itself.
# An UPDATE alone locks rows in the order its plan visits them: a nested loop visits keys in
# order, a hash join the table's physical order. Two batches with different plans could then
# deadlock. So the locked CTE locks the rows first, in key order, because FOR UPDATE locks rows
# after the sort, and the UPDATE touches only rows that this transaction has locked.
_TAKE_PLACED_CANDIDATES = """
WITH taken AS (
    SELECT DISTINCT ON (c.job_id, c.attempt) c.job_id, c.attempt, c.end_trigger, c.provider
    FROM metering.end_trigger_candidates c
    JOIN metering.jobs p ON p.job_id = c.job_id AND p.attempt = c.attempt
    JOIN unnest($1::text[], $2::int[]) AS g(job_id, attempt)
      ON g.job_id = c.job_id AND g.attempt = c.attempt
    WHERE p.end_trigger = '' AND c.provider = ANY(p.providers)
    ORDER BY c.job_id, c.attempt, c.recorded_at, c.position
), locked AS MATERIALIZED (
    SELECT l.job_id, l.attempt
    FROM metering.jobs l
    JOIN taken t ON t.job_id = l.job_id AND t.attempt = l.attempt
    ORDER BY l.job_id, l.attempt
    FOR UPDATE OF l
)
UPDATE metering.jobs AS j
SET end_trigger = t.end_trigger, end_trigger_provider = t.provider
FROM locked l
JOIN taken t ON t.job_id = l.job_id AND t.attempt = l.attempt
WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND j.end_trigger = ''
"""


@dataclass(frozen=True, slots=True)
class EndTrigger:
    """A health event that an agent names as the end of an attempt's work."""

    job_id: str
    attempt: int
    trigger: str
    """``health:<event id>``."""
    provider: str
    """The provider of the subject the event came on, which NATS authenticates."""
    subject: str
    payload: bytes
    """The event as received, kept in the dead letter when the trigger is rejected."""


async def record_end_triggers(conn: asyncpg.Connection, triggers: Sequence[EndTrigger]) -> int:
    """Record each attempt's first trigger from a provider that runs its tasks.

    An attempt that already has a trigger keeps it. Rejected triggers are logged and kept as
    dead letters, and the return value is their number.
    """
    if not triggers:
        return 0
    job_ids = [t.job_id for t in triggers]
    attempts = [t.attempt for t in triggers]
    rows = await conn.fetch(
        _RECORD_END_TRIGGERS,
        job_ids,
        attempts,
        [t.trigger for t in triggers],
        [t.provider for t in triggers],
        [t.subject for t in triggers],
        [t.payload for t in triggers],
    )
    await take_placed_candidates(conn, job_ids, attempts)
    for row in rows:
        logger.warning(
            "ignoring end trigger %s of job %s attempt %s from provider %s, which runs none "
            "of its tasks",
            row["end_trigger"],
            row["job_id"],
            row["attempt"],
            row["provider"],
            extra={"job_id": row["job_id"], "attempt": row["attempt"], "provider": row["provider"]},
        )
    return len(rows)


async def take_placed_candidates(
    conn: asyncpg.Connection, job_ids: Sequence[str], attempts: Sequence[int]
) -> None:
    """Give each attempt without a trigger the earliest candidate of a placed provider.

    ``job_ids`` and ``attempts`` name the attempts pairwise.
    """
    await conn.execute(_TAKE_PLACED_CANDIDATES, list(job_ids), list(attempts))
