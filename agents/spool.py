"""A bounded, append-only, fsynced queue of messages on local disk.

Every usage report, health event and task event goes through the spool before it is published
(write-ahead), so a message survives both a NATS outage and a crash of the agent, and the
sender replays messages in the order they were appended.

Layout: segment files ``<offset>.seg`` named by the global byte offset of their first record,
and a ``head`` file with the offset of the first record not yet acknowledged by JetStream. The
record format is in :mod:`agents.spool_format`. A torn record at the end of the last segment (a
crash during ``append``) fails its CRC and is cut off when the spool opens.

Damaged segments: when the spool opens, it reads every record from the head on. A segment with
records that fail to decode is repaired by :mod:`agents.spool_repair`: the intact records stay
at their offsets, the original file is kept as ``<segment>.corrupt``, and the loss is logged
and counted in :attr:`Spool.damaged_segments` and :attr:`Spool.lost_bytes`. A file named
``*.seg`` without an offset for a name is renamed to ``*.seg.corrupt``. A segment damaged
after the spool opened is repaired the same way when a read reaches it. So the agent goes on
with what is intact instead of stopping.

Damaged head: a ``head`` file of the wrong length, failing its checksum, or with an offset past
the end of the records is renamed to ``head.corrupt``, logged and counted in
:attr:`Spool.damaged_heads`. Reading then starts again at the oldest segment on disk, so
records that JetStream already acknowledged are published again. They keep their message ids
and payloads, and metering stores a usage sample once per (provider, sample id), so they are
not charged twice.

Full spool policy: when appending would take the unacknowledged bytes over ``max_bytes``, the
new records are rejected (the oldest are kept, so what is replayed has no gap before the
point where the spool filled). :attr:`Spool.dropped` counts rejected records; the caller logs
them. A rejected usage sample leaves a gap in the node's sequence numbers, which the
consumer can see.

Rejection counts: the outbox stores how many times JetStream rejected each message at the head
for good in a ``rejections.json`` file beside the segments, replaced atomically each time a
rejection is counted, so a restarted agent goes on counting instead of starting from zero.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from agents.private_files import PRIVATE_FOLDER_MODE, private_opener
from agents.spool_format import SpoolRecord, decode_record, encode_record
from agents.spool_repair import QUARANTINE_SUFFIX, quarantine_path, scan_segment

__all__ = [
    "REJECTIONS_FILE_NAME",
    "RejectionCount",
    "Spool",
    "SpoolRecord",
]

logger = logging.getLogger(__name__)

_HEAD = struct.Struct(">QI")
_SUFFIX = ".seg"
_READ_CHUNK = 256 << 10
_CACHE_MAX_RECORDS = 8192
_CACHE_MAX_BYTES = 8 << 20
REJECTIONS_FILE_NAME: Final = "rejections.json"


@dataclass(frozen=True, slots=True)
class RejectionCount:
    """Rejections for good counted for one spooled message."""

    count: int
    counted_at: float
    """Wall-clock time of the last counted rejection, in seconds since the epoch."""
    reason: str
    """Reason of the last rejection."""


class _SegmentDamagedError(Exception):
    """A record of segment ``index`` fails to decode, or its file ends before its range does."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


@dataclass(frozen=True, slots=True)
class _Read:
    record: SpoolRecord
    end: int
    """Global offset just after the record."""


class Spool:
    """A durable FIFO of :class:`SpoolRecord` bounded by ``max_bytes`` of pending data."""

    def __init__(
        self, directory: Path, max_bytes: int = 256 << 20, segment_bytes: int = 8 << 20
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("spool max_bytes and segment_bytes must be positive")
        self._dir = directory
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._dir.mkdir(mode=PRIVATE_FOLDER_MODE, parents=True, exist_ok=True)
        self._writer: BinaryIO | None = None
        self.damaged_segments = 0
        """Segments found damaged and repaired since this object was created."""
        self.lost_bytes = 0
        """Bytes of those segments that held no intact record."""
        self.damaged_heads = 0
        """Head files found damaged and moved aside since this object was created."""
        self._segments = self._list_segments()
        self._head = self._read_head()
        self._tail, self._pending_records = self._recover()
        if self._tail < self._head:
            self._move_head_aside(f"its offset {self._head} is past the end of the records")
            self._head = self._segments[0] if self._segments else 0
            self._tail, self._pending_records = self._recover()
        # A copy of the pending records while they are few, so that the sender peeks and
        # commits without reading the segments back. None while they are on disk only.
        self._cache: deque[_Read] | None = deque() if self._pending_records == 0 else None
        self.dropped = 0
        """Records rejected because the spool was full, since this object was created."""
        if self._segments:
            self._writer = open(self._segment_path(self._segments[-1]), "ab", opener=private_opener)

    # Properties ------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def pending_bytes(self) -> int:
        return self._tail - self._head

    @property
    def pending_records(self) -> int:
        return self._pending_records

    # Writing ---------------------------------------------------------------------------------

    def append(self, records: Sequence[SpoolRecord]) -> int:
        """Append ``records`` with one fsync; return how many were accepted (a prefix)."""
        encoded = []
        size = self.pending_bytes
        for record in records:
            frame = encode_record(record)
            if size + len(frame) > self._max_bytes:
                break
            encoded.append(frame)
            size += len(frame)
        rejected = len(records) - len(encoded)
        if rejected:
            self.dropped += rejected
        if not encoded:
            return 0
        start = self._tail
        segment_count = len(self._segments)
        try:
            for frame in encoded:
                writer = self._writer_for(len(frame))
                writer.write(frame)
                self._tail += len(frame)
            assert self._writer is not None
            self._writer.flush()
            os.fsync(self._writer.fileno())
        except OSError:
            # A full disk fails a write or the fsync after part of the batch reached the file.
            # Records appended later must not follow those bytes, which a reopened spool would
            # read as a torn tail and cut off together with everything after them.
            self._undo_append(start, segment_count)
            raise
        self._pending_records += len(encoded)
        self._cache_appended(records[: len(encoded)], encoded)
        return len(encoded)

    def _undo_append(self, start: int, segment_count: int) -> None:
        """Cut the spool back to offset ``start`` and its first ``segment_count`` segments."""
        if self._writer is not None:
            # Closing flushes what is still buffered, which may fail again. The truncation below
            # cuts whatever part of the batch reached the file.
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        for offset in self._segments[segment_count:]:
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(offset).unlink()
        del self._segments[segment_count:]
        self._tail = start
        if self._segments:
            last = self._segments[-1]
            os.truncate(self._segment_path(last), start - last)
            self._writer = open(self._segment_path(last), "ab", opener=private_opener)

    def _cache_appended(self, records: Sequence[SpoolRecord], frames: list[bytes]) -> None:
        if self._cache is None:
            return
        if self._pending_records > _CACHE_MAX_RECORDS or self.pending_bytes > _CACHE_MAX_BYTES:
            self._cache = None  # Read from disk until the spool is empty again.
            return
        end = self._tail - sum(len(frame) for frame in frames)
        for record, frame in zip(records, frames, strict=True):
            end += len(frame)
            self._cache.append(_Read(record, end))

    def _writer_for(self, size: int) -> BinaryIO:
        if self._writer is None or (
            self._tail - self._segments[-1] + size > self._segment_bytes
            and self._tail > self._segments[-1]
        ):
            self._rotate()
        assert self._writer is not None
        return self._writer

    def _rotate(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
        self._segments.append(self._tail)
        self._writer = open(self._segment_path(self._tail), "ab", opener=private_opener)
        self._fsync_directory()

    # Reading ---------------------------------------------------------------------------------

    def peek(self, max_records: int) -> list[SpoolRecord]:
        """Return up to ``max_records`` records from the head, without removing them."""
        if self._cache is not None:
            return [read.record for read in itertools.islice(self._cache, max_records)]
        return [read.record for read in self._read_from_head(max_records)]

    def commit(self, count: int) -> None:
        """Remove the first ``count`` records: JetStream acknowledged them."""
        if count <= 0:
            return
        if self._cache is not None:
            if len(self._cache) < count:
                raise ValueError(
                    f"commit of {count} records but only {len(self._cache)} are pending"
                )
            for _ in range(count - 1):
                self._cache.popleft()
            self._head = self._cache.popleft().end
        else:
            reads = self._read_from_head(count)
            if len(reads) != count:
                raise ValueError(f"commit of {count} records but only {len(reads)} are pending")
            self._head = reads[-1].end
        self._pending_records -= count
        if self._pending_records == 0 and self._cache is None:
            self._cache = deque()
        self._write_head()
        self._delete_consumed_segments()

    def _read_from_head(self, max_records: int) -> list[_Read]:
        return self._read_at(self._head, max_records)

    def _read_at(self, position: int, max_records: int) -> list[_Read]:
        try:
            return self._read_records(position, max_records)
        except _SegmentDamagedError as error:
            # Damaged since the spool opened: repaired the same way, then read again.
            self._repair(error.index)
            return self._read_at(position, max_records)

    def _read_records(self, position: int, max_records: int) -> list[_Read]:
        if self._writer is not None:
            self._writer.flush()
        result: list[_Read] = []
        while len(result) < max_records and position < self._tail:
            index = self._segment_index(position)
            start = self._segments[index]
            end = self._segments[index + 1] if index + 1 < len(self._segments) else self._tail
            if position >= end:
                position = end
                continue
            with open(self._segment_path(start), "rb") as file:
                file.seek(position - start)
                buffer = b""
                offset = 0
                while len(result) < max_records and position < end:
                    decoded = decode_record(buffer, offset)
                    if decoded is None:
                        chunk = file.read(_READ_CHUNK)
                        if not chunk:
                            raise _SegmentDamagedError(index)
                        buffer = buffer[offset:] + chunk
                        offset = 0
                        continue
                    record, size = decoded
                    offset += size
                    position += size
                    if not record.is_padding:
                        result.append(_Read(record, position))
        return result

    # Rejection counts ------------------------------------------------------------------------

    def save_rejections(self, counts: Mapping[str, RejectionCount]) -> None:
        """Replace the stored rejection counts with ``counts``, by message id (one fsync)."""
        document = {
            message_id: {
                "count": count.count,
                "counted_at": count.counted_at,
                "reason": count.reason,
            }
            for message_id, count in counts.items()
        }
        path = self._dir / REJECTIONS_FILE_NAME
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb", opener=private_opener) as file:
            file.write(json.dumps(document).encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        self._fsync_directory()

    def load_rejections(self) -> dict[str, RejectionCount]:
        """Return the stored rejection counts by message id, or none if the file is damaged.

        Counts of messages that have left the spool since they were stored may be among them.
        """
        path = self._dir / REJECTIONS_FILE_NAME
        if not path.exists():
            return {}
        try:
            document: Any = json.loads(path.read_bytes())
            return {
                str(message_id): RejectionCount(
                    int(entry["count"]), float(entry["counted_at"]), str(entry["reason"])
                )
                for message_id, entry in document.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning(
                "rejection counts in %s are invalid (%s), so rejections are counted from zero",
                path,
                error,
            )
            return {}

    # Recovery --------------------------------------------------------------------------------

    def _segment_path(self, start: int) -> Path:
        return self._dir / f"{start:020d}{_SUFFIX}"

    def _segment_index(self, position: int) -> int:
        index = bisect.bisect_right(self._segments, position) - 1
        if index < 0:
            raise OSError(f"spool has no segment for offset {position}")
        return index

    def _read_head(self) -> int:
        path = self._dir / "head"
        first = self._segments[0] if self._segments else 0
        if not path.exists():
            return first
        data = path.read_bytes()
        if len(data) != _HEAD.size:
            self._move_head_aside(f"it is {len(data)} bytes long, expected {_HEAD.size}")
            return first
        head, crc = _HEAD.unpack(data)
        if zlib.crc32(data[:8]) != crc:
            self._move_head_aside("it fails its checksum")
            return first
        return max(head, first)

    def _move_head_aside(self, reason: str) -> None:
        """Rename the damaged head file to a free ``head.corrupt`` name, log and count it."""
        path = self._dir / "head"
        target = quarantine_path(path)
        os.replace(path, target)
        self.damaged_heads += 1
        first = self._segments[0] if self._segments else 0
        logger.error(
            "spool head file %s is damaged because %s; renamed it to %s and reading starts "
            "again at the oldest segment (offset %d), so messages that JetStream already "
            "acknowledged may be published again",
            path,
            reason,
            target,
            first,
        )

    def _list_segments(self) -> list[int]:
        segments = []
        for path in self._dir.glob(f"*{_SUFFIX}"):
            name = path.name.removesuffix(_SUFFIX)
            if name.isdigit():
                segments.append(int(name))
                continue
            target = path.with_name(path.name + QUARANTINE_SUFFIX)
            os.replace(path, target)
            self.damaged_segments += 1
            logger.error(
                "spool file %s is not named by an offset, so its contents cannot be placed; "
                "renamed it to %s",
                path,
                target,
            )
        return sorted(segments)

    def _recover(self) -> tuple[int, int]:
        """Scan and repair the segments from the head on, and return the tail and record count."""
        if not self._segments:
            return self._head, 0
        first = max(0, bisect.bisect_right(self._segments, self._head) - 1)
        records = 0
        tail = self._head
        for index in range(first, len(self._segments)):
            start = self._segments[index]
            last = index == len(self._segments) - 1
            scan = scan_segment(
                self._segment_path(start),
                max(0, self._head - start),
                None if last else self._segments[index + 1] - start,
            )
            records += scan.records
            tail = start + scan.size
            if scan.lost_bytes:
                self.damaged_segments += 1
                self.lost_bytes += scan.lost_bytes
        return tail, records

    def _repair(self, index: int) -> None:
        """Repair segment ``index``, found damaged after the spool opened, and count again."""
        start = self._segments[index]
        last = index == len(self._segments) - 1
        end = self._tail if last else self._segments[index + 1]
        if last and self._writer is not None:
            # The repair replaces the file, so appends must go to the new one.
            self._writer.close()
            self._writer = None
        scan = scan_segment(self._segment_path(start), max(0, self._head - start), end - start)
        if last:
            self._writer = open(self._segment_path(start), "ab", opener=private_opener)
        if not scan.lost_bytes:
            raise OSError(f"spool segment {self._segment_path(start)} cannot be read")
        self.damaged_segments += 1
        self.lost_bytes += scan.lost_bytes
        self._pending_records = self._count_records()

    def _count_records(self) -> int:
        count = 0
        position = self._head
        while position < self._tail:
            batch = self._read_at(position, 4096)
            if not batch:
                break
            count += len(batch)
            position = batch[-1].end
        return count

    def _write_head(self) -> None:
        path = self._dir / "head"
        temporary = self._dir / "head.tmp"
        packed = struct.pack(">Q", self._head)
        with open(temporary, "wb", opener=private_opener) as file:
            file.write(packed + struct.pack(">I", zlib.crc32(packed)))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)

    def _delete_consumed_segments(self) -> None:
        while len(self._segments) > 1 and self._segments[1] <= self._head:
            os.unlink(self._segment_path(self._segments.pop(0)))

    def _fsync_directory(self) -> None:
        descriptor = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None
