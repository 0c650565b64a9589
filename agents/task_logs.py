"""The size limit of task logs: keep the start and the latest output, drop the middle.

A task writes its standard output and error straight into its log file, which the launcher
opens with ``O_APPEND``, so no process or thread of the agent's copies the output. The agent
checks the size of each running task's log every second (``Intervals.log_check_s``) and when a
task ends. A log over the limit is trimmed in place, in a worker thread. The log's first
quarter of the limit stays, followed by a marker line with the number of bytes dropped, then
the latest quarter of the limit or a little more.

The trim removes the middle with ``fallocate(FALLOC_FL_COLLAPSE_RANGE)``, which shifts the
rest of the file down under the inode's lock, the same lock that an ``O_APPEND`` write takes.
So a write of the task lands either before the collapse, and moves with the tail, or after it,
at the new end: the trim loses nothing that the task writes while it runs. The file system may
first write the kept tail's dirty pages to disk, and the task's writes then wait for that.
Because the collapsed range must start and end on file system blocks (``st_blksize``), the kept
start runs on to the block boundary where the marker ends, and the kept tail starts on a block
boundary.

So a log contains between a quarter and all of the limit of the latest output, and it grows past
the limit by at most what the task writes between two checks. A log trimmed again keeps its
start and its marker, whose count then covers every trim.

Collapsing is available since Linux 3.15, on ext4 (with extents) and XFS (fallocate(2)). On
other file systems, such as tmpfs, the trim copies the tail down behind the marker, copies
again what the task appended meanwhile, and truncates the file after the last copy.

NOTE: on a file system without collapsing, output that the task writes between the trim's last
size check and its truncation is dropped without being counted in the marker. That window is
two system calls, plus any wait for the GIL between them because the trim runs in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

TASK_LOG_MAX_BYTES: Final = 256 << 20
"""Default of ACSP_AGENT_TASK_LOG_MAX_BYTES."""
MIN_TASK_LOG_MAX_BYTES: Final = 64 << 10
"""Smallest limit: the kept start and tail are a quarter of it each, so 16 KiB at least."""
_MARKER = re.compile(rb"\n\[acsp agent: (\d+) bytes of output dropped here[^\n]*\] *\n")
"""A marker line. Spaces before its newline pad it to the block boundary where it ends."""
_MARKER_MAX_BYTES: Final = 256
_MAX_HEAD_SHRINK: Final = 64
"""Bytes of the kept start that a longer count in a marker may take over, at most. Beyond that
the marker moves to the next block boundary instead, so the start stays."""
_COPY_CHUNK_BYTES: Final = 1 << 20
_SIZE_CHECKS: Final = 3
"""Maximum number of times a trim without collapsing copies what the task appended meanwhile."""
_FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
"""From ``linux/falloc.h``."""
_NO_COLLAPSE_ERRNOS: Final = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
)
"""Errors of a collapse that the copying trim handles instead: a file system without it, a
block size other than ``st_blksize``, or a task that truncated its log meanwhile (EINVAL)."""


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
    descriptor, info = _open_log(path, os.O_RDONLY)
    try:
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
    written, and ``FileNotFoundError`` when the task removed it. Raises
    :class:`UnreadableLogError`, and changes nothing, when the path is a symbolic link, is not
    a regular file or belongs to another user.
    """
    # Without O_APPEND: pwrite on a descriptor opened with it writes at the end on Linux.
    descriptor, info = _open_log(path, os.O_RDWR)
    try:
        if info.st_size <= max_bytes:
            return 0
        return _trim(descriptor, max_bytes)
    finally:
        os.close(descriptor)


def _open_log(path: str, flags: int) -> tuple[int, os.stat_result]:
    """Open the log at ``path`` with ``flags`` and return the descriptor and its status.

    Raises :class:`UnreadableLogError` when the path is a symbolic link, is not a regular file
    or belongs to another user, and ``OSError`` when the open fails.
    """
    try:
        # O_NONBLOCK, so that a FIFO put in place of the log cannot block the open. It has no
        # effect on regular files (open(2)).
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
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
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, info


@dataclass(frozen=True, slots=True)
class _Marker:
    start: int
    """Offset of the marker's first byte in the log."""
    end: int
    """Offset just past its newline."""
    dropped: int
    """Bytes dropped that it counts."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """The marker of one trim, the offset it goes to, and the bytes the trim removes."""

    marker: bytes
    start: int
    """Offset where the marker is written, and where the kept start ends."""
    cut: int
    """Offset where the kept tail starts. The trim removes the bytes from the marker's end to it."""
    dropped: int
    """Bytes of output that this trim drops: those under the new marker and before ``cut``,
    other than those of the previous marker."""

    @property
    def end(self) -> int:
        return self.start + len(self.marker)


def _trim(descriptor: int, max_bytes: int) -> int:
    info = os.fstat(descriptor)
    block = max(1, info.st_blksize)
    plan = None
    if block <= max_bytes // 16:
        plan = _plan_trim(descriptor, max_bytes, info.st_size, block)
    if plan is None:
        # No room for whole blocks between the kept start and tail: copy without alignment.
        plan = _plan_trim(descriptor, max_bytes, info.st_size, 1)
    if plan is None:
        return 0
    # The marker goes in after the collapse, which moves nothing before plan.end, so a collapse
    # that fails leaves the log as it was, and the next trim does not count its bytes again.
    aligned = plan.end % block == 0 and plan.cut % block == 0
    collapsed = aligned and _collapse(descriptor, plan.end, plan.cut)
    os.pwrite(descriptor, plan.marker, plan.start)
    if not collapsed:
        _copy_tail_down(descriptor, plan.cut, plan.end)
    return plan.dropped


def _plan_trim(descriptor: int, max_bytes: int, size: int, block: int) -> _Plan | None:
    """Plan a trim of a log of ``size`` bytes whose marker ends and tail starts on ``block``.

    Returns None when the log is within ``max_bytes`` or no bytes lie between the two.
    """
    head = max_bytes // 4
    if size <= max_bytes:
        return None
    previous = _find_marker(descriptor, head, block)
    cut = (size - max_bytes // 4) // block * block
    before = 0 if previous is None else previous.dropped
    old_length = 0 if previous is None else previous.end - previous.start
    length = len(marker_line(before, max_bytes))
    # A longer count can make the marker longer, which can move its start and so the count.
    for _ in range(4):
        start, end = _marker_span(previous, head, length, block)
        dropped = cut - start - old_length
        marker = marker_line(before + dropped, max_bytes)
        marker = marker[:-1] + b" " * (end - start - len(marker)) + b"\n"
        if len(marker) == length:
            break
        length = len(marker)
    # A marker that did not settle on the span ends off the block, so the trim copies.
    plan = _Plan(marker, start, cut, dropped)
    if cut <= plan.end or dropped <= 0:
        return None
    return plan


def _marker_span(previous: _Marker | None, head: int, length: int, block: int) -> tuple[int, int]:
    """Return where a marker of ``length`` bytes goes: it ends on a block boundary.

    A first marker follows the first ``head`` bytes and the bytes up to the boundary. A later
    one ends where the previous one ended, so the kept start stays, unless it is too long for
    that. Shorter ones are padded to the previous length, because the caller pads to the span.
    """
    if previous is None:
        end = _round_up(head + length, block)
        return end - length, end
    if previous.end % block == 0 and previous.end - length >= head - _MAX_HEAD_SHRINK:
        return min(previous.start, previous.end - length), previous.end
    # A marker of an agent that trimmed without alignment, or a limit raised since.
    return previous.start, _round_up(max(previous.end, previous.start + length), block)


def _find_marker(descriptor: int, head: int, block: int) -> _Marker | None:
    """Return the marker of an earlier trim, which starts at ``head`` or ends on a block."""
    window_start = max(0, head - _MAX_HEAD_SHRINK)
    window = os.pread(descriptor, head - window_start + block + _MARKER_MAX_BYTES, window_start)
    for match in _MARKER.finditer(window):
        start = window_start + match.start()
        end = window_start + match.end()
        if start == head or end % block == 0:
            return _Marker(start, end, int(match.group(1)))
    return None


def _round_up(offset: int, block: int) -> int:
    return -(-offset // block) * block


@cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


def _collapse(descriptor: int, start: int, stop: int) -> bool:
    """Remove the bytes from ``start`` to ``stop`` from the file, and move the rest down.

    Returns False where the file system cannot, and raises ``OSError`` for other errors.
    """
    fallocate = _fallocate()
    if fallocate is None:
        return False
    if fallocate(descriptor, _FALLOC_FL_COLLAPSE_RANGE, start, stop - start) == 0:
        return True
    number = ctypes.get_errno()
    if number in _NO_COLLAPSE_ERRNOS:
        return False
    raise OSError(number, f"collapsing bytes {start} to {stop} failed: {os.strerror(number)}")


def _copy_tail_down(descriptor: int, source: int, target: int) -> None:
    """Copy the bytes from ``source`` to the end of the file to ``target``, then truncate there.

    Copies again what the task appended while it copied, up to :data:`_SIZE_CHECKS` times.
    """
    end = os.fstat(descriptor).st_size
    for _ in range(_SIZE_CHECKS):
        while source < end:
            chunk = os.pread(descriptor, min(_COPY_CHUNK_BYTES, end - source), source)
            if not chunk:
                break  # The task truncated its log.
            os.pwrite(descriptor, chunk, target)
            source += len(chunk)
            target += len(chunk)
        grown = os.fstat(descriptor).st_size
        if grown <= end:
            break
        end = grown
    os.ftruncate(descriptor, target)
