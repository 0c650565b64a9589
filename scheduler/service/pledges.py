"""Pledges and recalls: validation, persistence and conversion at the protobuf edge."""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.subjects import TOKEN_PATTERN
from acsp.time_range import (
    EARLIEST_SECONDS,
    EARLIEST_TIME,
    LATEST_SECONDS,
    LATEST_TIME,
    RANGE_FIX,
)
from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.engine.capacity import peak_overlap
from scheduler.engine.catalog import Catalog

from .validation import FieldViolation


@dataclass(frozen=True, slots=True)
class PledgeRecord:
    pledge_id: str
    provider: str
    region: str
    model: str
    protected: int
    recallable: int
    start: float
    end: float
    created: float = 0.0
    """Seconds since 1970 when the scheduler first stored the pledge; 0.0 before it is stored."""


@dataclass(frozen=True, slots=True)
class RecallRecord:
    recall_id: str
    pledge_id: str
    count: int
    effective_at: float
    end: float | None
    reason: str
    notice: timedelta | None = None
    """The notice that the request gave in place of an effective time, or None. A retry of
    the request matches on it, not on ``effective_at``, which was resolved from it once."""
    duration: timedelta | None = None
    """The duration that the request gave in place of an end time, or None. A retry of the
    request matches on it, not on ``end``."""


MAX_PLEDGE_ACCELERATORS: Final = 1_000_000
"""Largest protected or recallable count of one pledge. It is far above any one region's
fleet and keeps the counts within the database's 32-bit integer columns."""


def timestamp_problem(stamp: Timestamp) -> str:
    """Return why ``stamp`` is not a time of a pledge or recall window, or an empty string.

    The range is the one the grant service accepts: a year outside it is a typing mistake, and
    a window ending in 9999 would count pledged hours that no settlement period reaches.
    """
    if not 0 <= stamp.nanos < 1_000_000_000:
        return f"has nanos={stamp.nanos}, outside 0 to 999999999"
    if not EARLIEST_SECONDS <= stamp.seconds < LATEST_SECONDS:
        return (
            f"is {_stamp_text(stamp)}, outside the years "
            f"{EARLIEST_TIME.year}..{LATEST_TIME.year - 1}"
        )
    return ""


def _stamp_text(stamp: Timestamp) -> str:
    try:
        return stamp.ToDatetime(tzinfo=UTC).isoformat()
    except (ValueError, OverflowError):
        return f"{stamp.seconds} s since 1970"


class RequestReused(Exception):
    """A request id was used before for a pledge or recall with other values."""


class PledgeOverlap(Exception):
    """A pledge's window overlaps another pledge of the same provider, region and model."""

    def __init__(self, other: PledgeRecord) -> None:
        self.other = other
        super().__init__(
            f"overlaps pledge {other.pledge_id} of {other.provider}/{other.region} "
            f"{other.model} ({_utc(other.start)} to {_utc(other.end)}); change that pledge "
            f"instead (acsp fleet pledge set --pledge-id {other.pledge_id}), or start this "
            f"one at {_utc(other.end)} or later"
        )


class RecallPastPledge(Exception):
    """A recall's end_time is after its pledge's window ends."""

    def __init__(self, pledge: PledgeRecord, end: float) -> None:
        self.pledge = pledge
        super().__init__(
            f"is {_utc(end)}, after pledge {pledge.pledge_id} ends at {_utc(pledge.end)}"
        )


def new_pledge_id(provider: str, request_id: str) -> str:
    """Return the id of a pledge that SetPledge creates.

    With a request id the pledge id is derived from it and the provider, so a retried call
    finds the pledge its first call created instead of adding a second one.
    """
    if not request_id:
        return f"pl-{uuid.uuid4().hex[:16]}"
    digest = hashlib.sha256(f"{len(provider)}:{provider}/{request_id}".encode()).hexdigest()
    return f"pl-{digest[:16]}"


def pledge_from_proto(
    msg: scheduler_pb2.Pledge, request_id: str = ""
) -> tuple[PledgeRecord, list[FieldViolation]]:
    """Convert a requested pledge; a new one (empty id) gets :func:`new_pledge_id`."""
    bad: list[FieldViolation] = []
    region, region_problem = _region_of(msg.provider_id, msg.region_id)
    if region_problem:
        bad.append(FieldViolation("pledge.region_id", region_problem))
    for name, value in (("pledge.provider_id", msg.provider_id), ("pledge.model", msg.model)):
        if not TOKEN_PATTERN.match(value):
            bad.append(FieldViolation(name, f"{value!r} is not a valid identifier"))
    catalog = Catalog()
    if msg.model and msg.model not in catalog:
        problem = f"{msg.model!r} is not in the catalog; use one of "
        bad.append(FieldViolation("pledge.model", problem + ", ".join(catalog.names())))
    if not msg.window.HasField("start_time") or not msg.window.HasField("end_time"):
        bad.append(FieldViolation("pledge.window", "needs both start_time and end_time"))
    for name, stamp in (("start_time", msg.window.start_time), ("end_time", msg.window.end_time)):
        problem = timestamp_problem(stamp) if msg.window.HasField(name) else ""
        if problem:
            bad.append(FieldViolation(f"pledge.window.{name}", f"{problem}; {RANGE_FIX}"))
    for name, count in (
        ("protected_count", msg.protected_count),
        ("recallable_count", msg.recallable_count),
    ):
        if count > MAX_PLEDGE_ACCELERATORS:
            bad.append(
                FieldViolation(
                    f"pledge.{name}", f"is {count}; use at most {MAX_PLEDGE_ACCELERATORS}"
                )
            )
    start = _seconds(msg.window.start_time)
    end = _seconds(msg.window.end_time)
    if msg.window.HasField("end_time") and end <= start:
        bad.append(FieldViolation("pledge.window.end_time", "must be after start_time"))
    if msg.protected_count + msg.recallable_count == 0:
        bad.append(FieldViolation("pledge", "pledges no accelerators; set a count above 0"))
    pledge = PledgeRecord(
        pledge_id=msg.pledge_id or new_pledge_id(msg.provider_id, request_id),
        provider=msg.provider_id,
        region=region,
        model=msg.model,
        protected=msg.protected_count,
        recallable=msg.recallable_count,
        start=start,
        end=end,
    )
    return pledge, bad


def _region_of(provider: str, region: str) -> tuple[str, str]:
    """Return the region id of ``region`` and a problem, or an empty one.

    Jobs and grants name a region as ``provider/region``. A pledge names its provider in a
    field of its own, so that form is accepted only when its provider is the pledge's.
    """
    if "/" in region:
        prefix, _, rest = region.partition("/")
        if prefix != provider or not TOKEN_PATTERN.match(rest):
            return region, (
                f"{region!r} is not a region of provider {provider!r}; give the region without "
                "the provider prefix, e.g. region-1"
            )
        region = rest
    if not TOKEN_PATTERN.match(region):
        return region, (
            f"{region!r} is not a valid identifier; give the region id as `acsp fleet nodes` "
            "lists it: 1 to 64 letters, digits, '-' or '_'"
        )
    return region, ""


def pledge_to_proto(
    pledge: PledgeRecord, registered: int = 0, healthy: int = 0
) -> scheduler_pb2.Pledge:
    msg = scheduler_pb2.Pledge(
        pledge_id=pledge.pledge_id,
        provider_id=pledge.provider,
        region_id=pledge.region,
        model=pledge.model,
        window=common_pb2.TimeWindow(start_time=_stamp(pledge.start), end_time=_stamp(pledge.end)),
        protected_count=pledge.protected,
        recallable_count=pledge.recallable,
        registered_count=registered,
        healthy_count=healthy,
    )
    if pledge.created:
        msg.create_time.CopyFrom(_stamp(pledge.created))
    return msg


def recall_to_proto(recall: RecallRecord, freed: int = 0) -> scheduler_pb2.Recall:
    msg = scheduler_pb2.Recall(
        recall_id=recall.recall_id,
        pledge_id=recall.pledge_id,
        count=recall.count,
        effective_time=_stamp(recall.effective_at),
        reason=recall.reason,
        freed_count=freed,
    )
    if recall.end is not None:
        msg.end_time.CopyFrom(_stamp(recall.end))
    return msg


class PledgeStore:
    """Rows of ``scheduler.pledges`` and ``scheduler.recalls``."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout_s

    async def upsert(self, pledge: PledgeRecord, cause: str, created: bool = False) -> bool:
        """Create or replace a pledge; return False if its id names another pool.

        ``created`` marks a pledge that the request creates. Its id was derived from the
        request id, so a stored row with that id comes from an earlier call. The same values
        leave it as it is, and other values raise :class:`RequestReused`. A pledge to change
        (``created`` false) that is not stored raises ``KeyError``, because pledge ids are the
        scheduler's to assign. Raises ``LookupError`` if the pledge would fall below what
        recalls already took, and :class:`PledgeOverlap` if its window overlaps another pledge
        of the same provider, region and model.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            # Lock the pool before reading the row, because two creations of one id (a request
            # id sent twice) find no row to lock. The second then reads what the first wrote.
            await self._lock_pool(conn, pledge)
            row = await conn.fetchrow(
                f"SELECT {_PLEDGE_COLUMNS} FROM scheduler.pledges WHERE pledge_id = $1 FOR UPDATE",
                pledge.pledge_id,
                timeout=self._timeout,
            )
            if row is not None and created:
                if _same_pledge(_pledge_from_row(row), pledge):
                    return True
                raise RequestReused(f"was used before for pledge {pledge.pledge_id}")
            if row is None and not created:
                raise KeyError(pledge.pledge_id)
            if row is not None and (row["provider"], row["region"], row["model"]) != (
                pledge.provider,
                pledge.region,
                pledge.model,
            ):
                return False
            await self._check_overlap(conn, pledge)
            recalls = await self._open_recalls(conn, pledge.pledge_id)
            recalled, at = peak_overlap(_windows(recalls, time.time(), math.inf))
            if recalled > pledge.recallable:
                raise LookupError(
                    f"{recalled} accelerators of pledge {pledge.pledge_id} are recalled at "
                    f"{_utc(at)} by {_describe(_in_force(recalls, at))}; recallable_count "
                    "cannot go below that"
                )
            await conn.execute(
                "INSERT INTO scheduler.pledges (pledge_id, provider, region, model,"
                " protected_count, recallable_count, starts_at, ends_at, cause)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (pledge_id) DO UPDATE SET protected_count = EXCLUDED.protected_count,"
                " recallable_count = EXCLUDED.recallable_count, starts_at = EXCLUDED.starts_at,"
                " ends_at = EXCLUDED.ends_at, cause = EXCLUDED.cause, updated_at = now()",
                pledge.pledge_id,
                pledge.provider,
                pledge.region,
                pledge.model,
                pledge.protected,
                pledge.recallable,
                _datetime(pledge.start),
                _datetime(pledge.end),
                cause,
                timeout=self._timeout,
            )
        return True

    async def add_recall(
        self,
        recall: RecallRecord,
        request_id: str | None,
        check: Callable[[RecallRecord, PledgeRecord], int] | None = None,
    ) -> tuple[RecallRecord, PledgeRecord, int]:
        """Store a recall; return it, its pledge and what ``check`` returned for it.

        A recall without an end is stored with its pledge's end. Raises ``KeyError`` for an
        unknown pledge, :class:`RecallPastPledge` when the recall ends after its pledge, and
        ``LookupError`` when the pledge has fewer recallable accelerators left than the recall
        requests. ``check`` runs on a new recall inside the transaction, so an exception it
        raises stores nothing. A repeated request returns the stored recall with 0 in place of
        its result. It repeats the first one when its notice and duration, or the times it
        gives in their place, are the first one's (:func:`_repeats`).
        """
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            if request_id:
                existing = await conn.fetchrow(
                    f"SELECT {_RECALL_COLUMNS} FROM scheduler.recalls WHERE request_id = $1",
                    request_id,
                    timeout=self._timeout,
                )
                if existing is not None:
                    earlier = _recall_from_row(existing)
                    owner = await self._pledge(conn, earlier.pledge_id)
                    # The check also keeps one provider's recall from another provider
                    # that happens to send the same request id.
                    if not _repeats(earlier, recall, owner):
                        raise RequestReused("was used before for another recall")
                    return earlier, owner, 0
            pledge = await self._pledge(conn, recall.pledge_id, lock=True)
            # The table keeps microseconds, so the checks compare the times as stored. A recall
            # that starts where another ends then does not overlap it by a rounding.
            recall = _as_stored(recall)
            if recall.end is not None and recall.end > pledge.end:
                raise RecallPastPledge(pledge, recall.end)
            recall = _ending_with(recall, pledge)
            self._check_left(pledge, recall, await self._open_recalls(conn, pledge.pledge_id))
            checked = check(recall, pledge) if check is not None else 0
            await conn.execute(
                "INSERT INTO scheduler.recalls (recall_id, pledge_id, count, effective_at,"
                " ends_at, reason, request_id, notice, duration)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                recall.recall_id,
                recall.pledge_id,
                recall.count,
                _datetime(recall.effective_at),
                _datetime(recall.end) if recall.end is not None else None,
                recall.reason,
                request_id,
                recall.notice,
                recall.duration,
                timeout=self._timeout,
            )
        return recall, pledge, checked

    async def pledges(self, provider: str = "") -> list[PledgeRecord]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {_PLEDGE_COLUMNS} FROM scheduler.pledges"
                " WHERE $1 = '' OR provider = $1 ORDER BY pledge_id",
                provider,
                timeout=self._timeout,
            )
        return [_pledge_from_row(row) for row in rows]

    async def recalls(self, provider: str = "") -> list[RecallRecord]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT r.recall_id, r.pledge_id, r.count, r.effective_at, r.ends_at, r.reason,"
                " r.notice, r.duration"
                " FROM scheduler.recalls r JOIN scheduler.pledges p USING (pledge_id)"
                " WHERE $1 = '' OR p.provider = $1 ORDER BY r.recall_id",
                provider,
                timeout=self._timeout,
            )
        return [_recall_from_row(row) for row in rows]

    async def _pledge(
        self, conn: asyncpg.Connection, pledge_id: str, lock: bool = False
    ) -> PledgeRecord:
        row = await conn.fetchrow(
            f"SELECT {_PLEDGE_COLUMNS} FROM scheduler.pledges WHERE pledge_id = $1"
            + (" FOR UPDATE" if lock else ""),
            pledge_id,
            timeout=self._timeout,
        )
        if row is None:
            raise KeyError(pledge_id)
        return _pledge_from_row(row)

    async def _lock_pool(self, conn: asyncpg.Connection, pledge: PledgeRecord) -> None:
        """Take the transaction-scoped advisory lock of ``pledge``'s provider, region and model.

        Concurrent writes to one pool wait for each other, since a row lock cannot cover rows
        that do not exist yet. The lock lives in PostgreSQL, so it holds across scheduler
        replicas too.
        """
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('scheduler.pledges'), hashtext($1))",
            f"{pledge.provider}/{pledge.region}/{pledge.model}",
            timeout=self._timeout,
        )

    async def _check_overlap(self, conn: asyncpg.Connection, pledge: PledgeRecord) -> None:
        """Raise :class:`PledgeOverlap` if another pledge of the pool overlaps ``pledge``.

        One pledge at a time per provider, region and model keeps a recall's pledge and a
        settlement's "kept" about one promise. The caller holds the pool's lock
        (:meth:`_lock_pool`), so a pledge created concurrently is either seen here or waits.
        """
        row = await conn.fetchrow(
            f"SELECT {_PLEDGE_COLUMNS} FROM scheduler.pledges"
            " WHERE provider = $1 AND region = $2 AND model = $3 AND pledge_id <> $4"
            " AND starts_at < $6 AND ends_at > $5 ORDER BY starts_at LIMIT 1",
            pledge.provider,
            pledge.region,
            pledge.model,
            pledge.pledge_id,
            _datetime(pledge.start),
            _datetime(pledge.end),
            timeout=self._timeout,
        )
        if row is not None:
            raise PledgeOverlap(_pledge_from_row(row))

    async def _open_recalls(self, conn: asyncpg.Connection, pledge_id: str) -> list[RecallRecord]:
        """Return the recalls of ``pledge_id`` that have not ended, earliest first."""
        rows = await conn.fetch(
            f"SELECT {_RECALL_COLUMNS} FROM scheduler.recalls WHERE pledge_id = $1"
            " AND (ends_at IS NULL OR ends_at > now()) ORDER BY effective_at, recall_id",
            pledge_id,
            timeout=self._timeout,
        )
        return [_recall_from_row(row) for row in rows]

    @staticmethod
    def _check_left(pledge: PledgeRecord, recall: RecallRecord, others: list[RecallRecord]) -> None:
        """Raise ``LookupError`` if ``recall`` and the recalls of ``others`` that overlap it in
        time take more than ``pledge``'s recallable accelerators at some instant.

        Recalls whose windows do not overlap do not add up, so an operator can book recalls
        for several peaks of one pledge, each up to the recallable count.
        """
        end = recall.end if recall.end is not None else math.inf
        recalled, at = peak_overlap(_windows(others, recall.effective_at, end))
        left = pledge.recallable - recalled
        if recall.count <= left:
            return
        if not recalled:
            raise LookupError(
                f"pledge {pledge.pledge_id} has {pledge.recallable} recallable accelerators; "
                f"the recall asks for {recall.count}. Recall at most {pledge.recallable}"
            )
        fix = f"Recall at most {left}, or " if left > 0 else "To recall this many, "
        raise LookupError(
            f"pledge {pledge.pledge_id} has {left} recallable accelerators left at {_utc(at)}, "
            f"because recalls in force then take {recalled}: "
            f"{_describe(_in_force(others, at))}. This recall asks for {recall.count} from "
            f"{_utc(recall.effective_at)} to {_utc(end)}. {fix}choose a window that does not "
            "overlap theirs"
        )


def _windows(
    recalls: list[RecallRecord], start: float, end: float
) -> list[tuple[float, float, int]]:
    """Return the windows of ``recalls`` cut to ``[start, end)``, with their counts."""
    return [(max(r.effective_at, start), min(_end_of(r), end), r.count) for r in recalls]


def _in_force(recalls: list[RecallRecord], at: float) -> list[RecallRecord]:
    return [r for r in recalls if r.effective_at <= at < _end_of(r)]


def _end_of(recall: RecallRecord) -> float:
    # Recalls stored before they ended with their pledge may have no end.
    return recall.end if recall.end is not None else math.inf


def _describe(recalls: list[RecallRecord]) -> str:
    """Name ``recalls`` with their counts and windows, for an error message."""
    parts = [
        f"{r.recall_id} ({r.count} from {_utc(r.effective_at)} to "
        + (f"{_utc(r.end)})" if r.end is not None else "the pledge's end)")
        for r in recalls
    ]
    return ", ".join(parts)


_PLEDGE_COLUMNS = (
    "pledge_id, provider, region, model, protected_count, recallable_count, starts_at, ends_at,"
    " created_at"
)
_RECALL_COLUMNS = "recall_id, pledge_id, count, effective_at, ends_at, reason, notice, duration"


def _pledge_from_row(row: asyncpg.Record) -> PledgeRecord:
    return PledgeRecord(
        row["pledge_id"],
        row["provider"],
        row["region"],
        row["model"],
        row["protected_count"],
        row["recallable_count"],
        row["starts_at"].timestamp(),
        row["ends_at"].timestamp(),
        row["created_at"].timestamp(),
    )


def _recall_from_row(row: asyncpg.Record) -> RecallRecord:
    ends = row["ends_at"]
    return RecallRecord(
        row["recall_id"],
        row["pledge_id"],
        row["count"],
        row["effective_at"].timestamp(),
        ends.timestamp() if ends is not None else None,
        row["reason"],
        row["notice"],
        row["duration"],
    )


def _same_pledge(stored: PledgeRecord, requested: PledgeRecord) -> bool:
    # PostgreSQL keeps timestamps to the microsecond.
    return replace(stored, start=0.0, end=0.0, created=0.0) == replace(
        requested, start=0.0, end=0.0, created=0.0
    ) and _same_times((stored.start, stored.end), (requested.start, requested.end))


def _ending_with(recall: RecallRecord, pledge: PledgeRecord) -> RecallRecord:
    # An open-ended recall ends with its pledge, so that it never lowers the capacity of the
    # pool's next pledge nor counts in a settlement after its pledge.
    return recall if recall.end is not None else replace(recall, end=pledge.end)


def _as_stored(recall: RecallRecord) -> RecallRecord:
    """Return ``recall`` with its times rounded to microseconds, as the table stores them."""
    end = recall.end
    return replace(
        recall,
        effective_at=_datetime(recall.effective_at).timestamp(),
        end=_datetime(end).timestamp() if end is not None else None,
    )


def _repeats(stored: RecallRecord, requested: RecallRecord, pledge: PledgeRecord) -> bool:
    """Return whether ``requested`` carries the values of the request that stored ``stored``.

    A notice or duration matches the stored one, never the time resolved from it, so a retry
    of a relative request matches however late it comes. An absolute time matches the stored
    time, and a request without an end matches the pledge's end stored in its place.
    """
    if (stored.pledge_id, stored.count, stored.reason) != (
        requested.pledge_id,
        requested.count,
        requested.reason,
    ):
        return False
    if (stored.notice, stored.duration) != (requested.notice, requested.duration):
        return False
    if requested.notice is None and not _same_times(
        (stored.effective_at,), (requested.effective_at,)
    ):
        return False
    if requested.duration is not None:
        return True
    if stored.end is None:
        # Recalls stored before open-ended ones got their pledge's end have none.
        return requested.end is None
    end = requested.end if requested.end is not None else pledge.end
    return _same_times((stored.end,), (end,))


def _same_times(stored: tuple[float, ...], requested: tuple[float, ...]) -> bool:
    return all(abs(a - b) < 1e-6 for a, b in zip(stored, requested, strict=True))


def _seconds(stamp: Timestamp) -> float:
    return float(stamp.seconds) + stamp.nanos / 1e9


def _stamp(seconds: float) -> Timestamp:
    # Round to the microsecond that the tables keep: a float of Unix seconds carries about
    # 0.2 us, so whole nanoseconds from it could land 1 us below the stored time.
    stamp = Timestamp()
    stamp.FromMicroseconds(round(seconds * 1e6))
    return stamp


def _datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _utc(seconds: float) -> str:
    return _datetime(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")
