"""A task's process, and the wait for its exit on the agent's event loop.

asyncio's subprocess support (Python 3.11) starts one thread per child to wait for it, and a
transport and a protocol per process. An agent that starts hundreds of tasks per second spent
most of its CPU time there. Here the event loop watches a pidfd of the process, which becomes
readable when the process exits (``os.pidfd_open``, Linux 5.3 and later). The same works for a
process that a restarted agent adopts and that is not its child. Where the kernel has no
pidfds, the caller polls :meth:`TaskProcess.check` instead.

Only a process's parent can read its exit status, and an agent that restarts is no longer the
parent of the tasks it adopts. So by default the tasks are started by a task launcher
(:mod:`agents.launcher`, driven by :class:`TaskLauncher`), a small process that outlives the
agent. It writes each task's exit status to a file beside the task's log. A restarted agent
reads the file when an adopted task ends, or at once for a task that ended while the agent was
down, so it reports the task as succeeded or failed instead of lost. With the agent setting
``ACSP_AGENT_RECORD_EXIT_STATUS`` off, the agent starts each task itself with
:class:`subprocess.Popen` (which uses ``vfork`` on Linux unless it switches the user) and
records nothing.

Earlier agents ran each task under ``/bin/sh``, which wrote the same file; such a task is
adopted like any other.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agents.launcher import restore_glibc_signals
from agents.programs import resolve_command, unrunnable_command
from agents.task_user import TaskUser

logger = logging.getLogger(__name__)

_LAST_SIGNAL = signal.SIGRTMAX
_STATUS_WAIT_S = 2.0
"""Maximum seconds to wait for a live launcher to record the status of an adopted task."""
_STATUS_POLL_S = 0.02
_LAUNCHER_EXIT_POLL_S = 0.02
_REPLY_TIMEOUT_S = 10.0
"""Seconds a launcher with start requests pending may send nothing before it is replaced.

A launcher replies to each chunk of requests it reads (up to 1 MiB) after starting them all,
so the bound is far above the time such a chunk takes.
"""
_REPLY_CHECKS = 10
"""Checks of the launcher's silence per reply timeout.

The silence is counted in checks rather than read off the clock, so that time in which the
agent itself did not run (stopped, or its event loop busy) counts once at most.
"""


class LauncherLostError(OSError):
    """The error of a start that got no reply because the task launcher went away.

    Whether the task started is unknown. A launcher that stopped replying may still run, and
    may start the task later as it finishes the request it was handling.
    """


class TaskProcess:
    """A running task process, known in one of three ways.

    - our child (``popen`` set), started with the launcher off;
    - launched: a child of this agent's :class:`TaskLauncher`, which reports its exit;
    - adopted: started by an earlier agent (or by a launcher that has gone away). Its pidfd
      signals its end, and its exit status comes from the file at ``exit_path``.
      ``recorder`` names the process that will write that file (pid and start ticks), so
      that the status is awaited while that process lives.
    """

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        exit_path: Path | None = None,
        launched: bool = False,
        recorder: tuple[int, int] | None = None,
    ) -> None:
        self.pid = pid
        self._popen = popen
        self._exit_path = exit_path
        self._launched = launched
        self._recorder = recorder
        self._status: int | None = None
        self.adopted: tuple[int, ...] | None = None
        """The launcher's children that it did not start, as listed when it reaped this
        process; None when no launcher reported the exit."""
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        """Done once the process has exited (and, for a child, was reaped)."""
        self._pidfd = -1
        self._status_deadline = 0.0
        if not launched:
            self._watch()

    @property
    def returncode(self) -> int | None:
        """Exit code, or minus the signal number that ended it; None if unknown or running.

        For an adopted process it is the status its launcher (or shell) recorded.
        """
        if self._popen is not None:
            return self._popen.returncode
        return self._status

    @property
    def is_child(self) -> bool:
        return self._popen is not None

    @property
    def polled(self) -> bool:
        """True when nothing reports the exit, so the caller must call :meth:`check`."""
        return not self._launched and self._pidfd < 0 and not self.exited.done()

    async def wait(self) -> int | None:
        """Wait until the process exits; return :attr:`returncode`."""
        await asyncio.shield(self.exited)
        return self.returncode

    def check(self) -> bool:
        """Return True if the child has exited, reaping it; False for a process not our child.

        Only its pidfd, its launcher, or the caller (by its start time in ``/proc``) can tell
        that a process that is not our child ended.
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

    def set_launcher_status(self, status: int, adopted: tuple[int, ...] = ()) -> None:
        """Record the exit that the launcher reported for a launched process."""
        if not self.exited.done():
            self._status = status
            self.adopted = adopted
            self.exited.set_result(None)

    def orphan(self, exit_path: Path, recorder: tuple[int, int]) -> None:
        """Watch a launched process whose launcher went away as an adopted one.

        ``recorder`` is that launcher, which may still be running and record the exit status.
        """
        if self._launched and not self.exited.done():
            self._launched = False
            self._exit_path = exit_path
            self._recorder = recorder
            self._watch()

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
        if self.exited.done():
            return
        if self._popen is None and self._exit_path is not None:
            self._status = read_exit_status(self._exit_path)
            if self._status is None and recorder_alive(self._recorder):
                # The task has ended, and its launcher writes the status once it reaps it.
                if not self._status_deadline:
                    self._status_deadline = self._loop.time() + _STATUS_WAIT_S
                if self._loop.time() < self._status_deadline:
                    self._loop.call_later(_STATUS_POLL_S, self._set_exited)
                    return
                logger.warning("no exit status recorded for pid %d in time", self.pid)
        self.exited.set_result(None)


class TaskLauncher:
    """The agent's side of the task launcher (:mod:`agents.launcher`).

    One launcher serves every node of an agent process. It starts on the first
    :meth:`launch`, and again after it has gone away. Requests wait in a buffer and go out
    together once the event loop turns, so a batch of starts costs one write and one wake-up
    of the launcher.
    """

    def __init__(
        self,
        python: str = sys.executable,
        reply_timeout_s: float = _REPLY_TIMEOUT_S,
        task_user: TaskUser | None = None,
        user_per_request: bool = False,
        cgroup_home: Path | None = None,
    ) -> None:
        """``reply_timeout_s``: seconds without a message, while requests are pending, after
        which the launcher counts as lost although its process may still run (stopped, or
        blocked on a file system). ``task_user``: the user that tasks run as, None for the
        agent's own. ``user_per_request``: each :meth:`launch` names its task's user (a pool
        of task users), and the launcher starts no task without one. ``cgroup_home``: the
        cgroup v2 folder that the launcher runs in between starts, when each :meth:`launch`
        names the task's cgroup (see :mod:`agents.task_cgroups`)."""
        self._python = python
        self._task_user = task_user
        self._user_per_request = user_per_request
        self._cgroup_home = cgroup_home
        self._reply_timeout_s = reply_timeout_s
        self._reply_timer: asyncio.TimerHandle | None = None
        self._silent_checks = 0
        """Checks in a row that found start requests pending and no message since the last."""
        self._popen: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 1
        self._pending: dict[int, _Launch] = {}
        self._running: dict[int, tuple[TaskProcess, Path]] = {}
        self._incoming = b""
        self._outgoing = bytearray()
        self._flush_scheduled = False
        self._writing = False
        self.identity: tuple[int, int] = (0, 0)
        """The launcher's pid and start ticks, which a task's record keeps; zeros if none."""
        self.adopts_orphans = False
        """Whether the running launcher reported that it is its tasks' child subreaper."""

    def launch(
        self,
        executable: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        exit_path: Path,
        spawn_id: str,
        user: TaskUser | None = None,
        cgroup: Path | None = None,
    ) -> asyncio.Future[TaskProcess]:
        """Ask the launcher to start a program; the future gives its process.

        ``executable`` is the file to run (see :func:`agents.programs.find_executable`). The
        future fails with :class:`agents.programs.CommandNotRunnableError` when executing the
        program failed for a reason of the job's own, and with ``OSError`` when the node could
        not start it. ``spawn_id`` is the value of the task's spawn id variable, by which the
        process is found if the launcher goes away before it replies. ``user`` is the task's
        user, for a launcher made with ``user_per_request``. ``cgroup`` is the task's cgroup,
        which the process starts in, for a launcher made with ``cgroup_home``.
        """
        self._start()
        assert self._loop is not None
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[TaskProcess] = self._loop.create_future()
        exit_file = Path(os.path.abspath(exit_path))
        user = user if self._user_per_request else self._task_user
        self._pending[request_id] = _Launch(
            future, exit_file, spawn_id, executable, argv, env, cwd, user
        )
        request = {
            "id": request_id,
            "path": executable,
            "argv": list(argv),
            "env": dict(env),
            "cwd": os.path.abspath(cwd),
            "log": os.path.abspath(log_path),
            "exit": str(exit_file),
        }
        if self._user_per_request and user is not None:
            request["user"] = user.launcher_argument
        if cgroup is not None:
            request["cgroup"] = str(cgroup)
        self._outgoing += json.dumps(request).encode() + b"\n"
        if self._reply_timer is None:
            self._schedule_reply_check()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def close(self) -> None:
        """Close the socket. The launcher goes on reaping the running tasks, then exits.

        Call it when the agent stops. The processes it launched are no longer watched: a
        restarted agent adopts them. Launches still without a reply are cancelled, because
        whether their process started is unknown. The launcher starts none of them once its
        socket is closed, and a restarted agent resolves their intents.
        """
        if self._socket is None:
            return
        self._disconnect()
        self._running.clear()
        for launch in self._pending.values():
            launch.future.cancel()
        self._pending.clear()
        self.identity = (0, 0)

    async def stop(self, timeout_s: float) -> None:
        """Close the socket as :meth:`close` does, then reap the launcher if no task runs.

        A launcher without tasks exits once its socket closes. Reaping it here keeps it from
        outliving the agent as another process's child (``acsp up`` adopts orphans). A
        launcher with running tasks stays to reap them, and is not waited for. Waits at most
        ``timeout_s`` seconds, and logs a warning if the launcher is still running then.
        """
        popen = self._popen
        idle = not self._running
        self.close()
        if popen is None or not idle:
            return
        self._popen = None
        deadline = time.monotonic() + timeout_s
        while popen.poll() is None:
            if time.monotonic() >= deadline:
                logger.warning(
                    "task launcher %d did not exit within %g s of its socket closing",
                    popen.pid,
                    timeout_s,
                )
                return
            await asyncio.sleep(_LAUNCHER_EXIT_POLL_S)
        logger.info("task launcher %d exited", popen.pid)

    def _disconnect(self) -> None:
        assert self._loop is not None and self._socket is not None
        self._cancel_reply_timer()
        self._loop.remove_reader(self._socket.fileno())
        if self._writing:
            self._loop.remove_writer(self._socket.fileno())
            self._writing = False
        self._socket.close()
        self._socket = None
        self._outgoing.clear()

    def _start(self) -> None:
        if self._socket is not None:
            return
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            script = Path(__file__).with_name("launcher.py")
            arguments = [self._python, "-I", "-S", str(script), str(theirs.fileno())]
            if self._user_per_request:
                arguments.append("--users")
            elif self._task_user is not None:
                arguments += ["--user", self._task_user.launcher_argument]
            if self._cgroup_home is not None:
                arguments += ["--cgroup", str(self._cgroup_home)]
            self._popen = subprocess.Popen(
                arguments,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # The agent's own settings (credentials among them) stay out of it.
                env={k: v for k, v in os.environ.items() if not k.startswith("ACSP_")},
                # Its own session, so that a signal to the agent's group leaves it running.
                start_new_session=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._socket = ours
        self._incoming = b""
        self.identity = (self._popen.pid, process_start_ticks(self._popen.pid) or 0)
        self.adopts_orphans = False
        self._loop.add_reader(ours.fileno(), self._on_readable)
        logger.info("task launcher started as pid %d", self._popen.pid)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._socket is None or not self._outgoing:
            return
        try:
            sent = self._socket.send(self._outgoing)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._fail(f"cannot write to it: {error}")
            return
        del self._outgoing[:sent]
        assert self._loop is not None
        if self._outgoing and not self._writing:
            self._writing = True
            self._loop.add_writer(self._socket.fileno(), self._on_writable)
        elif not self._outgoing and self._writing:
            self._writing = False
            self._loop.remove_writer(self._socket.fileno())

    def _on_writable(self) -> None:
        self._flush()

    def _on_readable(self) -> None:
        assert self._socket is not None
        try:
            data = self._socket.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(f"cannot read from it: {error}")
            return
        if not data:
            self._fail("it exited")
            return
        *lines, self._incoming = (self._incoming + data).split(b"\n")
        for line in lines:
            self._on_message(json.loads(line))
        self._silent_checks = 0

    def _schedule_reply_check(self) -> None:
        assert self._loop is not None
        delay = self._reply_timeout_s / _REPLY_CHECKS
        self._reply_timer = self._loop.call_later(delay, self._check_replies)

    def _cancel_reply_timer(self) -> None:
        if self._reply_timer is not None:
            self._reply_timer.cancel()
            self._reply_timer = None
        self._silent_checks = 0

    def _check_replies(self) -> None:
        self._reply_timer = None
        if self._socket is None or not self._pending:
            self._silent_checks = 0
            return
        self._silent_checks += 1
        if self._silent_checks >= _REPLY_CHECKS:
            count = len(self._pending)
            self._fail(f"no reply for {self._reply_timeout_s:g} s to {count} starts")
            return
        self._schedule_reply_check()

    def leader_pids(self) -> frozenset[int]:
        """Return the pids of the running tasks this launcher started."""
        return frozenset(self._running)

    def _on_message(self, message: dict[str, Any]) -> None:
        if "subreaper" in message:
            self.adopts_orphans = message["subreaper"] is True
            return
        if "id" in message:
            launch = self._pending.pop(message["id"])
            if "pid" in message:
                process = TaskProcess(message["pid"], launched=True)
                self._running[process.pid] = (process, launch.exit_path)
                if not launch.future.done():
                    launch.future.set_result(process)
            elif not launch.future.done():
                launch.future.set_exception(_launch_error(message, launch))
            return
        entry = self._running.pop(message["pid"], None)
        if entry is not None:
            entry[0].set_launcher_status(message["status"], tuple(message.get("adopted", ())))

    def _fail(self, reason: str) -> None:
        """Watch the launched tasks by pidfd, and settle the requests still without a reply.

        A request may have started its process before the launcher went away, so each one
        is looked for by its spawn id before it is failed. A launcher that stopped replying
        may still run. It starts no request once its socket is closed, and it still records
        the exit status of its tasks. The next launch starts a new launcher.
        """
        logger.error("task launcher %d lost: %s", self.identity[0], reason)
        self._disconnect()
        if self._popen is not None:
            self._reap_when_exited(self._popen)
            self._popen = None
        for process, exit_path in self._running.values():
            process.orphan(exit_path, self.identity)
        self._running.clear()
        pending = [launch for launch in self._pending.values() if not launch.future.done()]
        self._pending.clear()
        if pending:
            leaders = find_task_leaders(SPAWN_ID_ENV, {launch.spawn_id for launch in pending})
            for launch in pending:
                pid = leaders.get(launch.spawn_id)
                if pid is None:
                    launch.future.set_exception(
                        LauncherLostError(errno.ECHILD, f"the task launcher went away ({reason})")
                    )
                else:
                    process = TaskProcess(pid, exit_path=launch.exit_path, recorder=self.identity)
                    launch.future.set_result(process)
        self.identity = (0, 0)
        self.adopts_orphans = False

    def _reap_when_exited(self, popen: subprocess.Popen[bytes]) -> None:
        """Reap a lost launcher once it exits, which may be long after it stopped replying."""
        if popen.poll() is not None:
            return
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            # Without pidfds, the subprocess module reaps it when the next child starts.
            return
        assert self._loop is not None
        loop = self._loop

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            popen.poll()

        loop.add_reader(pidfd, reap)


@dataclass(frozen=True, slots=True)
class _Launch:
    future: asyncio.Future[TaskProcess]
    exit_path: Path
    spawn_id: str
    executable: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path
    user: TaskUser | None = None
    """The task user the launcher starts the task as, or None for its own user."""


def _launch_error(reply: dict[str, Any], launch: _Launch) -> Exception:
    """Rebuild the error in a launcher's reply, as ``CommandNotRunnableError`` if the job's own."""
    error = OSError(reply.get("errno", 0), reply.get("error", ""), reply.get("filename"))
    if not reply.get("spawn"):
        # The launcher failed before the spawn (the working directory, the log file).
        return error
    failure = unrunnable_command(
        error, launch.argv, launch.executable, launch.env, launch.cwd, launch.user
    )
    return error if failure is None else failure


SPAWN_ID_ENV = "ACSP_SPAWN_ID"
"""Environment variable that marks a task's process with its record's ``spawn_id``."""


def spawn(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    user: TaskUser | None = None,
    cgroup: Path | None = None,
) -> TaskProcess:
    """Start ``command`` as our child, in a new session with its output in ``log_path``.

    With ``user``, the process runs with that user's uid, primary group and supplementary
    groups. With ``cgroup``, the child moves into that cgroup v2 folder before it executes
    the program. Raises :class:`agents.programs.CommandNotRunnableError` when the program cannot run
    for a reason of the job's own (the same ones as the launcher's), and ``OSError`` when the
    node cannot start the process (the log file, a failed fork, switching the user).
    """
    asyncio.get_running_loop()  # Raise RuntimeError before the process starts, not after.
    restore_glibc_signals()
    executable = resolve_command(command, env, cwd, user)
    # O_NOFOLLOW, as in the launcher: a task may have put a symbolic link in the task folder.
    # O_APPEND, so that after the agent trims a long log the task writes at its new end.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW
    log = os.open(log_path, flags, 0o640)
    procs = -1
    try:
        join_cgroup = None
        if cgroup is not None:
            procs = os.open(cgroup / "cgroup.procs", os.O_WRONLY)
            # The child writes 0 (itself) between fork and exec. The agent has threads, so the
            # function makes only this one system call.
            join_cgroup = partial(os.write, procs, b"0")
        popen = subprocess.Popen(
            [executable, *command[1:]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else list(user.groups),
            preexec_fn=join_cgroup,
        )
    except OSError as error:
        # Popen names the executable in an error of the exec itself, and the working directory
        # or nothing in an error of the fork or of a step before the exec.
        failure = None
        if error.filename == executable:
            failure = unrunnable_command(error, command, executable, env, cwd, user)
        if failure is None:
            raise
        raise failure from error
    finally:
        os.close(log)
        if procs >= 0:
            os.close(procs)
    return TaskProcess(popen.pid, popen)


def from_shell_status(status: int) -> int:
    """Turn a shell's exit status into an exit code, or minus the signal for 128 + N.

    A command that exits with 129 to 192 on its own cannot be distinguished from one killed by a
    signal, so it is reported as killed, following the convention of the shell.
    """
    if 128 < status <= 128 + _LAST_SIGNAL:
        return -(status - 128)
    return status


def read_exit_status(path: Path) -> int | None:
    """Return the exit code recorded in ``path`` as a shell status, or None if none."""
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


async def wait_for_exit_status(path: Path, recorder: tuple[int, int] | None) -> int | None:
    """Return the exit code in ``path``, waiting while ``recorder`` lives to write it.

    The wait ends after :data:`_STATUS_WAIT_S` seconds at most.
    """
    deadline = time.monotonic() + _STATUS_WAIT_S
    exit_code = read_exit_status(path)
    while exit_code is None and recorder_alive(recorder) and time.monotonic() < deadline:
        await asyncio.sleep(_STATUS_POLL_S)
        exit_code = read_exit_status(path)
    if exit_code is None:
        # The recorder may have written the file just before it exited.
        exit_code = read_exit_status(path)
    return exit_code


def recorder_alive(recorder: tuple[int, int] | None) -> bool:
    """Return True if the process ``recorder`` (pid, start ticks) still runs."""
    if recorder is None:
        return False
    pid, start_ticks = recorder
    return process_start_ticks(pid) == start_ticks


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
