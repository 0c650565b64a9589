"""SQL statements of the job store, each one round trip for a whole batch."""

from __future__ import annotations

from typing import Final

JOB_SELECT_LIST: Final = (
    "job_id, owner, institution, spec::text, state, pending_reason, reason, attempt, array_id,"
    " array_index, submitted_at, started_at, ended_at, hold_id, hold_amount, checkpoint_ref,"
    " checkpoint_at, exit_code, placement::text, stop_outcome, grant_id, updated_at,"
    " start_failures, avoid_nodes::text, attempt_reason, rendezvous_port, preemptor_id,"
    " replacements, stop_deadline"
)

INSERT_JOBS: Final = """
WITH leader AS (SELECT epoch FROM scheduler.leaders WHERE shard = $25 FOR SHARE)
INSERT INTO scheduler.jobs (job_id, shard, owner, institution, grant_id, project_id, spec, state,
    pending_reason, reason, attempt, array_id, array_index, submitted_at, started_at, ended_at,
    hold_id, hold_amount, checkpoint_ref, exit_code, placement, cause, epoch, request_id,
    updated_at)
SELECT u.job_id, u.shard, u.owner, u.institution, u.grant_id, u.project_id, u.spec::jsonb,
    u.state, u.pending_reason, u.reason, u.attempt, u.array_id, u.array_index, u.submitted_at,
    u.started_at, u.ended_at, u.hold_id, u.hold_amount, u.checkpoint_ref, u.exit_code,
    u.placement::jsonb, u.cause, u.epoch, u.request_id, u.submitted_at
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::int[], $12::text[], $13::int[],
    $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::text[], $18::numeric[],
    $19::text[], $20::int[], $21::text[], $22::text[], $23::bigint[], $24::text[]
) AS u(job_id, shard, owner, institution, grant_id, project_id, spec, state, pending_reason,
       reason, attempt, array_id, array_index, submitted_at, started_at, ended_at, hold_id,
       hold_amount, checkpoint_ref, exit_code, placement, cause, epoch, request_id)
WHERE (SELECT epoch FROM leader) = $26
ON CONFLICT (request_id) DO NOTHING
RETURNING job_id
"""

UPDATE_JOBS: Final = """
UPDATE scheduler.jobs AS j SET
    state = u.state, pending_reason = u.pending_reason, reason = u.reason, attempt = u.attempt,
    started_at = u.started_at, ended_at = u.ended_at, hold_id = u.hold_id,
    hold_amount = u.hold_amount, checkpoint_ref = u.checkpoint_ref,
    checkpoint_at = u.checkpoint_at, exit_code = u.exit_code, placement = u.placement::jsonb,
    cause = u.cause, stop_outcome = u.stop_outcome, grant_id = u.grant_id, epoch = $23,
    updated_at = coalesce(u.updated_at, now()), start_failures = u.start_failures,
    avoid_nodes = u.avoid_nodes::jsonb, attempt_reason = u.attempt_reason,
    rendezvous_port = u.rendezvous_port, preemptor_id = u.preemptor_id,
    replacements = u.replacements, stop_deadline = u.stop_deadline
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
    $7::timestamptz[], $8::text[], $9::numeric[], $10::text[], $11::timestamptz[], $12::int[],
    $13::text[], $14::text[], $15::text[], $16::text[], $17::timestamptz[], $18::int[],
    $19::text[], $20::text[], $21::int[], $22::text[], $24::int[], $25::timestamptz[]
) AS u(job_id, state, pending_reason, reason, attempt, started_at, ended_at, hold_id,
       hold_amount, checkpoint_ref, checkpoint_at, exit_code, placement, cause, stop_outcome,
       grant_id, updated_at, start_failures, avoid_nodes, attempt_reason, rendezvous_port,
       preemptor_id, replacements, stop_deadline)
WHERE j.job_id = u.job_id
"""

INSERT_DISPATCHES: Final = """
INSERT INTO scheduler.dispatches (job_id, attempt, task_index, kind, node_key, payload, epoch)
SELECT u.*, $7 FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], $6::bytea[])
    AS u(job_id, attempt, task_index, kind, node_key, payload)
ON CONFLICT DO NOTHING
RETURNING job_id, attempt, task_index, kind
"""

ACK_DISPATCHES: Final = """
UPDATE scheduler.dispatches AS d SET acked_at = now()
FROM unnest($1::text[], $2::int[], $3::int[], $4::text[]) AS u(job_id, attempt, task_index, kind)
WHERE d.job_id = u.job_id AND d.attempt = u.attempt AND d.task_index = u.task_index
    AND d.kind = u.kind AND d.acked_at IS NULL
"""

COUNT_EVENT_REJECTIONS: Final = """
UPDATE scheduler.outbox AS o SET rejections = o.rejections + 1
FROM unnest($2::text[]) AS u(event_id)
WHERE o.shard = $1 AND o.event_id = u.event_id AND o.acked_at IS NULL
RETURNING o.event_id, o.rejections
"""

# An event recorded again after it moved (a reloaded job repeating it) replaces the dead row,
# which keeps the rejections of both.
MOVE_DEAD_EVENTS: Final = """
WITH moved AS (
    DELETE FROM scheduler.outbox AS o
    USING unnest($2::text[], $3::text[]) AS u(event_id, reason)
    WHERE o.shard = $1 AND o.event_id = u.event_id AND o.acked_at IS NULL
    RETURNING o.event_id, o.subject, o.payload, o.rejections, o.created_at, u.reason
)
INSERT INTO scheduler.dead_events AS d
    (event_id, shard, subject, payload, reason, rejections, created_at)
SELECT event_id, $1, subject, payload, reason, rejections, created_at FROM moved
ON CONFLICT (event_id) DO UPDATE SET
    subject = EXCLUDED.subject, payload = EXCLUDED.payload, reason = EXCLUDED.reason,
    rejections = d.rejections + EXCLUDED.rejections, created_at = EXCLUDED.created_at,
    dead_at = now()
RETURNING d.event_id, d.subject, d.reason, d.rejections
"""

# The purge statements delete at most $3 rows each, so no statement holds its locks for long.
# The caller repeats them until one deletes fewer. Unacknowledged rows never match. The rows are
# picked by ctid, so the DELETE fetches each one directly instead of scanning the table to join
# them.
PURGE_EVENTS: Final = """
DELETE FROM scheduler.outbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM scheduler.outbox
    WHERE shard = $1 AND acked_at IS NOT NULL AND acked_at < now() - make_interval(secs => $2)
    LIMIT $3
))
"""

# Only commands of ended jobs are deleted, because the primary key of a command is its dedupe
# key. An open job that records a command again must find the first row, so it is not sent twice.
PURGE_DISPATCHES: Final = """
DELETE FROM scheduler.dispatches WHERE ctid = ANY(ARRAY(
    SELECT d.ctid FROM scheduler.dispatches d JOIN scheduler.jobs j USING (job_id)
    WHERE d.acked_at IS NOT NULL AND d.acked_at < now() - make_interval(secs => $2)
        AND j.shard = $1 AND j.state = ANY($4::text[])
    LIMIT $3
))
"""

COMMIT_TURN: Final = """
WITH leader AS (
    SELECT epoch FROM scheduler.leaders WHERE shard = $1 FOR SHARE
),
fence AS (
    SELECT (SELECT epoch FROM leader) AS current, coalesce((SELECT epoch FROM leader) = $2, false)
        AS ok
),
acked_dispatches AS (
    UPDATE scheduler.dispatches AS d SET acked_at = now()
    FROM unnest($3::text[], $4::int[], $5::int[], $6::text[])
        AS u(job_id, attempt, task_index, kind)
    WHERE (SELECT ok FROM fence) AND d.job_id = u.job_id AND d.attempt = u.attempt
        AND d.task_index = u.task_index AND d.kind = u.kind AND d.acked_at IS NULL
),
acked_events AS (
    UPDATE scheduler.outbox SET acked_at = now()
    WHERE (SELECT ok FROM fence) AND event_id = ANY($7::text[]) AND acked_at IS NULL
),
changed_jobs AS (
    UPDATE scheduler.jobs AS j SET
        state = u.state, pending_reason = u.pending_reason, reason = u.reason,
        attempt = u.attempt, started_at = u.started_at, ended_at = u.ended_at,
        hold_id = u.hold_id, hold_amount = u.hold_amount, checkpoint_ref = u.checkpoint_ref,
        checkpoint_at = u.checkpoint_at, exit_code = u.exit_code,
        placement = u.placement::jsonb, cause = u.cause, stop_outcome = u.stop_outcome,
        grant_id = u.grant_id, epoch = $2, updated_at = coalesce(u.updated_at, now()),
        start_failures = u.start_failures, avoid_nodes = u.avoid_nodes::jsonb,
        attempt_reason = u.attempt_reason, rendezvous_port = u.rendezvous_port,
        preemptor_id = u.preemptor_id, replacements = u.replacements,
        stop_deadline = u.stop_deadline
    FROM unnest(
        $8::text[], $9::text[], $10::text[], $11::text[], $12::int[], $13::timestamptz[],
        $14::timestamptz[], $15::text[], $16::numeric[], $17::text[], $18::timestamptz[],
        $19::int[], $20::text[], $21::text[], $22::text[], $23::text[], $24::timestamptz[],
        $25::int[], $26::text[], $27::text[], $28::int[], $29::text[], $53::int[],
        $54::timestamptz[]
    ) AS u(job_id, state, pending_reason, reason, attempt, started_at, ended_at, hold_id,
           hold_amount, checkpoint_ref, checkpoint_at, exit_code, placement, cause,
           stop_outcome, grant_id, updated_at, start_failures, avoid_nodes,
           attempt_reason, rendezvous_port, preemptor_id, replacements, stop_deadline)
    WHERE (SELECT ok FROM fence) AND j.job_id = u.job_id
),
new_dispatches AS (
    INSERT INTO scheduler.dispatches (job_id, attempt, task_index, kind, node_key, payload, epoch)
    SELECT u.*, $2 FROM unnest(
        $30::text[], $31::int[], $32::int[], $33::text[], $34::text[], $35::bytea[]
    ) AS u(job_id, attempt, task_index, kind, node_key, payload)
    WHERE (SELECT ok FROM fence)
    ON CONFLICT DO NOTHING
    RETURNING job_id, attempt, task_index, kind
),
new_events AS (
    INSERT INTO scheduler.outbox (event_id, shard, subject, payload)
    SELECT u.event_id, $1, u.subject, u.payload
    FROM unnest($36::text[], $37::text[], $38::bytea[]) AS u(event_id, subject, payload)
    WHERE (SELECT ok FROM fence)
    ON CONFLICT DO NOTHING
),
new_orphans AS (
    INSERT INTO scheduler.orphans
        (shard, node_key, task_id, accelerators, millis, rendezvous_port)
    SELECT $1, u.node_key, u.task_id,
        ARRAY(SELECT jsonb_array_elements_text(u.accelerators::jsonb)), u.millis,
        u.rendezvous_port
    FROM unnest($39::text[], $40::text[], $41::text[], $42::int[], $43::int[])
        AS u(node_key, task_id, accelerators, millis, rendezvous_port)
    WHERE (SELECT ok FROM fence)
    ON CONFLICT DO NOTHING
),
confirmed_orphans AS (
    DELETE FROM scheduler.orphans AS o
    USING unnest($44::text[], $45::text[]) AS u(node_key, task_id)
    WHERE (SELECT ok FROM fence) AND o.shard = $1 AND o.node_key = u.node_key
        AND o.task_id = u.task_id
),
changed_drains AS (
    UPDATE scheduler.nodes AS n SET
        draining = u.draining, drain_source = u.source, drain_reason = u.reason,
        drain_at = u.at, updated_at = now()
    FROM unnest(
        $46::text[], $47::text[], $48::text[], $49::boolean[], $50::text[], $51::text[],
        $52::timestamptz[]
    ) AS u(provider, region, node, draining, source, reason, at)
    WHERE (SELECT ok FROM fence) AND n.provider = u.provider AND n.region = u.region
        AND n.node = u.node
)
SELECT NULL::text, NULL::int, NULL::int, NULL::text, (SELECT current FROM fence)
WHERE NOT (SELECT ok FROM fence)
UNION ALL
SELECT job_id, attempt, task_index, kind, $2 FROM new_dispatches
"""
"""One turn's writes as one statement, so one round trip and one implicit transaction.

Every part runs only while the leaders row, locked FOR SHARE, still holds the epoch ``$2``.
The parts see one snapshot, so the caller never lists one orphan as both new and confirmed.
It lists no node twice among the drains either, because PostgreSQL applies only one of the
rows that an UPDATE joins to a target row, and not a predictable one.
Data-modifying CTEs all run to completion whether or not the final SELECT reads them. The
result is the commands not recorded before, or, when fenced, one row of NULLs with the
current epoch.
"""

LOAD_ORPHANS: Final = """
SELECT node_key, task_id, accelerators, millis, rendezvous_port
FROM scheduler.orphans WHERE shard = $1 ORDER BY created_at, node_key, task_id
"""
