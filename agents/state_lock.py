"""The lock that gives one process at a time an agent's state folder, and the agent's pid file.

Two agents on one state folder would both append to its spool, and the later one would cut
off as damaged a record that the first was still writing. Both would also report the same
tasks, so metering would receive overlapping usage samples. An agent therefore takes an
exclusive ``flock`` on ``agent.lock`` in the folder before it opens its state file or its
spool, and holds it until it stops. The kernel releases the lock when the process ends,
even on SIGKILL, so a crash leaves no stale lock behind. The lock file is opened
close-on-exec, as Python opens every file, so the task launcher and the tasks that outlive a
killed agent do not hold the lock.

The holder writes its pid and a label into the file, so that a process that finds the
folder locked can name the holder. The file stays after the holder exits, because only the
lock counts: deleting the file could let two processes lock two different files of one name.

``acsp agent clear-health`` and ``acsp agent spool`` take the same lock while they write to
the folder (opening the spool may repair it), so they neither change the files of a running
agent nor race an agent that starts meanwhile.

``agent.pid`` names the running agent for operators and tools. A process removes it on exit
only if the file still names that process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Final

from agents.private_files import PRIVATE_FILE_MODE
from services.runtime.errors import StartupError

logger = logging.getLogger(__name__)

LOCK_FILE_NAME: Final = "agent.lock"
PID_FILE_NAME: Final = "agent.pid"
AGENT_LABEL: Final = "the agent"
"""Label that the lock file records for an agent process."""
AGENT_FIX: Final = (
    "stop that agent first, because two agents on one folder damage its spool and report its "
    "tasks twice, or give this agent a folder of its own with --state-dir (ACSP_AGENT_STATE_DIR)"
)
_HOLDER_MAX_BYTES: Final = 4096
_LOCK_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class StateFolderLockedError(StartupError):
    """A state folder locked by another process; ``str()`` names the folder, the pid and the fix."""

    def __init__(self, directory: Path, pid: int | None, label: str, fix: str) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"state folder {directory}",
            f"in use by {label or 'another process'} ({holder}), which holds the lock on "
            f"{directory / LOCK_FILE_NAME}",
            fix,
        )
        self.directory = directory
        self.pid = pid
        """Pid of the holder as its lock file records it, or None if the file names none."""
        self.label = label


class StateFolderLock:
    """An exclusive lock on an agent's state folder, held until :meth:`release` or exit."""

    def __init__(self, directory: Path, file: BinaryIO) -> None:
        self.directory = directory
        self._file: BinaryIO | None = file

    @classmethod
    def acquire(
        cls, directory: Path, label: str = AGENT_LABEL, fix: str = AGENT_FIX
    ) -> StateFolderLock:
        """Lock ``directory`` without waiting, and record this process as the holder.

        Raises :class:`StateFolderLockedError`, with ``fix`` as its fix, when another process
        holds the lock, and :class:`StartupError` when the lock file cannot be opened or locked.
        """
        path = directory / LOCK_FILE_NAME
        file = _open_lock_file(path)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, holder = _read_holder(file)
            file.close()
            raise StateFolderLockedError(directory, pid, holder, fix) from None
        except OSError as error:
            file.close()
            raise StartupError(
                f"lock file {path}",
                f"cannot be locked: {error.strerror or error}",
                "put the state folder on a file system that supports flock, such as a local disk",
            ) from None
        _give_to_folder_owner(file, directory)
        file.truncate(0)
        file.write(f"{os.getpid()}\n{label}\n".encode())
        file.flush()
        logger.debug("locked state folder %s", directory)
        return cls(directory, file)

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Unlock the folder. A second call does nothing."""
        file, self._file = self._file, None
        if file is not None:
            # Closing the only descriptor of the open file releases the flock.
            file.close()


def _open_lock_file(path: Path) -> BinaryIO:
    """Open the lock file, creating it, in append mode so the holder's record stays.

    The file must be a regular file with no other name: root may lock a folder that another
    user owns, and a link planted there would make the lock truncate and chown its target.
    """
    try:
        descriptor = os.open(path, _LOCK_FLAGS, PRIVATE_FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StartupError(
                f"lock file {path}",
                "is a symbolic link, which the lock does not follow",
                "remove it, and the next start creates a plain file",
            ) from None
        raise StartupError(
            f"lock file {path}",
            f"cannot be opened: {error.strerror or error}",
            "give this user write access to the agent's state folder",
        ) from None
    info = os.fstat(descriptor)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink != 1:
        problem = f"has other names ({info.st_nlink} hard links)"
    if problem is not None:
        os.close(descriptor)
        raise StartupError(
            f"lock file {path}", problem, "remove it, and the next start creates a plain file"
        )
    return os.fdopen(descriptor, "a+b")


def _give_to_folder_owner(file: BinaryIO, directory: Path) -> None:
    """Make the folder's owner own the lock file when root created it, e.g. under sudo.

    Otherwise an agent running as that owner could no longer open the file to lock it.
    """
    if os.geteuid() != 0:
        return
    folder = os.stat(directory)
    if os.fstat(file.fileno()).st_uid != folder.st_uid:
        os.fchown(file.fileno(), folder.st_uid, folder.st_gid)


def _read_holder(file: BinaryIO) -> tuple[int | None, str]:
    """Return the pid and label that the holder wrote, or None and "" where they are missing.

    The holder writes them just after it takes the lock, so a reader in between finds none.
    """
    file.seek(0)
    lines = file.read(_HOLDER_MAX_BYTES).decode("utf-8", errors="replace").splitlines()
    pid_text = lines[0].strip() if lines else ""
    label = lines[1].strip() if len(lines) > 1 else ""
    return (int(pid_text) if pid_text.isdigit() else None), label


def write_pid_file(directory: Path) -> Path:
    """Write this process's pid to ``agent.pid`` in ``directory`` and return the file's path."""
    path = directory / PID_FILE_NAME
    # Written beside it and renamed over it, which replaces a link itself, not its target.
    # mkstemp creates it with mode 0600, which keeps it from other users of a shared folder.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{PID_FILE_NAME}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def remove_pid_file(directory: Path) -> None:
    """Remove ``agent.pid`` from ``directory`` if it names this process, else leave it."""
    path = directory / PID_FILE_NAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return
    if text != str(os.getpid()):
        logger.warning(
            "%s names pid %r, not this agent's pid %d, so it was left in place",
            path,
            text,
            os.getpid(),
        )
        return
    path.unlink(missing_ok=True)
