"""Finding usage samples that meter an accelerator-second a second time.

The primary key recognises a replay of one sample id. An agent that lost its state, or a
misbehaving provider, can also report time that is already stored under another id. Such a
sample overlaps a stored sample of the same task (and so job attempt), accelerator, node and
provider, and ingest keeps it as a dead letter instead of charging it. Tasks, of one job or of
several, may share an accelerator in fractions, so the shares of the samples of one accelerator
add up to at most 1000 thousandths, the whole accelerator, at every moment. A sample whose share
would push that sum above 1000 anywhere in its interval is a dead letter that names the samples
it overlaps there. Shares that fit, such as 500 + 500 or 250 four times, are all charged.

Samples are checked in arrival order: one that overlaps a stored sample of its task, or whose
share does not fit beside the stored samples and the earlier accepted samples of its batch, is
rejected. The first sample to arrive is kept, and a stored sample is never rejected later. The
samples of one task and accelerator stored since this check exists are therefore disjoint. So
the stored sample that starts last before a new one ends is the only one of its task that can
overlap it. Of another task, only the last sample that starts before it and those that start
while it runs can overlap it.

``sample_coverage`` keeps, per task and accelerator, an end no earlier than that of any stored
sample, and per accelerator (the row with the empty task id) such an end for all its samples.
Agents report an accelerator's time in order, and cut the samples of the tasks that share an
accelerator at the same times, so nearly every new sample starts at or after its accelerator's
end and needs no probe of ``usage_samples``. A batch raises the rows in its own short
transaction before it stores anything, so the ends are never too early, and a stalled batch
does not hold the rows for other batches. The batch that raised a row last compares its samples
with the ends before its raise. A batch that fails leaves the ends too late, which only costs
probes.

A probe reads, through an index, the rows of the other tasks on the accelerator that end in
the hour the sample starts or later, and not one row per task that ever ran there. It skips
only rows that end at or before the sample's start. Ingest rejects a sample that starts more
than ``ACSP_METERING_MAX_SAMPLE_AGE_S`` before its receipt, and the coverage sweep
(:mod:`services.metering.coverage_sweep`) deletes only rows that end before that, with a margin.
So a sample that ingest accepts is compared with every stored sample it overlaps.

Concurrent batches that store samples of overlapping times on one node take turns on advisory
locks (see :func:`lock_sample_times`), so of the samples that run at any one moment on an
accelerator, the batch that commits last has read all the others, and the sum it checked is
the stored sum.
"""

from __future__ import annotations

import bisect
import secrets
import zlib
from collections.abc import Collection, Mapping, Sequence
from typing import Final, NamedTuple

import asyncpg

from acsp import subjects
from services.metering.samples import Rejection, UsageSample, micros_to_seconds
from services.metering.shares import (
    StoredSample,
    exceeds_accelerator,
    iso_micros,
    over_share_reason,
    share_peak,
)

NODE_LOCK_CLASS: Final = 0x75736167
"""First key of the transaction advisory locks that ingest takes per provider and node."""
TIME_LOCK_CLASS: Final = 0x75736168
"""First key of the locks per provider, node and minute (see :func:`lock_sample_times`)."""
LOCK_MINUTE_US: Final = 60 * 1_000_000
MAX_MINUTE_LOCKS: Final = 8
"""Minutes a sample may span and still lock each minute; a longer sample locks its node."""
END_HOUR_US: Final = 3600 * 1_000_000
"""Microseconds per value of ``sample_coverage.end_hour``, which migration 016 generates as
``end_us / 3600000000``."""

# For every staged sample not stored yet that starts before its accelerator's coverage ends, the
# stored samples that it overlaps. Kind 0 is the stored sample of its own task, accelerator,
# node and provider that starts last before the staged one ends, if it ends after the staged one
# starts. Kind 1 rows are the stored samples of other tasks on the accelerator that overlap it,
# of the tasks whose coverage ends after it starts. Of each such task, only the sample that
# starts last before the staged sample starts, and those that start while it runs, can overlap
# it. The batch looks up the coverage row of each of its accelerators once, by its primary key.
# A sample that starts at or after its accelerator's coverage end then costs one hash probe of
# those rows, and no lookup of its id in usage_samples. Its own task is probed only if it starts
# before the task's coverage ends. The LIMIT keeps the lookup a subquery of its own, so the
# planner cannot turn it into a hash join that reads the whole coverage table for every batch.
# MATERIALIZED keeps the planner from repeating the lookup once per sample.
# The other tasks' rows come from the index on (provider, node, accelerator_id, end_hour), whose
# predicate task_id <> '' the scan repeats, read from the hour the sample starts. So a probe
# reads the rows of the tasks whose coverage ends in that hour or later, not one row per task
# that ever ran on the accelerator. The rows it skips end before that hour, and those it reads
# but drops end at or before the sample's start, so no sample of their tasks can overlap it.
# The index on (job_id, attempt, task_id, accelerator_id, node, provider, start_time) serves
# every probe of usage_samples, with the job id and attempt of another task taken from its task
# id, <job_id>/<attempt>/<task_index>. Times are compared as timestamps built the way the merge
# stores them.
_FIND_STORED_OVERLAPS = f"""
WITH covered AS MATERIALIZED (
    SELECT d.provider, d.node, d.accelerator_id,
           CASE WHEN a.raised_by = $1 THEN a.prior_end ELSE a.end_us END AS end_us
    FROM (SELECT DISTINCT provider, node, accelerator_id FROM usage_staging) d
    CROSS JOIN LATERAL (
        SELECT a.raised_by, a.prior_end, a.end_us
        FROM metering.sample_coverage a
        WHERE a.provider = d.provider AND a.node = d.node
          AND a.accelerator_id = d.accelerator_id AND a.task_id = ''
        LIMIT 1
    ) a
)
SELECT s.provider, s.sample_id, u.kind, u.sample_id AS stored_id, u.job_id, u.attempt,
       u.task_id, u.share_millis,
       (extract(epoch FROM u.start_time) * 1000000)::bigint AS stored_start_us,
       (extract(epoch FROM u.end_time) * 1000000)::bigint AS stored_end_us
FROM usage_staging s
JOIN covered a
  ON a.provider = s.provider AND a.node = s.node AND a.accelerator_id = s.accelerator_id
 AND a.end_us > s.start_us
CROSS JOIN LATERAL (
    SELECT 'epoch'::timestamptz + s.start_us * interval '1 microsecond' AS start_time,
           'epoch'::timestamptz + s.end_us * interval '1 microsecond' AS end_time
) t
CROSS JOIN LATERAL (
    SELECT 0 AS kind, p.sample_id, p.job_id, p.attempt, p.task_id, p.share_millis,
           p.start_time, p.end_time
    FROM metering.sample_coverage c
    CROSS JOIN LATERAL (
        SELECT p.*
        FROM metering.usage_samples p
        WHERE p.job_id = s.job_id AND p.attempt = s.attempt AND p.task_id = s.task_id
          AND p.accelerator_id = s.accelerator_id AND p.node = s.node
          AND p.provider = s.provider AND p.start_time < t.end_time
        ORDER BY p.start_time DESC
        LIMIT 1
    ) p
    WHERE c.provider = s.provider AND c.node = s.node AND c.accelerator_id = s.accelerator_id
      AND c.task_id = s.task_id
      AND CASE WHEN c.raised_by = $1 THEN c.prior_end ELSE c.end_us END > s.start_us
      AND p.end_time > t.start_time
    UNION ALL
    SELECT 1, p.sample_id, p.job_id, p.attempt, p.task_id, p.share_millis, p.start_time,
           p.end_time
    FROM metering.sample_coverage c
    CROSS JOIN LATERAL regexp_match(c.task_id, '^(.*)/([0-9]+)/[0-9]+$') AS m(parts)
    CROSS JOIN LATERAL (
        (SELECT p.*
         FROM metering.usage_samples p
         WHERE p.job_id = m.parts[1] AND p.attempt = m.parts[2]::integer
           AND p.task_id = c.task_id AND p.accelerator_id = c.accelerator_id
           AND p.node = c.node AND p.provider = c.provider AND p.start_time < t.start_time
         ORDER BY p.start_time DESC
         LIMIT 1)
        UNION ALL
        (SELECT p.*
         FROM metering.usage_samples p
         WHERE p.job_id = m.parts[1] AND p.attempt = m.parts[2]::integer
           AND p.task_id = c.task_id AND p.accelerator_id = c.accelerator_id
           AND p.node = c.node AND p.provider = c.provider
           AND p.start_time >= t.start_time AND p.start_time < t.end_time)
    ) p
    WHERE c.provider = s.provider AND c.node = s.node AND c.accelerator_id = s.accelerator_id
      AND c.end_hour >= s.start_us / {END_HOUR_US} AND c.end_us > s.start_us
      AND c.task_id <> '' AND c.task_id <> s.task_id AND p.end_time > t.start_time
) u
WHERE NOT EXISTS (
    SELECT 1 FROM metering.usage_samples r
    WHERE r.provider = s.provider AND r.sample_id = s.sample_id)
"""

_DROP_STAGED = """
DELETE FROM usage_staging s
USING unnest($1::text[], $2::text[]) AS d(provider, sample_id)
WHERE s.provider = d.provider AND s.sample_id = d.sample_id
"""


AcceleratorKey = tuple[str, str, str, str]
"""Provider, node, accelerator id and task id: the time of one key is metered once."""

Accelerator = tuple[str, str, str]
"""Provider, node and accelerator id."""


def accelerator_key(sample: UsageSample) -> AcceleratorKey:
    return (sample.provider, sample.node, sample.accelerator_id, sample.task_id)


def _lock_key(text: str) -> int:
    """Return a signed 32-bit lock key for ``text``, the same in every process (unlike hash)."""
    unsigned = zlib.crc32(text.encode())
    return unsigned - (1 << 32) if unsigned >= 1 << 31 else unsigned


def sample_time_locks(samples: Sequence[UsageSample]) -> list[tuple[int, int, bool]]:
    """Return the advisory locks a batch takes as (class, key, exclusive), in the order to take.

    Each sample locks every minute it covers on its node exclusively, and its node shared. A
    sample longer than MAX_MINUTE_LOCKS minutes locks its node exclusively instead. Two samples
    that overlap share a minute, or one of them locks the node exclusively, so their batches
    take turns, while batches with other minutes of a node run side by side. Keys that collide
    only make batches wait. Every batch takes node locks before minute locks and each kind in
    key order, so the advisory locks of two batches never form a wait cycle.
    """
    exclusive_nodes: set[int] = set()
    shared_nodes: set[int] = set()
    minutes: set[int] = set()
    for sample in samples:
        node = f"{sample.provider}/{sample.node}"
        first = sample.start_us // LOCK_MINUTE_US
        last = (sample.end_us - 1) // LOCK_MINUTE_US
        if last - first >= MAX_MINUTE_LOCKS:
            exclusive_nodes.add(_lock_key(node))
            continue
        shared_nodes.add(_lock_key(node))
        minutes.update(_lock_key(f"{node}/{minute}") for minute in range(first, last + 1))
    node_locks = {key: False for key in shared_nodes} | {key: True for key in exclusive_nodes}
    return [(NODE_LOCK_CLASS, key, node_locks[key]) for key in sorted(node_locks)] + [
        (TIME_LOCK_CLASS, key, True) for key in sorted(minutes)
    ]


async def lock_sample_times(conn: asyncpg.Connection, samples: Sequence[UsageSample]) -> None:
    """Lock the samples' times on their nodes until the transaction ends.

    Two workers that store overlapping samples in concurrent transactions would each miss the
    other's rows, so the second waits for the first's commit and then reads its rows.
    """
    locks = sample_time_locks(samples)
    await conn.execute(
        """
        SELECT CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.class, l.key)
                    ELSE pg_advisory_xact_lock_shared(l.class, l.key) END
        FROM unnest($1::int[], $2::int[], $3::bool[]) AS l(class, key, exclusive)
        """,
        [lock[0] for lock in locks],
        [lock[1] for lock in locks],
        [lock[2] for lock in locks],
    )


# The rows of each accelerator (task id '') come before those of its tasks, so every batch locks
# the rows in one key order.
_RAISE_COVERAGE = """
INSERT INTO metering.sample_coverage AS c
    (provider, node, accelerator_id, task_id, end_us, prior_end, raised_by)
SELECT provider, node, accelerator_id, task_id, max(end_us), 0, $6
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
    AS n(provider, node, accelerator_id, task_id, end_us)
GROUP BY provider, node, accelerator_id, task_id
ORDER BY provider, node, accelerator_id, task_id
ON CONFLICT (provider, node, accelerator_id, task_id)
DO UPDATE SET end_us = greatest(c.end_us, excluded.end_us), prior_end = c.end_us,
              raised_by = excluded.raised_by
"""


def batch_token() -> int:
    """Return a random id for one batch's coverage raise."""
    return secrets.randbits(63)


async def raise_coverage(
    conn: asyncpg.Connection, samples: Sequence[UsageSample], token: int
) -> None:
    """Raise the coverage of the samples' tasks and accelerators to their latest ends, committed
    at once.

    ``token`` is the batch's id, which :func:`find_stored_overlaps` takes too.
    """
    # Per coverage key, the latest end. An accelerator's key has the empty task id.
    ends: dict[AcceleratorKey, int] = {}
    for sample in samples:
        for key in (
            accelerator_key(sample),
            (sample.provider, sample.node, sample.accelerator_id, ""),
        ):
            if sample.end_us > ends.get(key, 0):
                ends[key] = sample.end_us
    await conn.execute(
        _RAISE_COVERAGE,
        [key[0] for key in ends],
        [key[1] for key in ends],
        [key[2] for key in ends],
        [key[3] for key in ends],
        list(ends.values()),
        token,
    )


StoredOverlaps = Mapping[tuple[str, str], Sequence[StoredSample]]
"""By provider and sample id, the stored samples that a staged sample overlaps. One of its own
task has an empty task id, and at most one such sample is given."""


async def find_stored_overlaps(conn: asyncpg.Connection, token: int) -> StoredOverlaps:
    """Return, by provider and sample id, the stored samples that each staged sample overlaps.

    ``token`` is the id of the batch's coverage raise.
    """
    rows = await conn.fetch(_FIND_STORED_OVERLAPS, token)
    found: dict[tuple[str, str], list[StoredSample]] = {}
    for r in rows:
        found.setdefault((r["provider"], r["sample_id"]), []).append(
            StoredSample(
                r["stored_id"],
                r["stored_start_us"],
                r["stored_end_us"],
                r["task_id"] if r["kind"] == 1 else "",
                r["job_id"],
                r["attempt"],
                r["share_millis"],
            )
        )
    return found


async def drop_staged(conn: asyncpg.Connection, samples: Sequence[UsageSample]) -> None:
    """Remove samples from the staging table, so that the merge does not store them."""
    await conn.execute(_DROP_STAGED, [s.provider for s in samples], [s.sample_id for s in samples])


async def find_stored_ids(
    conn: asyncpg.Connection, samples: Sequence[UsageSample]
) -> set[tuple[str, str]]:
    """Return the provider and sample id of each of ``samples`` that is already stored."""
    rows = await conn.fetch(
        """
        SELECT u.provider, u.sample_id
        FROM unnest($1::text[], $2::text[]) AS d(provider, sample_id)
        JOIN metering.usage_samples u ON u.provider = d.provider AND u.sample_id = d.sample_id
        """,
        [s.provider for s in samples],
        [s.sample_id for s in samples],
    )
    return {(r["provider"], r["sample_id"]) for r in rows}


_Accepted = tuple[list[int], list[UsageSample]]
"""The starts of a task's accepted samples and the samples, sorted by start."""

_IN_BATCH: Final = "received earlier in its batch"


class Split(NamedTuple):
    """Samples split into those to store and rejections for the rest."""

    accepted: list[UsageSample]
    rejected: list[Rejection]
    compared_with_batch: bool
    """Whether a rejection names an earlier sample of the batch, which may be a replay that the
    merge does not store."""


def split_overlapping(
    samples: Sequence[UsageSample],
    stored: StoredOverlaps,
    replays: Collection[tuple[str, str]] = (),
) -> Split:
    """Split samples, in arrival order, into those to store and rejections for the rest.

    A sample is rejected when it overlaps a stored sample of its own task given for it in
    ``stored``, or an accepted sample of its own task that arrived earlier in this batch. It is
    also rejected when its share does not fit beside the samples of other tasks at some moment
    of its interval. Those are the stored samples given for it and the accepted samples that
    arrived earlier in this batch, and an earlier one whose id is among the stored samples
    counts once. ``replays`` are the provider and sample ids already stored. They are accepted,
    and the merge stores nothing for them, so no later sample is compared with them. A replay
    equal to its stored row is found among the stored samples anyway, and a replay with other
    times or another key than its stored row has nothing stored to overlap.
    """
    accepted: list[UsageSample] = []
    rejected: list[Rejection] = []
    compared_with_batch = False
    # Per accelerator and task, the starts of the accepted samples of this batch and the samples,
    # sorted by start. The samples of one task are disjoint, so the one that starts last before
    # a sample ends is the only one of its task to compare with the sample.
    tasks_by_accelerator: dict[Accelerator, dict[str, _Accepted]] = {}
    for sample in sorted(samples, key=lambda s: s.stream_sequence):
        found = stored.get((sample.provider, sample.sample_id), ())
        own_stored = next((other for other in found if not other.task_id), None) if found else None
        if own_stored is not None:
            rejected.append(overlap_rejection(sample, own_stored, "stored"))
            continue
        tasks = tasks_by_accelerator.setdefault(
            (sample.provider, sample.node, sample.accelerator_id), {}
        )
        own = tasks.get(sample.task_id)
        if own is None:
            own = tasks[sample.task_id] = ([], [])
        key_starts, key_accepted = own
        index = bisect.bisect_left(key_starts, sample.end_us)
        if index and key_accepted[index - 1].end_us > sample.start_us:
            earlier = key_accepted[index - 1]
            other = StoredSample(earlier.sample_id, earlier.start_us, earlier.end_us)
            rejected.append(overlap_rejection(sample, other, _IN_BATCH))
            compared_with_batch = True
            continue
        if found or len(tasks) > 1:
            peak = share_peak(sample.start_us, sample.end_us, _other_tasks(sample, found, tasks))
            if exceeds_accelerator(sample, peak):
                reason = over_share_reason(sample, peak)
                rejected.append(sample_rejection(sample, _overlap_key(sample), reason))
                compared_with_batch |= any(other.where == _IN_BATCH for other in peak.samples)
                continue
        accepted.append(sample)
        if (sample.provider, sample.sample_id) in replays:
            continue
        key_starts.insert(index, sample.start_us)
        key_accepted.insert(index, sample)
    return Split(accepted, rejected, compared_with_batch)


def _other_tasks(
    sample: UsageSample, found: Sequence[StoredSample], tasks: Mapping[str, _Accepted]
) -> list[StoredSample]:
    """Return the samples of other tasks that overlap ``sample``: the stored ones in ``found``
    and the accepted ones of its batch whose ids are not among them."""
    others = [other for other in found if other.task_id]
    if len(tasks) > 1:
        stored_ids = {other.sample_id for other in found}
        others.extend(
            _as_other_task(other)
            for other in _other_task_overlaps(sample, tasks)
            if other.sample_id not in stored_ids
        )
    return others


def _other_task_overlaps(sample: UsageSample, tasks: Mapping[str, _Accepted]) -> list[UsageSample]:
    """Return the accepted samples of other tasks on the sample's accelerator that overlap it."""
    overlapping: list[UsageSample] = []
    for task_id, (starts, task_samples) in tasks.items():
        if task_id == sample.task_id:
            continue
        # The task's samples are disjoint, so their ends are sorted like their starts: walking
        # back from the last one that starts before the sample ends meets every one that
        # overlaps it.
        index = bisect.bisect_left(starts, sample.end_us)
        while index:
            index -= 1
            other = task_samples[index]
            if other.end_us <= sample.start_us:
                break
            overlapping.append(other)
    return overlapping


def _as_other_task(sample: UsageSample) -> StoredSample:
    return StoredSample(
        sample.sample_id,
        sample.start_us,
        sample.end_us,
        sample.task_id,
        sample.job_id,
        sample.attempt,
        sample.share_millis,
        _IN_BATCH,
    )


def _overlap_key(sample: UsageSample) -> str:
    return f"overlap:{sample.provider}/{sample.sample_id}"


def overlap_rejection(sample: UsageSample, other: StoredSample, where: str) -> Rejection:
    """Return the dead letter of a sample that overlaps ``other``, naming both intervals."""
    other_start = iso_micros(other.start_us)
    other_end = iso_micros(other.end_us)
    reason = (
        f"sample {sample.sample_id} of job {sample.job_id} attempt {sample.attempt} on "
        f"accelerator {sample.accelerator_id} of node {sample.node} covers "
        f"{sample.start_time.isoformat()} to {sample.end_time.isoformat()} "
        f"({micros_to_seconds(sample.accelerator_micros)} accelerator-seconds), which overlaps "
        f"sample {other.sample_id} ({other_start} to {other_end}), {where}; "
        "the sample is not charged"
    )
    return sample_rejection(sample, _overlap_key(sample), reason)


def sample_rejection(sample: UsageSample, dedupe_key: str, reason: str) -> Rejection:
    """Return the dead letter of one valid sample that is not charged, for ``reason``."""
    return Rejection(
        dedupe_key,
        subjects.usage_subject(sample.provider, sample.region, sample.node),
        sample.stream_sequence,
        sample.sample_id,
        reason,
        None,
    )
