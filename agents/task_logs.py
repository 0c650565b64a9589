"""The size limit of task logs: keep the start and the latest output, drop the middle.

A task writes its standard output and error straight into its log file, which the launcher
opens with ``O_APPEND``, so no process or thread of the agent's copies the output. The agent
checks the size of each running task's log every second (``Intervals.log_check_s``) and when a
task ends. A log over the limit is trimmed in place, in a worker thread because the trim copies
up to a quarter of the limit. The log's first quarter of the limit stays, followed by a marker
line with the number of bytes dropped, then the latest quarter of the limit.
Because the task appends, its next write lands after the kept tail, at the new end of the file.

So a log contains between a quarter and all of the limit of the latest output, and it grows past
the limit by at most what the task writes between two checks. A log trimmed again keeps its
start and its marker, whose count then covers every trim.

NOTE: output that the task writes between the last size check of a trim and its truncation
is dropped without being counted in the marker. That window covers writing the kept tail back
(up to a quarter of the limit) and, because the trim runs in a worker thread, any wait for the
GIL between those system calls.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Final

TASK_LOG_MAX_BYTES: Final = 256 << 20
"""Default of ACSP_AGENT_TASK_LOG_MAX_BYTES."""
MIN_TASK_LOG_MAX_BYTES: Final = 64 << 10
"""Smallest limit: the kept start and tail are a quarter of it each, so 16 KiB at least."""
_MARKER = re.compile(rb"\n\[acsp agent: (\d+) bytes of output dropped here[^\n]*\]\n")
_MARKER_MAX_BYTES: Final = 256
_SIZE_CHECKS: Final = 3
"""Maximum number of times the tail is read again when the task wrote while it was read."""


@dataclass(frozen=True, slots=True)
class LogTail:
    """The end of a task's log."""

    data: bytes
    """The last bytes of the log, as the task wrote them."""
    truncated: bool
    """Whether ``data`` is less than the task wrote: the log is longer than ``data``, or a
    trim dropped part of it (its marker line is in ``data``)."""


class UnreadableLogError(OSError):
    """The path of a task's log is not a regular file that the agent owns."""


def read_tail(path: str, max_bytes: int) -> LogTail:
    """Read the last ``max_bytes`` of the log at ``path``, which blocks: call it in a thread.

    Raises ``FileNotFoundError`` when there is no log, and ``OSError`` when the read fails.
    Raises :class:`UnreadableLogError` when the path is a symbolic link, is not a regular file
    or belongs to another user, because a task running as another user may have replaced its
    log.

    NOTE: a read that overlaps a trim of the same log can return part of the bytes from
    before the trim and part from after it.
    """
    try:
        # O_NONBLOCK, so that a FIFO put in place of the log cannot block the open.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnreadableLogError(f"{path} is a symbolic link, not a task log") from None
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableLogError(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise UnreadableLogError(
                f"{path} belongs to uid {info.st_uid}, not to the agent's uid {os.geteuid()}"
            )
        start = max(0, info.st_size - max_bytes)
        chunks = []
        length = 0
        while length < max_bytes:
            chunk = os.pread(descriptor, max_bytes - length, start + length)
            if not chunk:
                break
            chunks.append(chunk)
            length += len(chunk)
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    return LogTail(data, start > 0 or _MARKER.search(data) is not None)


def marker_line(dropped: int, max_bytes: int) -> bytes:
    return (
        f"\n[acsp agent: {dropped} bytes of output dropped here because the log reached its "
        f"limit of {max_bytes} bytes, which keeps the start and the latest output]\n"
    ).encode()


def trim_log(path: str, max_bytes: int) -> int:
    """Trim the log at ``path`` if it is longer than ``max_bytes`` and return the bytes dropped.

    Returns 0 for a log within the limit. Raises ``OSError`` if the log cannot be read or
    written, and ``FileNotFoundError`` when the task removed it.
    """
    if os.stat(path).st_size <= max_bytes:
        return 0
    # Without O_APPEND: pwrite on a descriptor opened with it writes at the end on Linux.
    descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        return _trim(descriptor, max_bytes)
    finally:
        os.close(descriptor)


def _trim(descriptor: int, max_bytes: int) -> int:
    head = max_bytes // 4
    tail_bytes = max_bytes // 4
    previous = _MARKER.match(os.pread(descriptor, _MARKER_MAX_BYTES, head))
    dropped_before = 0 if previous is None else int(previous.group(1))
    middle_start = head if previous is None else head + previous.end()
    size = os.fstat(descriptor).st_size
    for _ in range(_SIZE_CHECKS):
        tail = os.pread(descriptor, tail_bytes, size - tail_bytes)
        grown = os.fstat(descriptor).st_size
        if grown == size:
            break
        size = grown
    if size <= max_bytes:
        return 0
    dropped = size - len(tail) - middle_start
    marker = marker_line(dropped_before + dropped, max_bytes)
    os.pwrite(descriptor, marker + tail, head)
    os.ftruncate(descriptor, head + len(marker) + len(tail))
    return dropped
