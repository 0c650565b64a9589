"""The lock that gives one ``acsp up`` at a time a data directory.

The mesh file names a running supervisor only once every service serves, so a second
``acsp up`` started on the same data directory before that finds none. It would then start a
second nats-server on the same JetStream store and record that server's port in
``run/nats.port`` in place of the first one's. The supervisor therefore takes an exclusive
``flock`` on ``mesh.lock`` before it writes anything in the directory, and holds it until every
process it started has stopped. The kernel releases the lock when the
supervisor ends, even on SIGKILL. The file is opened close-on-exec, so the children do not
hold it. ``acsp down`` finds the supervisor through the lock (:func:`lock_holder`), so it can
stop a mesh whose mesh file is missing or damaged.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_FILE_NAME: Final = "mesh.lock"
_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_HOLDER_MAX_BYTES: Final = 64


class DataDirLockedError(Exception):
    """Another process holds the lock of the data directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        super().__init__(f"{directory / LOCK_FILE_NAME} is locked by pid {pid}")
        self.directory = directory
        self.pid = pid
        """Pid that the holder wrote into the lock file, or None if it wrote none yet."""


class DataDirLock:
    """An exclusive lock on a mesh's data directory, held until :meth:`release` or exit."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor

    @classmethod
    def acquire(cls, directory: Path) -> DataDirLock:
        """Lock ``directory`` without waiting, and record this process's pid as the holder.

        Raises :class:`DataDirLockedError` when another process holds the lock, and
        ``OSError`` when the lock file cannot be opened, such as a symbolic link in its place.
        """
        descriptor = os.open(directory / LOCK_FILE_NAME, _FLAGS, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _recorded_pid(descriptor)
            os.close(descriptor)
            raise DataDirLockedError(directory, pid) from None
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        return cls(descriptor)

    def release(self) -> None:
        """Unlock the directory. A second call does nothing."""
        descriptor, self._descriptor = self._descriptor, -1
        if descriptor >= 0:
            os.close(descriptor)


def lock_holder(directory: Path) -> int | None:
    """Return the pid that the holder of ``directory``'s lock recorded, or None if none holds it.

    It is also None while the holder has not written its pid yet. The check takes a shared
    lock for a moment, and an ``acsp up`` that tries to lock the directory in that moment fails
    as if a mesh ran there. Raises ``OSError`` when the lock file exists but
    cannot be opened, such as a symbolic link in its place.
    """
    try:
        descriptor = os.open(directory / LOCK_FILE_NAME, _READ_FLAGS)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_pid(descriptor)
    finally:
        # Closing the descriptor also releases the shared lock.
        os.close(descriptor)
    return None


def _recorded_pid(descriptor: int) -> int | None:
    text = os.pread(descriptor, _HOLDER_MAX_BYTES, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
