"""Writing usage samples to PostgreSQL exactly once.

One batch is one transaction: the samples are copied into a session-local staging table with
COPY, moved into ``usage_samples`` with ``ON CONFLICT (sample_id) DO NOTHING`` and the rows
that were new are added to ``usage_periods`` in the same statement. The primary key on the
sample id, not the message bus, is what recognises a replay, however late it comes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.metering.samples import Rejection, UsageSample, period_start

_STAGING_COLUMNS = (
    "sample_id",
    "job_id",
    "attempt",
    "task_id",
    "provider",
    "region",
    "node",
    "accelerator_id",
    "accelerator_model",
    "share",
    "start_time",
    "end_time",
    "accelerator_seconds",
    "utilization",
    "period_start",
    "stream_sequence",
    "received_at",
)

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS usage_staging
    (LIKE metering.usage_samples INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""

# Moves the staged rows, keeps only the new ones, and adds them to the period aggregates in
# key order so that concurrent replicas lock usage_periods rows in the same order.
_MERGE = """
WITH inserted AS (
    INSERT INTO metering.usage_samples
    SELECT * FROM usage_staging
    ON CONFLICT (sample_id) DO NOTHING
    RETURNING job_id, attempt, period_start, provider, region, accelerator_model,
              accelerator_seconds, utilization
), grouped AS (
    SELECT job_id, attempt, period_start, provider, region, accelerator_model,
           sum(accelerator_seconds) AS accelerator_seconds,
           count(*) AS sample_count,
           coalesce(sum(utilization * accelerator_seconds::float8), 0) AS utilization_seconds,
           coalesce(sum(accelerator_seconds::float8) FILTER (WHERE utilization IS NOT NULL), 0)
               AS utilization_weight
    FROM inserted
    GROUP BY job_id, attempt, period_start, provider, region, accelerator_model
), merged AS (
    INSERT INTO metering.usage_periods AS p
        (job_id, attempt, period_start, provider, region, accelerator_model,
         accelerator_seconds, sample_count, utilization_seconds, utilization_weight)
    SELECT * FROM grouped
    ORDER BY job_id, attempt, period_start, provider, region, accelerator_model
    ON CONFLICT (job_id, attempt, period_start, provider, region, accelerator_model)
    DO UPDATE SET
        accelerator_seconds = p.accelerator_seconds + excluded.accelerator_seconds,
        sample_count = p.sample_count + excluded.sample_count,
        utilization_seconds = p.utilization_seconds + excluded.utilization_seconds,
        utilization_weight = p.utilization_weight + excluded.utilization_weight
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM merged) AS periods
"""

_INSERT_DEAD_LETTER = """
INSERT INTO metering.dead_letters
    (dedupe_key, subject, stream_sequence, sample_id, reason, payload)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedupe_key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch changed."""

    inserted: int
    """Samples stored for the first time."""
    duplicates: int
    """Samples already stored, recognised by their sample id."""
    dead_lettered: int


async def write_batch(
    conn: asyncpg.Connection,
    samples: Sequence[UsageSample],
    rejections: Sequence[Rejection],
    *,
    period_seconds: int,
    received_at: datetime,
) -> BatchResult:
    """Store one batch of samples and rejections in one transaction."""
    unique = {sample.sample_id: sample for sample in samples}
    records = [_record(s, period_seconds, received_at) for s in unique.values()]
    inserted = 0
    async with conn.transaction():
        if records:
            await conn.execute(_CREATE_STAGING)
            await conn.copy_records_to_table(
                "usage_staging", records=records, columns=_STAGING_COLUMNS
            )
            row = await conn.fetchrow(_MERGE)
            assert row is not None
            inserted = int(row["inserted"])
        if rejections:
            await conn.executemany(_INSERT_DEAD_LETTER, [_dead_letter(r) for r in rejections])
    return BatchResult(inserted, len(samples) - inserted, len(rejections))


def _record(sample: UsageSample, period_seconds: int, received_at: datetime) -> tuple[object, ...]:
    return (
        sample.sample_id,
        sample.job_id,
        sample.attempt,
        sample.task_id,
        sample.provider,
        sample.region,
        sample.node,
        sample.accelerator_id,
        sample.accelerator_model,
        sample.share,
        sample.start_time,
        sample.end_time,
        sample.accelerator_seconds,
        sample.utilization,
        period_start(sample.start_time, period_seconds),
        sample.stream_sequence,
        received_at,
    )


def _dead_letter(rejection: Rejection) -> tuple[object, ...]:
    return (
        rejection.dedupe_key,
        rejection.subject,
        rejection.stream_sequence,
        rejection.sample_id,
        rejection.reason,
        rejection.payload,
    )


async def load_node_owners(conn: asyncpg.Connection) -> dict[str, str]:
    """Return every registered node's provider."""
    rows = await conn.fetch("SELECT node, provider FROM metering.nodes")
    return {row["node"]: row["provider"] for row in rows}


async def register_nodes(
    conn: asyncpg.Connection, nodes: Iterable[tuple[str, str, str]], cause: str
) -> dict[str, str]:
    """Register (node, provider, region) triples not yet known; first registration wins.

    Returns the provider every given node is registered to afterwards, which differs from the
    given one when another provider registered the node first.
    """
    triples = list(nodes)
    await conn.executemany(
        "INSERT INTO metering.nodes (node, provider, region, cause) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (node) DO NOTHING",
        [(node, provider, region, cause) for node, provider, region in triples],
    )
    rows = await conn.fetch(
        "SELECT node, provider FROM metering.nodes WHERE node = any($1::text[])",
        [node for node, _, _ in triples],
    )
    return {row["node"]: row["provider"] for row in rows}
