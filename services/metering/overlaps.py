"""Finding usage samples that meter an accelerator-second a second time.

The primary key recognises a replay of one sample id. An agent that lost its state, or a
misbehaving provider, can also report time that is already stored under another id. Such a
sample overlaps a stored sample of the same task (and so job attempt), accelerator, node and
provider, and ingest keeps it as a dead letter instead of charging it. Two tasks, of one job or
of two, may overlap on one accelerator only while each uses a fraction of it. So a sample that
overlaps a sample of another task on its accelerator is a dead letter too when either of the
two has a share of 1000 thousandths, the whole accelerator.

Samples are checked in arrival order: one that overlaps a stored sample, or an earlier sample of
its own batch that was accepted, is rejected. The samples of one task and accelerator stored
since this check exists are therefore disjoint, so the stored sample that starts last before a
new one ends is the only one of its task that can overlap it.

``sample_coverage`` keeps, per task and accelerator, an end no earlier than that of any stored
sample, and per accelerator (the row with the empty task id) such an end for all its samples
and another for its whole-accelerator samples. Agents report an accelerator's time in order, so
nearly every new sample needs no probe of ``usage_samples``: a whole-accelerator sample starts
after its accelerator's end, and a fractional one after its task's end and after the end of the
accelerator's whole-accelerator samples. A batch raises the rows in its own short transaction
before it stores anything, so the ends are never too early, and a stalled batch does not hold
the rows for other batches. The batch that raised a row last compares its samples with the
ends before its raise. A batch that fails leaves the ends too late, which only costs probes.

NOTE: fractional samples are not added up. Three tasks that each report 0.4 of one accelerator
for the same time are all charged, because only a whole-accelerator sample excludes others.
"""

from __future__ import annotations

import bisect
import secrets
import zlib
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, NamedTuple

import asyncpg

from acsp import subjects
from services.metering.samples import Rejection, UsageSample, micros_to_seconds

NODE_LOCK_CLASS: Final = 0x75736167
"""First key of the transaction advisory locks that ingest takes per provider and node."""
TIME_LOCK_CLASS: Final = 0x75736168
"""First key of the locks per provider, node and minute (see :func:`lock_sample_times`)."""
LOCK_MINUTE_US: Final = 60 * 1_000_000
MAX_MINUTE_LOCKS: Final = 8
"""Minutes a sample may span and still lock each minute; a longer sample locks its node."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

FULL_SHARE_MILLIS: Final = 1000
"""The share of a sample that uses the whole accelerator, in thousandths."""

# For every staged sample not stored yet, one stored sample that it overlaps, if any. Kind 0 is
# the stored sample of its own task, accelerator, node and provider that starts last before the
# staged one ends, if it ends after the staged one starts. Kind 1 is a stored sample of another
# task on the accelerator that overlaps it where either of the two has the whole accelerator.
# Kind 0 wins when both exist. Only a sample that starts before its accelerator's coverage ends
# is probed, which costs one lookup of the accelerator's coverage row per staged sample. Its own
# task is probed only if it starts before the task's coverage ends. The other tasks are those
# whose coverage ends after it starts, and are probed only if it has the whole accelerator or
# starts before the accelerator's whole-accelerator coverage ends. Of each other task, only the
# sample that starts last before the staged sample starts, and those that start while it runs,
# can overlap it. The index on (job_id, attempt, task_id, accelerator_id, node, provider,
# start_time) serves every probe, with the job id and attempt of another task taken from its
# task id, <job_id>/<attempt>/<task_index>. Times are compared as timestamps built the way the
# merge stores them.
_FIND_STORED_OVERLAPS = """
SELECT s.provider, s.sample_id, u.kind, u.sample_id AS stored_id, u.job_id, u.attempt,
       u.task_id, u.share_millis,
       (extract(epoch FROM u.start_time) * 1000000)::bigint AS stored_start_us,
       (extract(epoch FROM u.end_time) * 1000000)::bigint AS stored_end_us
FROM usage_staging s
JOIN metering.sample_coverage a
  ON a.provider = s.provider AND a.node = s.node AND a.accelerator_id = s.accelerator_id
 AND a.task_id = ''
 AND CASE WHEN a.raised_by = $1 THEN a.prior_end ELSE a.end_us END > s.start_us
CROSS JOIN LATERAL (
    SELECT 'epoch'::timestamptz + s.start_us * interval '1 microsecond' AS start_time,
           'epoch'::timestamptz + s.end_us * interval '1 microsecond' AS end_time,
           s.share_millis = 1000
               OR CASE WHEN a.raised_by = $1 THEN a.prior_exclusive_end
                       ELSE a.exclusive_end END > s.start_us AS probe_others
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
           AND p.start_time >= t.start_time AND p.start_time < t.end_time
           AND (s.share_millis = 1000 OR p.share_millis = 1000)
         ORDER BY p.start_time
         LIMIT 1)
    ) p
    WHERE t.probe_others
      AND c.provider = s.provider AND c.node = s.node AND c.accelerator_id = s.accelerator_id
      AND c.task_id <> '' AND c.task_id <> s.task_id AND c.end_us > s.start_us
      AND p.end_time > t.start_time AND (s.share_millis = 1000 OR p.share_millis = 1000)
    ORDER BY kind
    LIMIT 1
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


class StoredSample(NamedTuple):
    """A stored sample, or an earlier one of the batch, that a new sample overlaps."""

    sample_id: str
    start_us: int
    end_us: int
    task_id: str = ""
    """The sample's task when it is another task than the new sample's, else empty."""
    job_id: str = ""
    attempt: int = 0
    share_millis: int = FULL_SHARE_MILLIS


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
    (provider, node, accelerator_id, task_id, end_us, exclusive_end, prior_end,
     prior_exclusive_end, raised_by)
SELECT provider, node, accelerator_id, task_id, max(end_us), max(exclusive_end), 0, 0, $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])
    AS n(provider, node, accelerator_id, task_id, end_us, exclusive_end)
GROUP BY provider, node, accelerator_id, task_id
ORDER BY provider, node, accelerator_id, task_id
ON CONFLICT (provider, node, accelerator_id, task_id)
DO UPDATE SET end_us = greatest(c.end_us, excluded.end_us), prior_end = c.end_us,
              exclusive_end = greatest(c.exclusive_end, excluded.exclusive_end),
              prior_exclusive_end = c.exclusive_end, raised_by = excluded.raised_by
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
    # Per coverage key, the latest end and the latest end of a whole-accelerator sample. An
    # accelerator's key has the empty task id. Task keys keep exclusive ends at 0.
    ends: dict[AcceleratorKey, list[int]] = {}
    for sample in samples:
        task_ends = ends.setdefault(accelerator_key(sample), [0, 0])
        if sample.end_us > task_ends[0]:
            task_ends[0] = sample.end_us
        accelerator_ends = ends.setdefault(
            (sample.provider, sample.node, sample.accelerator_id, ""), [0, 0]
        )
        if sample.end_us > accelerator_ends[0]:
            accelerator_ends[0] = sample.end_us
        if sample.share_millis == FULL_SHARE_MILLIS and sample.end_us > accelerator_ends[1]:
            accelerator_ends[1] = sample.end_us
    await conn.execute(
        _RAISE_COVERAGE,
        [key[0] for key in ends],
        [key[1] for key in ends],
        [key[2] for key in ends],
        [key[3] for key in ends],
        [key_ends[0] for key_ends in ends.values()],
        [key_ends[1] for key_ends in ends.values()],
        token,
    )


async def find_stored_overlaps(
    conn: asyncpg.Connection, token: int
) -> dict[tuple[str, str], StoredSample]:
    """Return, by provider and sample id, the stored sample that each staged sample overlaps.

    ``token`` is the id of the batch's coverage raise.
    """
    rows = await conn.fetch(_FIND_STORED_OVERLAPS, token)
    return {
        (r["provider"], r["sample_id"]): StoredSample(
            r["stored_id"],
            r["stored_start_us"],
            r["stored_end_us"],
            r["task_id"] if r["kind"] == 1 else "",
            r["job_id"],
            r["attempt"],
            r["share_millis"],
        )
        for r in rows
    }


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


def split_overlapping(
    samples: Sequence[UsageSample],
    stored: Mapping[tuple[str, str], StoredSample],
    replays: Collection[tuple[str, str]] = (),
) -> tuple[list[UsageSample], list[Rejection]]:
    """Split samples, in arrival order, into those to store and rejections for the rest.

    A sample is rejected when it overlaps the stored sample given for it in ``stored``, or a
    sample of this batch that arrived earlier and was accepted: one of its own task, or one of
    another task on its accelerator where either of the two uses the whole accelerator.
    ``replays`` are the provider and sample ids already stored: they are accepted, and the merge
    stores nothing for them, so no later sample is compared with them. A sample that overlaps a
    replay equal to its stored row overlaps that row, which the probe of stored samples finds.
    A replay with other times or another key than its stored row has nothing stored to overlap.
    """
    accepted: list[UsageSample] = []
    rejected: list[Rejection] = []
    # Per accelerator and task, the starts of the accepted samples of this batch and the samples,
    # sorted by start. The samples of one task are disjoint, so the one that starts last before
    # a sample ends is the only one of its task to compare with the sample.
    tasks_by_accelerator: dict[Accelerator, dict[str, _Accepted]] = {}
    for sample in sorted(samples, key=lambda s: s.stream_sequence):
        conflict = stored.get((sample.provider, sample.sample_id))
        if conflict is not None:
            rejected.append(_stored_rejection(sample, conflict))
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
            rejected.append(overlap_rejection(sample, other, "received earlier in its batch"))
            continue
        if len(tasks) > 1:
            other_task = _other_task_overlap(sample, tasks)
            if other_task is not None:
                other = _as_other_task(other_task)
                where = "received earlier in its batch"
                rejected.append(shared_accelerator_rejection(sample, other, where))
                continue
        accepted.append(sample)
        if (sample.provider, sample.sample_id) in replays:
            continue
        key_starts.insert(index, sample.start_us)
        key_accepted.insert(index, sample)
    return accepted, rejected


def _other_task_overlap(sample: UsageSample, tasks: Mapping[str, _Accepted]) -> UsageSample | None:
    """Return an accepted sample of another task on the sample's accelerator that overlaps it,
    where one of the two uses the whole accelerator, if there is one."""
    whole = sample.share_millis == FULL_SHARE_MILLIS
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
            if whole or other.share_millis == FULL_SHARE_MILLIS:
                return other
    return None


def _as_other_task(sample: UsageSample) -> StoredSample:
    return StoredSample(
        sample.sample_id,
        sample.start_us,
        sample.end_us,
        sample.task_id,
        sample.job_id,
        sample.attempt,
        sample.share_millis,
    )


def _stored_rejection(sample: UsageSample, stored: StoredSample) -> Rejection:
    if stored.task_id:
        return shared_accelerator_rejection(sample, stored, "stored")
    return overlap_rejection(sample, stored, "stored")


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
    return sample_rejection(sample, f"overlap:{sample.provider}/{sample.sample_id}", reason)


def shared_accelerator_rejection(sample: UsageSample, other: StoredSample, where: str) -> Rejection:
    """Return the dead letter of a sample that overlaps ``other``, a sample of another task on
    its accelerator, where one of the two uses the whole accelerator."""
    reason = (
        f"sample {sample.sample_id} of job {sample.job_id} attempt {sample.attempt} (task "
        f"{sample.task_id}, share {sample.share}) on accelerator {sample.accelerator_id} of "
        f"node {sample.node} covers {sample.start_time.isoformat()} to "
        f"{sample.end_time.isoformat()} ({micros_to_seconds(sample.accelerator_micros)} "
        f"accelerator-seconds), which overlaps sample {other.sample_id} of job {other.job_id} "
        f"attempt {other.attempt} (task {other.task_id}, share "
        f"{Decimal(other.share_millis).scaleb(-3)}) from {iso_micros(other.start_us)} to "
        f"{iso_micros(other.end_us)}, {where}; a task that holds the whole accelerator shares "
        "it with no other task, so the sample is not charged"
    )
    return sample_rejection(sample, f"overlap:{sample.provider}/{sample.sample_id}", reason)


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


def iso_micros(micros: int) -> str:
    """Return a time in microseconds since the epoch as ISO 8601 in UTC."""
    return (_EPOCH + timedelta(microseconds=micros)).isoformat()
