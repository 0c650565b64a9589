"""A task's process, and the wait for its exit on the agent's event loop.

asyncio's subprocess support (Python 3.11) starts one thread per child to wait for it, and a
transport and a protocol per process. An agent that starts hundreds of tasks per second spent
most of its CPU time there. Here the task starts with :class:`subprocess.Popen`, which uses
``vfork`` on Linux, and the event loop watches a pidfd of the process, which becomes readable
when the process exits (``os.pidfd_open``, Linux 5.3 and later). The same works for a process
that a restarted agent adopts and that is not its child. Where the kernel has no pidfds, the
caller polls :meth:`TaskProcess.check` instead.

Only a process's parent can read its exit status, and an agent that restarts is no longer the
parent of the tasks it adopts. So each task runs under ``/bin/sh`` (:data:`EXIT_RECORDER`),
which waits for the command and writes its exit status to a file beside the task's log before
it exits with the same status. A restarted agent reads the file when an adopted task ends, or
at once for a task that ended while the agent was down, and reports the task as succeeded or
failed instead of lost. Measured with dash on a 2-core machine, the shell adds about 0.65 ms
of CPU per task to the 0.55 ms that spawning a bare ``true`` costs, so the agent setting
``ACSP_AGENT_RECORD_EXIT_STATUS`` can turn it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_RECORDER = 'trap : HUP INT TERM; f=$1; shift; "$@"; s=$?; echo "$s" > "$f"; exit "$s"'
"""Shell program that runs ``$2...`` and writes its exit status to the file ``$1``.

The shell traps the stop signals, so a task that handles SIGTERM (to save a checkpoint, say)
still has a shell waiting for it. A trapped signal is reset to its default in the command. The
shell reports death by signal N as the status 128 + N.
"""
_LAST_SIGNAL = signal.SIGRTMAX


class CommandNotRunnableError(Exception):
    """The task's command names no program that the task could execute.

    ``exit_code`` is the status a POSIX shell returns for such a command: 127 when the program
    is not found, 126 when it is found but cannot be executed.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error
        self.exit_code = 127 if isinstance(error, FileNotFoundError) else 126


class TaskProcess:
    """A running task process: our child (``popen`` set) or one adopted after a restart."""

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        exit_path: Path | None = None,
    ) -> None:
        self.pid = pid
        self._popen = popen
        self._exit_path = exit_path
        self._adopted_status: int | None = None
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        """Done once the process has exited (and, for a child, was reaped)."""
        self._pidfd = -1
        self._watch()

    @property
    def returncode(self) -> int | None:
        """Exit code, or minus the signal number that ended it; None if unknown or running.

        For an adopted process it is the status its shell recorded, read once it has exited.
        """
        if self._popen is None:
            return self._adopted_status
        status = self._popen.returncode
        if status is None or self._exit_path is None:
            return status
        # The shell's own death by a signal (a SIGKILL to the group) comes as a negative code.
        return status if status < 0 else from_shell_status(status)

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
        if self._popen is None and self._exit_path is not None and not self.exited.done():
            self._adopted_status = read_exit_status(self._exit_path)
        if not self.exited.done():
            self.exited.set_result(None)


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    exit_path: Path | None,
) -> TaskProcess:
    """Start ``command`` in a new session with its output in ``log_path``.

    With an ``exit_path``, the command runs under :data:`EXIT_RECORDER`, which writes its exit
    status there. A file left there by an earlier process is removed first. Raises
    :class:`CommandNotRunnableError` when the command names no executable program, and
    ``OSError`` when the node cannot start the process (the log file, a failed fork).
    """
    asyncio.get_running_loop()  # Raise RuntimeError before the process starts, not after.
    try:
        executable = find_executable(command[0], env.get("PATH", os.defpath), cwd)
    except OSError as error:
        raise CommandNotRunnableError(error) from error
    argv = [executable, *command[1:]]
    if exit_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(exit_path)
        # The shell runs in ``cwd``, where a path relative to the agent's folder is wrong.
        recorded = os.path.abspath(exit_path)
        argv = ["/bin/sh", "-c", EXIT_RECORDER, "acsp-task", recorded, *argv]
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        os.close(log)
    return TaskProcess(popen.pid, popen, exit_path)


def find_executable(name: str, search_path: str, cwd: Path) -> str:
    """Return the file that executing ``name`` runs: a path as given, else found on ``search_path``.

    The shell is given this file rather than the bare name, so that it runs the program and not
    a builtin of the same name (``echo``, ``kill``). Raises ``FileNotFoundError`` or
    ``PermissionError`` (both ``OSError``) as starting the command directly would.
    """
    if "/" in name:
        # Absolute, because the task runs in ``cwd`` and ``cwd`` may be relative to ours. Not
        # normalized, so that ``..`` after a symbolic link resolves as the kernel resolves it.
        candidate = os.path.join(os.getcwd(), cwd, name)
        if not os.path.exists(candidate):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    else:
        # A relative entry of the PATH (an empty one is the working directory) is taken from
        # the task's working directory, as execvp would take it from inside the task.
        base = os.path.join(os.getcwd(), cwd)
        entries = [os.path.join(base, entry) for entry in search_path.split(os.pathsep)]
        found = shutil.which(name, path=os.pathsep.join(entries))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "not found on the task's PATH", name)
        candidate = found
    if os.path.isdir(candidate) or not os.access(candidate, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    return candidate


def from_shell_status(status: int) -> int:
    """Turn a shell's exit status into an exit code, or minus the signal for 128 + N.

    A command that exits with 129 to 192 on its own cannot be distinguished from one killed by a
    signal, so it is reported as killed, following the convention of the shell.
    """
    if 128 < status <= 128 + _LAST_SIGNAL:
        return -(status - 128)
    return status


def read_exit_status(path: Path) -> int | None:
    """Return the exit code that :data:`EXIT_RECORDER` wrote to ``path``, or None if none."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    return from_shell_status(int(text))


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
