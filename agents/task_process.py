"""A task's process, and the wait for its exit on the agent's event loop.

asyncio's subprocess support (Python 3.11) starts one thread per child to wait for it, and a
transport and a protocol per process. An agent that starts hundreds of tasks per second spent
most of its CPU time there. Here the task starts with :class:`subprocess.Popen`, which uses
``vfork`` on Linux, and the event loop watches a pidfd of the process, which becomes readable
when the process exits (``os.pidfd_open``, Linux 5.3 and later). The same works for a process
that a restarted agent adopts and that is not its child. Where the kernel has no pidfds, the
caller polls :meth:`TaskProcess.check` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


class TaskProcess:
    """A running task process: our child (``popen`` set) or one adopted after a restart."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        """Done once the process has exited (and, for a child, was reaped)."""
        self._pidfd = -1
        self._watch()

    @property
    def returncode(self) -> int | None:
        """Exit code, or minus the signal number that ended it; None if unknown or running."""
        return None if self._popen is None else self._popen.returncode

    @property
    def is_child(self) -> bool:
        return self._popen is not None

    @property
    def polled(self) -> bool:
        """True when no pidfd watches the process, so the caller must call :meth:`check`."""
        return self._pidfd < 0 and not self.exited.done()

    async def wait(self) -> int | None:
        """Wait until the process exits; return :attr:`returncode`."""
        await asyncio.shield(self.exited)
        return self.returncode

    def check(self) -> bool:
        """Return True if the child has exited, reaping it; always False for an adopted one.

        An adopted process is not our child, so only its pidfd (or the caller, by its start
        time in ``/proc``) can tell that it ended.
        """
        if self.exited.done():
            return True
        if self._popen is None or self._popen.poll() is None:
            return False
        self._set_exited()
        return True

    def set_exited(self) -> None:
        """Mark an adopted process as ended (found so by the caller's own check)."""
        self._set_exited()

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            # Gone already: a child is still a zombie and check() reaps it.
            if self._popen is None or self._popen.poll() is not None:
                self._set_exited()
            return
        except (AttributeError, OSError) as error:
            logger.debug("no pidfd for pid %d (%s); polling it instead", self.pid, error)
            return
        self._loop.add_reader(self._pidfd, self._on_readable)

    def _on_readable(self) -> None:
        # A pidfd becomes readable when the process exits; a child is a zombie until reaped.
        if self._popen is not None and self._popen.poll() is None:
            return
        self._set_exited()

    def _set_exited(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.exited.done():
            self.exited.set_result(None)


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
) -> TaskProcess:
    """Start ``command`` in a new session with its output in ``log_path``.

    Raises ``OSError`` when the command cannot be started (not found, not executable).
    """
    asyncio.get_running_loop()  # Raise RuntimeError before the process starts, not after.
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        popen = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        os.close(log)
    return TaskProcess(popen.pid, popen)


def task_file_stem(task_id: str) -> str:
    """Turn a task id into a file name stem for the files of the task.

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``, and the stem
    is cut to 128 characters.
    """
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:128]


def find_task_leaders(variable: str, values: set[str]) -> dict[str, int]:
    """Find running session leaders whose environment sets ``variable`` to one of ``values``.

    Returns value -> pid. Processes whose environment cannot be read (another user's) are
    skipped. A task's descendants inherit its environment, so among several leaders with one
    value the earliest started (the task's own process, which :func:`spawn` made a session
    leader) is returned.
    """
    prefix = variable.encode() + b"="
    found: dict[str, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        fields = stat_fields(pid)
        # A session leader cannot leave its session, unlike its process group.
        if fields is None or fields[0] == b"Z" or int(fields[3]) != pid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                value = item[len(prefix) :].decode("utf-8", errors="replace")
                start_ticks = int(fields[19])
                if value in values and (value not in found or start_ticks < found[value][1]):
                    found[value] = (pid, start_ticks)
                break
    return {value: pid for value, (pid, _ticks) in found.items()}


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == b"Z":
        return None
    return int(fields[19])


def stat_fields(pid: int) -> list[bytes] | None:
    """Read the fields of ``/proc/<pid>/stat`` after the command name, or None if unreadable.

    The first is the state (``Z`` for a zombie), then ppid, pgrp, session, and at index 19
    the start time in clock ticks since boot.
    """
    if pid <= 0:
        return None
    try:
        descriptor = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        # One read returns the whole file: it is far shorter than the buffer.
        data = os.read(descriptor, 4096)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    # The command name (field 2) may contain spaces, so split after its closing parenthesis.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields if len(fields) > 19 else None
