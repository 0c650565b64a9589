"""Finding usage samples that meter an accelerator-second a second time under a new id.

The primary key recognises a replay of one sample id. An agent that lost its state, or a
misbehaving provider, can also report time that is already stored under another id. Such a
sample overlaps a stored sample of the same task (and so job attempt), accelerator, node and
provider, and ingest keeps it as a dead letter instead of charging it. The task is part of the
key because the tasks of one fractional job may share an accelerator, each with its own share.

Samples are checked in arrival order: one that overlaps a stored sample, or an earlier sample of
its own batch that was accepted, is rejected. The samples of one key stored since this check
exists are therefore disjoint, so the stored sample that starts last before a new one ends is the
only one that can overlap it.

``sample_coverage`` keeps, per key, an end no earlier than that of any stored sample. Agents
report a key's time in order, so nearly every new sample starts after it and needs no probe of
``usage_samples``. A batch raises it in its own short transaction before it stores anything, so
the end is never too early, and a stalled batch does not hold the row for other batches of the
key. The batch that raised a row last compares its samples with the end before its raise. A
batch that fails leaves the end too late, which only costs probes.

NOTE: the check is per task, so two jobs that both report one whole accelerator for the same
time are both charged. Only shares of one task are compared with each other.
"""

from __future__ import annotations

import bisect
import secrets
import zlib
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
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

# For every staged sample not stored yet, the stored sample of the same key that starts last
# before the staged one ends, if it ends after the staged one starts. Only a sample that starts
# before its key's coverage ends is probed, and the index on (job_id, attempt, task_id,
# accelerator_id, node, provider, start_time) makes that one probe. Times are compared as
# timestamps built the way the merge stores them.
_FIND_STORED_OVERLAPS = """
SELECT s.provider, s.sample_id, u.sample_id AS stored_id,
       u.start_us AS stored_start_us, u.end_us AS stored_end_us
FROM usage_staging s
JOIN metering.sample_coverage c
  ON c.provider = s.provider AND c.node = s.node AND c.accelerator_id = s.accelerator_id
 AND c.task_id = s.task_id
 AND CASE WHEN c.raised_by = $1 THEN c.prior_end ELSE c.end_us END > s.start_us
CROSS JOIN LATERAL (
    SELECT p.sample_id, p.end_time,
           (extract(epoch FROM p.start_time) * 1000000)::bigint AS start_us,
           (extract(epoch FROM p.end_time) * 1000000)::bigint AS end_us
    FROM metering.usage_samples p
    WHERE p.job_id = s.job_id AND p.attempt = s.attempt AND p.task_id = s.task_id
      AND p.accelerator_id = s.accelerator_id AND p.node = s.node AND p.provider = s.provider
      AND p.start_time < 'epoch'::timestamptz + s.end_us * interval '1 microsecond'
    ORDER BY p.start_time DESC
    LIMIT 1
) u
WHERE u.end_time > 'epoch'::timestamptz + s.start_us * interval '1 microsecond'
  AND NOT EXISTS (
      SELECT 1 FROM metering.usage_samples r
      WHERE r.provider = s.provider AND r.sample_id = s.sample_id)
"""

_DROP_STAGED = """
DELETE FROM usage_staging s
USING unnest($1::text[], $2::text[]) AS d(provider, sample_id)
WHERE s.provider = d.provider AND s.sample_id = d.sample_id
"""


class StoredSample(NamedTuple):
    """A stored sample that a new sample overlaps."""

    sample_id: str
    start_us: int
    end_us: int


AcceleratorKey = tuple[str, str, str, str]
"""Provider, node, accelerator id and task id: the time of one key is metered once."""


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
    """Raise the coverage of the samples' keys to their latest ends, committed at once.

    ``token`` is the batch's id, which :func:`find_stored_overlaps` takes too. Keys are updated
    in key order, so that concurrent batches lock the rows in the same order.
    """
    ends: dict[AcceleratorKey, int] = {}
    for sample in samples:
        key = accelerator_key(sample)
        ends[key] = max(ends.get(key, 0), sample.end_us)
    await conn.execute(
        _RAISE_COVERAGE,
        [key[0] for key in ends],
        [key[1] for key in ends],
        [key[2] for key in ends],
        [key[3] for key in ends],
        list(ends.values()),
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
            r["stored_id"], r["stored_start_us"], r["stored_end_us"]
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


def split_overlapping(
    samples: Sequence[UsageSample],
    stored: Mapping[tuple[str, str], StoredSample],
    replays: Collection[tuple[str, str]] = (),
) -> tuple[list[UsageSample], list[Rejection]]:
    """Split samples, in arrival order, into those to store and rejections for the rest.

    A sample is rejected when it overlaps the stored sample given for it in ``stored``, or a
    sample of this batch that arrived earlier and was accepted. ``replays`` are the provider
    and sample ids already stored: they are accepted, and the merge stores nothing for them, so
    no later sample is compared with them. A sample that overlaps a replay equal to its stored
    row overlaps that row, which the probe of stored samples finds. A replay with other times
    or another key than its stored row has nothing stored to overlap.
    """
    accepted: list[UsageSample] = []
    rejected: list[Rejection] = []
    # Per key, the accepted samples of this batch and their starts, sorted by start. They are
    # disjoint, so the one that starts last before a sample ends is the only one to compare.
    starts: dict[AcceleratorKey, list[int]] = {}
    accepted_by_key: dict[AcceleratorKey, list[UsageSample]] = {}
    for sample in sorted(samples, key=lambda s: s.stream_sequence):
        conflict = stored.get((sample.provider, sample.sample_id))
        if conflict is not None:
            rejected.append(overlap_rejection(sample, conflict, "stored"))
            continue
        key = accelerator_key(sample)
        key_starts = starts.setdefault(key, [])
        key_accepted = accepted_by_key.setdefault(key, [])
        index = bisect.bisect_left(key_starts, sample.end_us)
        if index and key_accepted[index - 1].end_us > sample.start_us:
            earlier = key_accepted[index - 1]
            other = StoredSample(earlier.sample_id, earlier.start_us, earlier.end_us)
            rejected.append(overlap_rejection(sample, other, "received earlier in its batch"))
            continue
        accepted.append(sample)
        if (sample.provider, sample.sample_id) in replays:
            continue
        key_starts.insert(index, sample.start_us)
        key_accepted.insert(index, sample)
    return accepted, rejected


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
