"""Removal of what one user left in the node's shared scratch folders.

A job that runs as a pool user (``ACSP_AGENT_TASK_USERS``) may write to ``/tmp``, ``/var/tmp``
or ``/dev/shm`` by name (NCCL and PyTorch leave shared memory files there), and such files keep
its uid after it ends. Before the pool hands that uid to another job, the agent removes every
file, link and folder that the uid owns there (see :mod:`agents.scratch_folders`).

:func:`sweep_as` runs a sweep in the calling thread with that thread's file system uid and gid
switched to the user's (``setfsuid(2)``), so that the kernel checks each removal as if the user
made it. The kernel then keeps a sweep from removing other users' or root's entries in the
sticky scratch folders. A root agent loses its file capabilities while the switch lasts, so a
sweep reaches what the user's next job could reach. The walk also checks each entry's owner,
because a user may remove any entry of a folder it owns. It never follows a symbolic link:
folders are opened with ``O_NOFOLLOW`` relative to their parent, and a link that the user owns
is removed as a link. It enters no folder on another file system or under another mount point,
and removes none. It enters other users' folders that it may list, to find the user's files.

A folder of the user's nested deeper than :data:`MAX_DEPTH` folders is moved, as the user, into
the scratch folder under a fresh name (``.acsp-deep-<uid>-<random hex>``). The walk empties it
from there once it is done, so no tree of the user's is too deep to remove. The move is
a ``renameat2(2)`` relative to the open parent and scratch folders with ``RENAME_NOREPLACE``,
which never follows a link and never crosses a mount. The folder gets mode 0700 first, so that
no other user can enter it where it lands. A folder that another user swapped in under the
name before the move is moved back. A folder above a mount point is not moved.

NOTE: the move needs the user's write access to the scratch folder, as ``/tmp``, ``/var/tmp``
and ``/dev/shm`` give. In a listed folder that the user may not write, a folder of the user's
deeper than :data:`MAX_DEPTH` still keeps the user out of the pool.

NOTE: a file that the user wrote into another user's folder that it can search but not list
(mode 0711, say) is not found, yet the user's next job can still open it by its name. So is a
file below :data:`MAX_DEPTH` folders inside another user's folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

MAX_DEPTH = 128
"""Maximum folder depth below a scratch folder that a sweep enters. Each level keeps two file
descriptors open, so this bounds the sweep to 256 of them. A deeper folder of the user's is
moved up into the scratch folder and emptied from there."""

MOVED_FOLDER_PREFIX = ".acsp-deep-"
"""Start of the name of a folder that a sweep moved up into the scratch folder."""

MAX_REPORTED_FAILURES = 10
"""Failures listed by path in a report; the others are only counted."""

_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_ACCESS = stat.S_IRWXU
"""Mode bits that the user needs on its own folder to list it and remove its entries."""


@dataclass
class SweepReport:
    """Counts of the entries that one sweep removed, and the entries that it left."""

    files: int = 0
    """Entries removed that are not folders: files, symbolic links, sockets, pipes."""
    folders: int = 0
    bytes: int = 0
    """Sum of the sizes of the regular files removed."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of the first :data:`MAX_REPORTED_FAILURES` entries that were not removed."""
    failure_count: int = 0
    moved: int = 0
    """Folders nested deeper than :data:`MAX_DEPTH` that were moved up into the scratch folder."""

    def fail(self, path: str, reason: str) -> None:
        """Record an entry of the user that stays in place."""
        self.failure_count += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append((path, reason))


def sweep(
    folders: list[str],
    uid: int,
    mount_points: frozenset[str] | None = None,
    stop_reason: Callable[[], str] = lambda: "",
) -> SweepReport:
    """Remove every entry that ``uid`` owns inside ``folders``, which themselves stay.

    ``mount_points`` are the paths where file systems are mounted, read from
    ``/proc/self/mountinfo`` by default. A folder that does not exist is skipped. The sweep
    ends early, recording a failure, once ``stop_reason()`` returns a reason. Raises
    ValueError for uid 0.
    """
    if uid == 0:
        raise ValueError("uid 0 is root, whose files a sweep never removes")
    if mount_points is None:
        mount_points = read_mount_points()
    report = SweepReport()
    for folder in folders:
        try:
            descriptor = os.open(folder, _FOLDER_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as error:
            report.fail(folder, _reason(error))
            continue
        try:
            device = os.fstat(descriptor).st_dev
            walk = _Walk(uid, device, mount_points, report, stop_reason, descriptor, folder)
            walk.empty(descriptor, folder, 0)
            walk.empty_moved()
        finally:
            os.close(descriptor)
    return report


def sweep_as(
    uid: int, gid: int, folders: list[str], stop_reason: Callable[[], str] = lambda: ""
) -> SweepReport:
    """Run :func:`sweep` for ``uid`` in this thread, with its file system ids ``uid``:``gid``.

    Only the calling thread switches, and it switches back before this returns. The process
    needs root or CAP_SETUID and CAP_SETGID. Raises OSError when the switch fails.
    """
    mount_points = read_mount_points()
    with _file_system_ids(uid, gid):
        return sweep(folders, uid, mount_points, stop_reason)


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
"""``renameat2(2)``, in glibc since 2.28, or None."""
if _renameat2 is not None:
    _renameat2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    _renameat2.restype = ctypes.c_int
_RENAME_NOREPLACE = 1
"""Flag of ``renameat2(2)`` (``linux/fs.h``): fail with EEXIST if the new name exists."""


@contextlib.contextmanager
def _file_system_ids(uid: int, gid: int) -> Iterator[None]:
    """Switch this thread's file system uid and gid for the ``with`` block.

    ``setfsuid`` and ``setfsgid`` return the previous id and report no error, so each switch is
    read back with an id of -1, which changes nothing.
    """
    old_gid = _switch(_libc.setfsgid, gid, "gid")
    try:
        old_uid = _switch(_libc.setfsuid, uid, "uid")
        try:
            yield
        finally:
            _switch(_libc.setfsuid, old_uid, "uid")
    finally:
        _switch(_libc.setfsgid, old_gid, "gid")


def _switch(call: Callable[[int], int], new: int, kind: str) -> int:
    old = call(new)
    if call(-1) != new:
        raise OSError(f"cannot switch the file system {kind} from {old} to {new}")
    return old


@dataclass
class _Walk:
    """One scratch folder's tree, walked through open folder descriptors."""

    uid: int
    device: int
    """Device of the scratch folder: a folder on another one is another file system."""
    mount_points: frozenset[str]
    report: SweepReport
    stop_reason: Callable[[], str]
    root: int
    """Open descriptor of the scratch folder."""
    root_path: str
    stopped: bool = False
    moved: list[str] = field(default_factory=list)
    """Names in the scratch folder of the folders moved there and not yet emptied."""

    def empty(self, descriptor: int, path: str, depth: int) -> None:
        """Remove the user's entries in the open folder ``descriptor`` and in its subfolders."""
        try:
            entries = os.scandir(descriptor)
        except OSError as error:
            self.report.fail(path, _reason(error))
            return
        # An entry removed after the listing returned it does not disturb the listing.
        with entries:
            for entry in entries:
                if self.stopped or self._stop(path):
                    return
                self.remove(descriptor, entry.name, os.path.join(path, entry.name), depth)

    def empty_moved(self) -> None:
        """Remove the folders that the walk moved up into the scratch folder, and their entries.

        Runs after the walk of the scratch folder, when no descriptor of a deep tree is open. A
        moved folder that is again too deep moves again, so each pass goes :data:`MAX_DEPTH` folders
        further down.
        """
        while self.moved and not self.stopped:
            name = self.moved.pop()
            self.remove(self.root, name, os.path.join(self.root_path, name), 0)

    def _stop(self, path: str) -> bool:
        reason = self.stop_reason()
        if reason:
            self.stopped = True
            self.report.fail(path, reason)
        return self.stopped

    def remove(self, parent: int, name: str, path: str, depth: int) -> None:
        """Remove ``name`` in the open folder ``parent`` if the user owns it, and look inside
        it if it is a folder."""
        if depth == 0 and name in self.moved:
            # Moved up while the scratch folder was being listed, and emptied after the walk.
            return
        try:
            status = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError:
            # Another user's folder that the user may list but not search, because the user's
            # own folders get search permission first. Its entries are out of the user's reach.
            return
        if status.st_dev != self.device or path in self.mount_points:
            return
        owned = status.st_uid == self.uid
        if stat.S_ISDIR(status.st_mode):
            if depth >= MAX_DEPTH:
                if owned:
                    self._move_up(parent, name, path, status)
                return
            failures = self.report.failure_count
            self._enter(parent, name, path, status, depth + 1)
            # A folder with an entry that the walk could not remove is not empty.
            if not owned or self.stopped or self.report.failure_count > failures:
                return
            try:
                os.rmdir(name, dir_fd=parent)
            except FileNotFoundError:
                return
            except OSError as error:
                self.report.fail(path, _reason(error))
                return
            self.report.folders += 1
            return
        if not owned:
            return
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as error:
            self.report.fail(path, _reason(error))
            return
        self.report.files += 1
        if stat.S_ISREG(status.st_mode):
            self.report.bytes += status.st_size

    def _enter(self, parent: int, name: str, path: str, status: os.stat_result, depth: int) -> None:
        """Empty the subfolder ``name`` of ``parent`` of the user's entries."""
        owned = status.st_uid == self.uid
        try:
            # O_PATH needs no access to the folder itself, and O_NOFOLLOW with O_DIRECTORY
            # fails on a symbolic link that replaced the folder since it was read.
            handle = os.open(name, _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as error:
            self._fail_if_owned(path, error, owned)
            return
        try:
            opened = os.fstat(handle)
            if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
                # Replaced since it was read, by a user that may write in the parent folder.
                # The next sweep looks at the replacement.
                self._fail_if_owned(path, OSError("replaced during the sweep"), owned)
                return
            if owned and opened.st_mode & _OWNER_ACCESS != _OWNER_ACCESS:
                # The user's own folder that it made unreadable: the owner may change its mode.
                # The path names the folder that the handle holds, never a link's target.
                os.chmod(f"/proc/self/fd/{handle}", stat.S_IMODE(opened.st_mode) | _OWNER_ACCESS)
            descriptor = os.open(".", _FOLDER_FLAGS, dir_fd=handle)
        except OSError as error:
            self._fail_if_owned(path, error, owned)
            return
        finally:
            os.close(handle)
        try:
            self.empty(descriptor, path, depth)
        finally:
            os.close(descriptor)

    def _move_up(self, parent: int, name: str, path: str, status: os.stat_result) -> None:
        """Move the user's folder ``name`` of ``parent``, which is too deep to enter, into the
        scratch folder under a fresh name, for :meth:`empty_moved`."""
        below = path + "/"
        if any(point.startswith(below) for point in self.mount_points):
            # Its new path would hide the mount point from the path checks of the walk.
            self.report.fail(path, f"nested deeper than {MAX_DEPTH} folders, above a mount point")
            return
        try:
            handle = os.open(name, _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as error:
            self.report.fail(path, _reason(error))
            return
        try:
            opened = os.fstat(handle)
            if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
                self.report.fail(path, "replaced during the sweep")
                return
            # Moving a folder to another parent changes its ".." entry, which needs write
            # access to it. Mode 0700 also keeps other users out of it in the scratch folder.
            os.chmod(f"/proc/self/fd/{handle}", _OWNER_ACCESS)
            fresh = f"{MOVED_FOLDER_PREFIX}{self.uid}-{secrets.token_hex(8)}"
            _rename_no_replace(parent, name, self.root, fresh)
        except OSError as error:
            self.report.fail(path, _reason(error))
            return
        finally:
            os.close(handle)
        self._check_moved(parent, name, path, fresh, opened)

    def _check_moved(
        self, parent: int, name: str, path: str, fresh: str, expected: os.stat_result
    ) -> None:
        """Queue the folder moved to ``fresh`` for :meth:`empty_moved` if it is the one
        expected, or move it back to ``name`` of ``parent``.

        Another user who may write in ``parent`` can swap its own entry in under ``name``
        between the check and the move. The move runs with the user's access, so it moves
        nothing that the user's next job could not move.
        """
        fresh_path = os.path.join(self.root_path, fresh)
        try:
            moved = os.stat(fresh, dir_fd=self.root, follow_symlinks=False)
        except OSError as error:
            self.report.fail(fresh_path, _reason(error))
            return
        if (moved.st_dev, moved.st_ino) == (expected.st_dev, expected.st_ino):
            self.report.moved += 1
            self.moved.append(fresh)
            return
        try:
            _rename_no_replace(self.root, fresh, parent, name)
        except OSError as error:
            self.report.fail(fresh_path, f"moved from {path} and not moved back: {_reason(error)}")
            return
        self.report.fail(path, "replaced during the sweep")

    def _fail_if_owned(self, path: str, error: OSError, owned: bool) -> None:
        """Record ``error`` on ``path`` if the user owns it. Another user's folder that the
        user cannot open is out of reach of its next job as well."""
        if owned:
            self.report.fail(path, _reason(error))


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _rename_no_replace(old_parent: int, old: str, new_parent: int, new: str) -> None:
    """Rename ``old`` in the open folder ``old_parent`` to ``new`` in ``new_parent``, failing
    with EEXIST instead of replacing an entry named ``new``.

    Neither name is followed if it is a symbolic link. Raises OSError, also with ENOSYS when
    the C library has no ``renameat2``, and EINVAL on a file system without
    ``RENAME_NOREPLACE``.
    """
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is missing from the C library")
    result = _renameat2(
        old_parent, os.fsencode(old), new_parent, os.fsencode(new), _RENAME_NOREPLACE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def read_mount_points(mountinfo: str = "/proc/self/mountinfo") -> frozenset[str]:
    """Return the mount points of this process's mount namespace.

    The fifth field of each line is the mount point, with space, tab, newline and backslash
    written as octal escapes (``proc(5)``).
    """
    points = set()
    with open(mountinfo, "rb") as file:
        for line in file:
            fields = line.split(b" ")
            if len(fields) > 4:
                points.add(os.fsdecode(_unescape(fields[4])))
    return frozenset(points)


def _unescape(field: bytes) -> bytes:
    parts = field.split(b"\\")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 3 and part[:3].isdigit():
            out.append(bytes([int(part[:3], 8)]) + part[3:])
        else:
            out.append(b"\\" + part)
    return b"".join(out)
