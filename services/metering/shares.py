"""Adding up the shares that samples of several tasks hold of one accelerator.

Shares are integers in thousandths of an accelerator, so sums are exact. The shares of the
samples of one accelerator add up to at most FULL_SHARE_MILLIS at any moment. A sample that
would push the sum above that where it overlaps others is a dead letter (see
:mod:`services.metering.overlaps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, NamedTuple

from services.metering.samples import UsageSample, micros_to_seconds

FULL_SHARE_MILLIS: Final = 1000
"""The share of a sample that uses the whole accelerator, in thousandths."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


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
    where: str = "stored"
    """The sample's origin as the dead letter words it: "stored" or "received earlier in its
    batch"."""


class SharePeak(NamedTuple):
    """The highest sum of shares that other samples hold while a sample runs."""

    share_millis: int
    """The sum in thousandths of the accelerator, 0 when no other sample overlaps."""
    time_us: int
    """The first moment the sum is reached, in microseconds since the epoch."""
    samples: tuple[StoredSample, ...]
    """The samples that run at that moment, in the order given."""


def share_peak(start_us: int, end_us: int, others: Sequence[StoredSample]) -> SharePeak:
    """Find the moment in [start_us, end_us) where ``others`` hold the largest sum of shares.

    Intervals are half-open, so a sample that ends when another starts never runs beside it.
    """
    events: list[tuple[int, int, int]] = []
    for index, other in enumerate(others):
        low = max(other.start_us, start_us)
        high = min(other.end_us, end_us)
        if low < high:
            # At one time, ends (0) sort before starts (1).
            events.append((low, 1, index))
            events.append((high, 0, index))
    events.sort()
    running: set[int] = set()
    load = 0
    peak = SharePeak(0, start_us, ())
    for time_us, is_start, index in events:
        if not is_start:
            running.discard(index)
            load -= others[index].share_millis
            continue
        running.add(index)
        load += others[index].share_millis
        if load > peak.share_millis:
            peak = SharePeak(load, time_us, tuple(others[i] for i in sorted(running)))
    return peak


def exceeds_accelerator(sample: UsageSample, peak: SharePeak) -> bool:
    """Check whether ``sample`` beside the samples at ``peak`` uses more than the accelerator."""
    return peak.share_millis + sample.share_millis > FULL_SHARE_MILLIS


def share_text(share_millis: int) -> str:
    """Return thousandths of an accelerator as an exact decimal, such as 0.4 or 1."""
    return str(Decimal(share_millis).scaleb(-3).normalize())


def over_share_reason(sample: UsageSample, peak: SharePeak) -> str:
    """Return why ``sample`` is not charged: with the samples of other tasks at ``peak`` it
    uses more than the whole accelerator. The reason names every one of those samples."""
    named = ", and ".join(
        f"sample {other.sample_id} of job {other.job_id} attempt {other.attempt} (task "
        f"{other.task_id}, share {share_text(other.share_millis)}) from "
        f"{iso_micros(other.start_us)} to {iso_micros(other.end_us)}, {other.where}"
        for other in peak.samples
    )
    total = peak.share_millis + sample.share_millis
    return (
        f"sample {sample.sample_id} of job {sample.job_id} attempt {sample.attempt} (task "
        f"{sample.task_id}, share {share_text(sample.share_millis)}) on accelerator "
        f"{sample.accelerator_id} of node {sample.node} covers {sample.start_time.isoformat()} "
        f"to {sample.end_time.isoformat()} ({micros_to_seconds(sample.accelerator_micros)} "
        f"accelerator-seconds), which overlaps {named}; at {iso_micros(peak.time_us)} the shares "
        f"add up to {share_text(total)} of the accelerator, more than the whole of it, so the "
        "sample is not charged"
    )


def iso_micros(micros: int) -> str:
    """Return a time in microseconds since the epoch as ISO 8601 in UTC."""
    return (_EPOCH + timedelta(microseconds=micros)).isoformat()
