"""Writing usage samples to PostgreSQL exactly once.

One batch is one transaction: the samples are copied into a session-local staging table with
COPY, moved into ``usage_samples`` with ``ON CONFLICT (provider, sample_id) DO NOTHING`` and
the rows that were new are added to ``usage_periods`` in the same statement. The primary key on
the provider and the sample id, not the message bus, is what recognises a replay, however late
it comes. The provider comes from the subject, which only that provider may publish on. A
sample that reports time already stored under another id is taken out of the staging table
before the merge and kept as a dead letter (see :mod:`services.metering.overlaps`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.metering.overlaps import (
    batch_token,
    drop_staged,
    find_stored_ids,
    find_stored_overlaps,
    iso_micros,
    lock_sample_times,
    raise_coverage,
    sample_rejection,
    split_overlapping,
)
from services.metering.samples import Rejection, UsageSample, micros_to_seconds
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

# The staging table holds the samples as the ingest has them: integers for times and amounts,
# which binary COPY encodes far faster than timestamps and numerics. Column order is
# UsageSample's field order, so a sample is its own COPY record.
_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS usage_staging (
    sample_id text, job_id text, attempt integer, task_id text, provider text, region text,
    node text, accelerator_id text, accelerator_model text, share_millis integer,
    start_us bigint, end_us bigint, accelerator_micros bigint, utilization real,
    stream_sequence bigint
) ON COMMIT DELETE ROWS
"""

LOCK_TIMEOUT_MS = 30_000
"""Milliseconds a batch waits for a lock, such as a sample time lock held by a concurrent
batch, before it fails and is delivered again."""

MAX_PROBE_DELAY_S = 600
"""Seconds after its receipt by which a batch must have read the coverage rows. A later batch
fails and is delivered again, with a new receipt time, because the coverage sweep deletes the
rows of samples older than the maximum age counted from the sweep's own time (see
:mod:`services.metering.coverage_sweep`)."""

# One simple-protocol round trip for both statements. SET LOCAL lasts until the commit.
_START_BATCH = f"{_CREATE_STAGING}; SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"

# Moves the staged rows, keeps only the new ones, and adds them to the period aggregates in
# key order so that concurrent replicas lock usage_periods rows in the same order. $1 is the
# period length in microseconds, $2 the receive time.
_MERGE = """
WITH inserted AS (
    INSERT INTO metering.usage_samples
        (sample_id, job_id, attempt, task_id, provider, region, node, accelerator_id,
         accelerator_model, share_millis, start_time, end_time, accelerator_micros,
         utilization, period_start, stream_sequence, received_at)
    SELECT sample_id, job_id, attempt, task_id, provider, region, node, accelerator_id,
           accelerator_model, share_millis,
           'epoch'::timestamptz + start_us * interval '1 microsecond',
           'epoch'::timestamptz + end_us * interval '1 microsecond',
           accelerator_micros, utilization,
           'epoch'::timestamptz + (start_us - start_us % $1) * interval '1 microsecond',
           stream_sequence, $2
    FROM usage_staging
    ON CONFLICT (provider, sample_id) DO NOTHING
    RETURNING job_id, attempt, period_start, provider, region, accelerator_model,
              accelerator_micros, utilization
), grouped AS (
    SELECT job_id, attempt, period_start, provider, region, accelerator_model,
           sum(accelerator_micros) AS accelerator_micros,
           count(*) AS sample_count,
           coalesce(sum(utilization * accelerator_micros * 1e-6::float8), 0)
               AS utilization_seconds,
           coalesce(sum(accelerator_micros * 1e-6::float8) FILTER (
               WHERE utilization IS NOT NULL), 0) AS utilization_weight
    FROM inserted
    GROUP BY job_id, attempt, period_start, provider, region, accelerator_model
), merged AS (
    INSERT INTO metering.usage_periods AS p
        (job_id, attempt, period_start, provider, region, accelerator_model,
         accelerator_micros, sample_count, utilization_seconds, utilization_weight)
    SELECT * FROM grouped
    ORDER BY job_id, attempt, period_start, provider, region, accelerator_model
    ON CONFLICT (job_id, attempt, period_start, provider, region, accelerator_model)
    DO UPDATE SET
        accelerator_micros = p.accelerator_micros + excluded.accelerator_micros,
        sample_count = p.sample_count + excluded.sample_count,
        utilization_seconds = p.utilization_seconds + excluded.utilization_seconds,
        utilization_weight = p.utilization_weight + excluded.utilization_weight
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM merged) AS periods
"""

# The staged samples whose id is stored with other charged content: another job, task,
# accelerator, node, share, interval or amount. The rows the merge just inserted equal their
# staged rows, so only earlier rows of the id can differ.
_FIND_REUSED_IDS = """
SELECT s.provider, s.sample_id, u.job_id, u.attempt, u.accelerator_id, u.node,
       (extract(epoch FROM u.start_time) * 1000000)::bigint AS start_us,
       (extract(epoch FROM u.end_time) * 1000000)::bigint AS end_us,
       u.accelerator_micros
FROM usage_staging s
JOIN metering.usage_samples u ON u.provider = s.provider AND u.sample_id = s.sample_id
WHERE (u.job_id, u.attempt, u.task_id, u.region, u.node, u.accelerator_id, u.accelerator_model,
       u.share_millis, u.start_time, u.end_time, u.accelerator_micros)
      IS DISTINCT FROM
      (s.job_id, s.attempt, s.task_id, s.region, s.node, s.accelerator_id, s.accelerator_model,
       s.share_millis, 'epoch'::timestamptz + s.start_us * interval '1 microsecond',
       'epoch'::timestamptz + s.end_us * interval '1 microsecond', s.accelerator_micros)
"""

# The stored samples with the ids of the given late samples, with the fields that
# _charged_usage compares.
_FIND_STORED_SAMPLES = """
SELECT u.provider, u.sample_id, u.job_id, u.attempt, u.task_id, u.region, u.node,
       u.accelerator_id, u.accelerator_model, u.share_millis,
       (extract(epoch FROM u.start_time) * 1000000)::bigint AS start_us,
       (extract(epoch FROM u.end_time) * 1000000)::bigint AS end_us,
       u.accelerator_micros
FROM unnest($1::text[], $2::text[]) AS d(provider, sample_id)
JOIN metering.usage_samples u ON u.provider = d.provider AND u.sample_id = d.sample_id
"""

INSERT_DEAD_LETTER = """
INSERT INTO metering.dead_letters
    (dedupe_key, subject, stream_sequence, sample_id, reason, payload)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedupe_key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Changes made by one committed batch."""

    inserted: int
    """Samples stored for the first time."""
    duplicates: int
    """Samples already stored, recognised by their sample id, including replays that came
    after the maximum sample age."""
    dead_lettered: int


async def write_batch(
    conn: asyncpg.Connection,
    samples: Sequence[UsageSample],
    rejections: Sequence[Rejection],
    *,
    period_seconds: int,
    received_at: datetime,
) -> BatchResult:
    """Store one batch of samples and rejections in one transaction.

    A sample whose interval overlaps a stored sample, or an earlier sample of the batch, of the
    same task, accelerator, node and provider becomes a dead letter instead. So does a sample
    whose share, beside the shares of the samples of other tasks that overlap it, adds up to
    more than the whole accelerator (see :mod:`services.metering.overlaps`).

    A rejection for age alone whose sample is stored with the same usage is a replay of a
    charged sample, so it counts as a duplicate instead of a dead letter.
    """
    unique = list({(sample.provider, sample.sample_id): sample for sample in samples}.values())
    reused_in_batch: list[Rejection] = []
    if len(unique) < len(samples):
        # Rare, so only then is each repeated id compared with its first sample.
        unique, reused_in_batch = _first_of_each_id(samples)
    dead_letters = [*rejections, *reused_in_batch]
    inserted = 0
    not_stored = len(reused_in_batch)  # samples that became dead letters: overlaps, reused ids
    if reused_in_batch:
        logger.warning(
            "%d samples reuse the id of an earlier sample of their batch for other usage, "
            "kept as dead letters, the first: %s",
            len(reused_in_batch),
            reused_in_batch[0].dedupe_key,
        )
    token = batch_token()
    if unique:
        await raise_coverage(conn, unique, token)
    late_replays = 0
    async with conn.transaction():
        if any(r.late_sample is not None for r in rejections):
            # Rare, so the stored ids are looked up only for a batch with a late sample.
            dead_letters, late_replays = await _drop_late_replays(conn, dead_letters)
        if unique:
            await conn.execute(_START_BATCH)
            await conn.copy_records_to_table("usage_staging", records=unique)
            # The locks come before the first read of usage_samples, so that read returns every
            # row that a concurrent batch of the same times committed. They come after the copy,
            # so that a stalled batch keeps them for as short a time as it can.
            await lock_sample_times(conn, unique)
            stored = await find_stored_overlaps(conn, token)
            _check_probe_delay(received_at)
            accepted, overlaps, compared_with_batch = split_overlapping(unique, stored)
            if compared_with_batch:
                # Some samples were rejected beside an earlier one of the batch, which may be a
                # replay that the merge does not store. Rare, so only then are the replays
                # looked up.
                replays = await find_stored_ids(conn, accepted)
                if replays:
                    accepted, overlaps, _ = split_overlapping(unique, stored, replays)
            if overlaps:
                accepted_keys = {(s.provider, s.sample_id) for s in accepted}
                await drop_staged(
                    conn, [s for s in unique if (s.provider, s.sample_id) not in accepted_keys]
                )
                dead_letters.extend(overlaps)
                not_stored += len(overlaps)
            if accepted:
                row = await conn.fetchrow(_MERGE, period_seconds * 1_000_000, received_at)
                assert row is not None
                inserted = int(row["inserted"])
            if inserted < len(accepted):
                # Some ids were stored already. A replay of the same sample is a duplicate, but
                # an id reused for other usage would hide that usage, so it is a dead letter.
                by_key = {(s.provider, s.sample_id): s for s in accepted}
                reused = [
                    _reused_id_rejection(by_key[(row["provider"], row["sample_id"])], row)
                    for row in await conn.fetch(_FIND_REUSED_IDS)
                ]
                if reused:
                    logger.warning(
                        "%d samples reuse a stored sample id for other usage, kept as dead "
                        "letters, the first: %s",
                        len(reused),
                        reused[0].dedupe_key,
                    )
                dead_letters.extend(reused)
                not_stored += len(reused)
        if dead_letters:
            await conn.executemany(INSERT_DEAD_LETTER, [_dead_letter(r) for r in dead_letters])
    duplicates = len(samples) - inserted - not_stored + late_replays
    return BatchResult(inserted, duplicates, len(dead_letters))


async def _drop_late_replays(
    conn: asyncpg.Connection, rejections: Sequence[Rejection]
) -> tuple[list[Rejection], int]:
    """Remove the late samples that are stored with the same usage from ``rejections``.

    Returns the remaining rejections and how many were removed. A late sample whose id is
    stored with other usage stays a dead letter, as it would within the maximum age.
    """
    late = [r.late_sample for r in rejections if r.late_sample is not None]
    rows = await conn.fetch(
        _FIND_STORED_SAMPLES, [s.provider for s in late], [s.sample_id for s in late]
    )
    stored = {
        (row["provider"], row["sample_id"]): (
            row["job_id"],
            row["attempt"],
            row["task_id"],
            row["region"],
            row["node"],
            row["accelerator_id"],
            row["accelerator_model"],
            row["share_millis"],
            row["start_us"],
            row["end_us"],
            row["accelerator_micros"],
        )
        for row in rows
    }
    remaining = [
        r
        for r in rejections
        if r.late_sample is None
        or stored.get((r.late_sample.provider, r.late_sample.sample_id))
        != _charged_usage(r.late_sample)
    ]
    return remaining, len(rejections) - len(remaining)


def _check_probe_delay(received_at: datetime) -> None:
    """Raise Unavailable when the batch read the coverage rows too long after its receipt."""
    delay = datetime.now(UTC) - received_at
    if delay > timedelta(seconds=MAX_PROBE_DELAY_S):
        raise Unavailable(
            f"the batch received at {received_at.isoformat()} read the coverage rows "
            f"{delay.total_seconds():.0f} s later, more than the {MAX_PROBE_DELAY_S} s "
            "within which the coverage sweep keeps them; it is delivered again"
        )


def _first_of_each_id(samples: Sequence[UsageSample]) -> tuple[list[UsageSample], list[Rejection]]:
    """Keep the first sample of each provider and sample id, as the primary key does across
    batches, and return dead letters for the later ones that carry other charged usage."""
    first: dict[tuple[str, str], UsageSample] = {}
    reused: list[Rejection] = []
    for sample in samples:
        first_sample = first.setdefault((sample.provider, sample.sample_id), sample)
        if first_sample is sample or _charged_usage(first_sample) == _charged_usage(sample):
            continue
        earlier = {
            "job_id": first_sample.job_id,
            "attempt": first_sample.attempt,
            "accelerator_id": first_sample.accelerator_id,
            "node": first_sample.node,
            "start_us": first_sample.start_us,
            "end_us": first_sample.end_us,
            "accelerator_micros": first_sample.accelerator_micros,
        }
        reused.append(_reused_id_rejection(sample, earlier, "used earlier in its batch"))
    return list(first.values()), reused


def _charged_usage(sample: UsageSample) -> tuple[object, ...]:
    """Return the fields that _FIND_REUSED_IDS compares with the stored row."""
    return (
        sample.job_id,
        sample.attempt,
        sample.task_id,
        sample.region,
        sample.node,
        sample.accelerator_id,
        sample.accelerator_model,
        sample.share_millis,
        sample.start_us,
        sample.end_us,
        sample.accelerator_micros,
    )


def _reused_id_rejection(
    sample: UsageSample, stored: Mapping[str, Any], where: str = "already stored"
) -> Rejection:
    """Return the dead letter of a sample whose id is stored, or used earlier in its batch,
    with other usage."""
    reason = (
        f"sample id {sample.sample_id} of provider {sample.provider} is {where} for job "
        f"{stored['job_id']} attempt {stored['attempt']} on accelerator "
        f"{stored['accelerator_id']} of node {stored['node']} from "
        f"{iso_micros(stored['start_us'])} to {iso_micros(stored['end_us'])} "
        f"({micros_to_seconds(stored['accelerator_micros'])} accelerator-seconds); this sample "
        f"(job {sample.job_id} attempt {sample.attempt} on accelerator {sample.accelerator_id} "
        f"of node {sample.node} from {sample.start_time.isoformat()} to "
        f"{sample.end_time.isoformat()}, {micros_to_seconds(sample.accelerator_micros)} "
        "accelerator-seconds) is not charged; the agent must give each sample its own id"
    )
    key = f"reused-id:{sample.provider}/{sample.sample_id}/{sample.stream_sequence}"
    return sample_rejection(sample, key, reason)


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
