"""Repair of damaged spool segments when the spool opens.

A segment is damaged when a record inside the range that its name and the next segment's name
give fails to decode: bytes flipped on disk, a file cut short or emptied, random bytes. The
repair keeps every intact record at its offset, so the spool's head (an offset) and the order
of replay stay valid and no acknowledged record is read again. It copies the whole original
file to ``<segment>.corrupt`` first, so nothing is deleted, then replaces each damaged range
with a padding record of the same size that readers skip.

Damage in the last segment with no intact record after it is a torn tail, which a crash
during an append leaves. The repair copies those bytes aside too and cuts them off, because
the next append continues at that point.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from agents.private_files import private_opener
from agents.spool_format import (
    MIN_RECORD_BYTES,
    decode_record,
    find_record,
    padding_record,
)

logger = logging.getLogger(__name__)

QUARANTINE_SUFFIX = ".corrupt"


@dataclass(slots=True)
class SegmentScan:
    """Result of scanning one segment from its scanned offset on, after any repair."""

    records: int = 0
    """Intact records, padding not counted."""
    size: int = 0
    """Length of the segment file after the repair."""
    lost_bytes: int = 0
    """Bytes of the nominal range that held no intact record, moved aside or missing."""
    damaged: list[tuple[int, int]] = field(default_factory=list)
    """Damaged ranges ``[start, end)`` as offsets in the file."""


def scan_segment(path: Path, begin: int, nominal_size: int | None) -> SegmentScan:
    """Scan the segment at ``path`` from offset ``begin`` on, and repair it if damaged.

    ``nominal_size`` is the distance to the next segment's first offset, or None for the last
    segment, whose end is where its intact records end.
    """
    data = path.read_bytes()
    limit = len(data) if nominal_size is None else min(len(data), nominal_size)
    view = memoryview(data)[:limit]
    scan = SegmentScan()
    records: list[tuple[int, int]] = []
    offset = begin
    while offset < limit:
        decoded = decode_record(view, offset)
        if decoded is not None:
            if not decoded[0].is_padding:
                records.append((offset, decoded[1]))
            offset += decoded[1]
            continue
        found = find_record(data[:limit], offset + 1)
        end = limit if found is None else found
        scan.damaged.append((offset, end))
        offset = end
    if nominal_size is None:
        size = _torn_tail_start(scan.damaged, limit)
    else:
        size = nominal_size
        if len(data) != nominal_size:
            # Cut short (missing bytes) or too long (bytes past the next segment's start).
            _add_range(scan.damaged, min(len(data), nominal_size), max(len(data), nominal_size))
    ranges = _widen_short_ranges(scan.damaged, records, begin, size)
    scan.damaged = ranges
    scan.records = sum(1 for start, _ in records if not any(a <= start < b for a, b in ranges))
    scan.size = size
    # Bytes past ``size``: a torn tail of the last segment, or bytes of an older segment past
    # the next segment's start. Both are moved aside, but only the latter count as lost.
    extra = max(0, len(data) - size)
    scan.lost_bytes = sum(end - start for start, end in ranges)
    lost_ranges = [f"{start}-{end}" for start, end in ranges]
    if nominal_size is not None and extra:
        scan.lost_bytes += extra
        lost_ranges.append(f"{size}-{len(data)}")
    if not ranges and not extra:
        return scan
    quarantine = _quarantine(path)
    _rewrite(path, data, ranges, size)
    if scan.lost_bytes:
        logger.error(
            "spool segment %s is damaged: %d bytes at file offsets %s hold no intact record "
            "and are lost; kept %d intact records after offset %d, and the original file as %s",
            path,
            scan.lost_bytes,
            ", ".join(lost_ranges),
            scan.records,
            begin,
            quarantine,
        )
    if nominal_size is None and extra:
        # A crash during an append leaves such a tail, so this is not an error.
        logger.warning(
            "spool segment %s ends in a torn record at offset %d; cut %d bytes, kept in %s",
            path,
            size,
            extra,
            quarantine,
        )
    return scan


def _torn_tail_start(damaged: list[tuple[int, int]], limit: int) -> int:
    """Return where the last segment's intact records end, dropping a torn tail from ``damaged``."""
    if damaged and damaged[-1][1] == limit:
        return damaged.pop()[0]
    return limit


def _add_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    if ranges and ranges[-1][1] >= start:
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
    else:
        ranges.append((start, end))


def _widen_short_ranges(
    damaged: list[tuple[int, int]], records: list[tuple[int, int]], begin: int, size: int
) -> list[tuple[int, int]]:
    """Merge touching ranges and widen each to hold a padding record, over neighbouring records.

    A range shorter than a record only arises when bytes were inserted or removed, shifting
    what follows. It grows over the next intact record, or the previous one at the file's end,
    or else over everything from ``begin`` to ``size``.
    """
    ranges: list[tuple[int, int]] = []
    for start, end in sorted(damaged):
        end = min(end, size)
        if start >= end:
            continue
        while end - start < MIN_RECORD_BYTES:
            after = [offset + length for offset, length in records if offset == end]
            before = [offset for offset, length in records if offset + length == start]
            if after:
                end = after[0]
            elif before:
                start = before[0]
            else:
                # NOTE: a range from begin to size still shorter than a record (only if the
                # head is that close to the next segment) is filled with zero bytes, which a
                # reader reports as a corrupt segment.
                return [(begin, size)]
        if ranges and ranges[-1][1] >= start:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((start, end))
    return ranges


def quarantine_path(path: Path) -> Path:
    """Return ``<path>.corrupt``, or ``<path>.corrupt.<n>`` with the lowest free ``n``."""
    target = path.with_name(path.name + QUARANTINE_SUFFIX)
    number = 0
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}.{number}")
    return target


def _quarantine(path: Path) -> Path:
    """Copy the segment to a ``.corrupt`` file beside it that no earlier repair uses."""
    target = quarantine_path(path)
    temporary = target.with_name(target.name + ".tmp")
    with open(temporary, "wb", opener=private_opener) as file:
        file.write(path.read_bytes())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
    return target


def _rewrite(path: Path, data: bytes, ranges: list[tuple[int, int]], size: int) -> None:
    """Replace the segment by its intact bytes with padding in each damaged range."""
    parts: list[bytes] = []
    offset = 0
    for start, end in ranges:
        parts.append(data[offset:start])
        if end - start >= MIN_RECORD_BYTES:
            parts.append(padding_record(end - start))
        else:
            parts.append(bytes(end - start))
        offset = end
    parts.append(data[offset:size])
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb", opener=private_opener) as file:
        file.write(b"".join(parts))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
