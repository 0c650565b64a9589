"""The task launcher: a small process that starts an agent's tasks and records their exit status.

Only a process's parent can read its exit status, and an agent that restarts is no longer the
parent of the tasks it adopts. So the agent does not start tasks itself. It starts this
process once and sends it start requests over a socket pair, whose end is the only argument. The
launcher is the parent of every task. It reaps each one when it ends, writes its exit status
to the file the agent named, and sends the agent a message. When the agent goes away (its end
of the socket closes), the launcher goes on reaping the tasks still running and writing their
status, and exits after the last one. A restarted agent adopts those tasks and reads the files.
Requests that the agent sent before it went away and that are still unread are not started.

It runs as a script with only the standard library (``python -I -S launcher.py FD``), so that it
starts fast and imports nothing of the agent's.

The messages are JSON objects, one per line. A request::

    {"id": 7, "path": "/usr/bin/true", "argv": ["true"], "env": {...}, "cwd": "/var/lib/...",
     "log": ".../t.log", "exit": ".../t.exit"}

gets a reply, in request order: ``{"id": 7, "pid": 1234}`` once the program runs, or
``{"id": 7, "errno": 2, "error": "No such file or directory", "filename": "/tmp/x"}`` (the
parts of an ``OSError``) if it could not be started. A reply to a failed ``posix_spawn`` also
has ``"spawn": true``, so that the agent can tell an error of executing the program, which may
be the job's own (see ``agents.programs``), from an error of the steps before it (the working
directory, the log file), which is the node's. For that reason the launcher opens the log file
and ``/dev/null`` itself, and the spawn only duplicates them. When a task ends the launcher
writes its status to the ``exit`` file, then sends ``{"pid": 1234, "status": 0}``, with the
exit code, or minus the signal number that ended the task.

The launcher is the child subreaper of its tasks (``PR_SET_CHILD_SUBREAPER``): a task's process
whose parent ends (a daemon that forked twice, or a child of the task's leader after the leader
exits) becomes the launcher's child, not init's, and the launcher reaps it when it ends. So the
agent finds what a task left running among the launcher's children (see
``agents.stray_processes``). The launcher's first message reports whether it is one:
``{"subreaper": true}``. An exit message carries ``"adopted": [pids]`` when the launcher has
children it did not start at that moment.

The file contains the status as a shell reports it (the exit code, or 128 + N for signal N), the
format earlier agents wrote with a shell around each task, so that one reader serves both.

With ``--user UID:GID:GROUPS`` (``ACSP_AGENT_TASK_USER``) every task runs as that user, with
that primary group and those supplementary groups (comma-separated, maybe none), while the
launcher keeps the agent's user. ``posix_spawn`` cannot switch user, so such a task is started
by ``subprocess.Popen``, which forks, sets the groups and the user, then executes the program.
That costs the launcher more CPU time per task than ``posix_spawn`` (see the measurement in
``docs/deploy.md``), so tasks without a user keep ``posix_spawn``.

With ``--users`` (``ACSP_AGENT_TASK_USERS``, a pool of task users) each request names its own
user as ``"user": "UID:GID:GROUPS"``, and a request without one is rejected.

With ``--cgroup HOME`` (``ACSP_AGENT_TASK_CGROUP``, see ``agents.task_cgroups``) the launcher
moves itself into the cgroup v2 folder HOME at start, and each request names the task's cgroup
as ``"cgroup": "/sys/fs/cgroup/.../task-..."``. The launcher writes 0 (itself) to that
cgroup's ``cgroup.procs``, starts the task, which is born in it, and writes itself back to
HOME's. ``cgroup.procs`` moves every thread of a process, and the launcher runs no threads, so
nothing else of it is started meanwhile. A failed move into the task's cgroup fails the start
as the node's fault. A failed move back would leave the launcher where the task's
``cgroup.kill`` reaches it, so the launcher exits instead, and a new agent start makes a new
one.

NOTE: tasks started by ``posix_spawn`` start with signals 32 and 33 ignored. The child of
glibc's ``posix_spawn`` (2.36) ignores these two signals, which glibc keeps for itself, and
``os.posix_spawn`` cannot name them in ``setsigdef`` because glibc's ``sigaddset`` rejects
them (Python then warns and skips them). Tasks that ``subprocess.Popen`` starts (with a task
user, or by the agent itself) inherit the action of the process that starts them, which
:func:`restore_glibc_signals` sets back to the default.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import selectors
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import subprocess

_READ_SIZE = 1 << 20
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
"""Signals Python ignores at start-up; an ignored signal would stay ignored in the task."""


TaskUser = tuple[int, int, list[int]]
"""The uid, the primary gid and the supplementary gids that tasks run with."""


class Launcher:
    """Starts tasks on request and reports their exits, on one socket."""

    def __init__(
        self,
        sock: socket.socket,
        user: TaskUser | None = None,
        user_per_request: bool = False,
        cgroup_home: int = -1,
    ) -> None:
        self._socket = sock
        self._user = user
        self._user_per_request = user_per_request
        self._cgroup_home = cgroup_home
        """Open ``cgroup.procs`` of the cgroup the launcher returns to after a start, or -1."""
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        """The running tasks that ``subprocess.Popen`` started, by pid."""
        self._buffer = b""
        self._out: list[bytes] = []
        self._exit_paths: dict[int, str] = {}
        """Exit status file of each running child, by pid."""
        self._peer_gone = False
        # Not inheritable: each task gets it as its standard input only.
        self._devnull = os.open(os.devnull, os.O_RDONLY)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self._wake_read = wake_read
        # The handler does nothing: the wake-up byte on the pipe makes the loop reap.
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wake_write)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._selector.register(wake_read, selectors.EVENT_READ)
        self._hangup = select.poll()
        # Reported once the agent's end is closed, while requests may still wait unread.
        self._hangup.register(sock, select.POLLRDHUP)

    def run(self) -> None:
        """Serve until the agent has gone and every task has ended."""
        while not (self._peer_gone and not self._exit_paths):
            for key, _events in self._selector.select():
                if key.fileobj is self._socket:
                    self._read_requests()
                else:
                    self._drain_wakeups()
            self._reap()
            self._send()

    def _read_requests(self) -> None:
        try:
            data = self._socket.recv(_READ_SIZE)
        except ConnectionError:
            data = b""
        if not data:
            self._peer_gone = True
            self._selector.unregister(self._socket)
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if self._hangup.poll(0):
                # The agent has gone, so no one waits for these. A restarted agent finds their
                # intents without a process or a log, and starts each task when its command
                # is redelivered.
                return
            self._start(json.loads(line))

    def _start(self, request: dict[str, Any]) -> None:
        request_id = request["id"]
        exit_path = request["exit"]
        user = self._user
        if self._user_per_request:
            try:
                user = parse_user(request["user"])
            except (KeyError, ValueError):
                error = OSError(errno.EINVAL, "the request names no valid task user")
                self._reply_error(request_id, error, spawn=False)
                return
        try:
            # The launcher runs no threads, so changing its own directory cannot race.
            os.chdir(request["cwd"])
            try:
                os.unlink(exit_path)
            except FileNotFoundError:
                pass
            # Not inheritable: the task gets it as its standard output and error only.
            log = os.open(request["log"], _LOG_FLAGS, 0o640)
        except OSError as error:
            self._reply_error(request_id, error, spawn=False)
            return
        cgroup = request.get("cgroup")
        if cgroup is not None:
            try:
                if self._cgroup_home < 0:
                    raise OSError(errno.EINVAL, "the launcher was started without --cgroup")
                _join_cgroup(cgroup)
            except OSError as error:
                os.close(log)
                self._reply_error(request_id, error, spawn=False)
                return
        try:
            if user is not None:
                self._start_as_user(request, log, user)
            else:
                self._spawn(request, log)
        finally:
            if cgroup is not None:
                self._leave_cgroup()

    def _leave_cgroup(self) -> None:
        try:
            os.write(self._cgroup_home, b"0")
        except OSError as error:
            print(
                f"acsp task launcher: cannot move back to its own cgroup, so a stop of the task "
                f"it started last would kill it; exiting: {error}",
                file=sys.stderr,
            )
            os._exit(1)

    def _spawn(self, request: dict[str, Any], log: int) -> None:
        request_id = request["id"]
        exit_path = request["exit"]
        try:
            pid = os.posix_spawn(
                request["path"],
                request["argv"],
                request["env"],
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, self._devnull, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                ],
                setsid=True,
                setsigdef=_RESET_SIGNALS,
            )
        except (OSError, ValueError) as error:
            # ValueError: a NUL character in an argument, which no program can receive.
            self._reply_error(request_id, error, spawn=True)
            return
        finally:
            os.close(log)
        self._exit_paths[pid] = exit_path
        self._out.append(b'{"id": %d, "pid": %d}\n' % (request_id, pid))

    def _start_as_user(self, request: dict[str, Any], log: int, user: TaskUser) -> None:
        # Imported here, so that a launcher without a task user starts without it.
        import subprocess

        request_id = request["id"]
        path = request["path"]
        uid, gid, groups = user
        try:
            # restore_signals resets the signals of _RESET_SIGNALS, and close_fds leaves the
            # task only its three standard descriptors.
            popen = subprocess.Popen(
                request["argv"],
                executable=path,
                env=request["env"],
                stdin=self._devnull,
                stdout=log,
                stderr=log,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except (OSError, ValueError) as error:
            # Popen names the program only in an error of executing it. The other errors
            # (setting the groups or the user, a failed fork) are the node's.
            spawn = not isinstance(error, OSError) or error.filename == path
            self._reply_error(request_id, error, spawn=spawn)
            return
        finally:
            os.close(log)
        self._popens[popen.pid] = popen
        self._exit_paths[popen.pid] = request["exit"]
        self._out.append(b'{"id": %d, "pid": %d}\n' % (request_id, popen.pid))

    def _reply_error(self, request_id: int, error: Exception, spawn: bool) -> None:
        reply: dict[str, Any] = {"id": request_id, "errno": 0, "error": str(error)}
        if isinstance(error, OSError):
            # The agent rebuilds the OSError, whose text then starts with the number once.
            reply.update(errno=error.errno or 0, error=error.strerror, filename=error.filename)
        if spawn:
            reply["spawn"] = True
        self._out.append(json.dumps(reply).encode() + b"\n")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        # Every child, because processes that tasks left behind are the launcher's children too.
        exits: list[tuple[int, int]] = []
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exit_path = self._exit_paths.pop(pid, None)
            if exit_path is None:
                continue
            status = os.waitstatus_to_exitcode(wait_status)
            popen = self._popens.pop(pid, None)
            if popen is not None:
                # Reaped here: a Popen that never learns its status would wait for it later,
                # and reap another task that got its pid.
                popen.returncode = status
            _write_status(exit_path, status)
            exits.append((pid, status))
        if not exits:
            return
        # A task's processes that outlived it became our children when it exited, before it
        # could be reaped, so this list contains them.
        adopted = [pid for pid in _children() if pid not in self._exit_paths]
        extra = b', "adopted": %s' % json.dumps(adopted).encode() if adopted else b""
        for pid, status in exits:
            self._out.append(b'{"pid": %d, "status": %d%s}\n' % (pid, status, extra))

    def announce_subreaper(self, subreaper: bool) -> None:
        """Queue the first message, which reports whether the tasks' orphans become its children."""
        self._out.insert(0, b'{"subreaper": %s}\n' % (b"true" if subreaper else b"false"))

    def _send(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self._peer_gone:
            return
        try:
            # Blocking, because a reply must not be dropped. The agent reads the socket all along.
            self._socket.sendall(data)
        except OSError:
            self._peer_gone = True
            self._selector.unregister(self._socket)


# O_NOFOLLOW: tasks may write in the task folder, and a symbolic link that one of them put in
# place of a log would make the launcher, which may run as root, truncate its target.
# O_APPEND, so that after the agent trims a long log the task writes at its new end.
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW
_STATUS_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def _join_cgroup(cgroup: str) -> None:
    """Move the launcher into the cgroup v2 folder ``cgroup``, where its next child starts."""
    descriptor = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
    try:
        # 0 stands for the writing process.
        os.write(descriptor, b"0")
    finally:
        os.close(descriptor)


def _write_status(path: str, status: int) -> None:
    """Write ``status`` as a shell reports it, whole or not at all (through a renamed file)."""
    shell_status = status if status >= 0 else 128 - status
    partial = path + ".partial"
    try:
        try:
            descriptor = os.open(partial, _STATUS_FLAGS, 0o640)
        except FileExistsError:
            # Left by a launcher that stopped halfway, or put there by a task: a new file, so
            # that no task has it open or owns it.
            os.unlink(partial)
            descriptor = os.open(partial, _STATUS_FLAGS, 0o640)
        try:
            os.write(descriptor, b"%d\n" % shell_status)
        finally:
            os.close(descriptor)
        os.rename(partial, path)
    except OSError as error:
        # The agent still gets the exit message. Only a restarted agent would miss the status.
        print(f"acsp task launcher: cannot write {path}: {error}", file=sys.stderr)


_CAPABILITY_VERSION_3 = 0x20080522
"""``_LINUX_CAPABILITY_VERSION_3`` of ``linux/capability.h``: two 32-bit words per set."""


def drop_inheritable_capabilities() -> None:
    """Empty the inheritable and ambient capability sets of this process, keeping the others.

    A process that has capabilities without being root keeps them when it switches to another
    user, and hands its ambient set on to the programs it executes. With both sets empty, a
    program executed after the switch gets only the capabilities that its file carries. Root's
    capabilities are cleared by the kernel once no uid of the process is 0.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    # Two structs of (effective, permitted, inheritable), for capabilities 0-31 and 32-63.
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"capget failed: {os.strerror(number)}")
    if not data[2] and not data[5]:
        return
    data[2] = data[5] = 0
    # The ambient set only contains capabilities that are inheritable, so it empties too.
    if libc.capset(header, data) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"capset failed: {os.strerror(number)}")


_RT_SIGACTION: Final = {"x86_64": 13, "aarch64": 134}
"""Number of the ``rt_sigaction`` system call on each machine."""
_GLIBC_SIGNALS: Final = (32, 33)
"""The real-time signals that glibc keeps for itself (thread cancellation and set*id)."""
_glibc_signals_checked = False


def restore_glibc_signals() -> None:
    """Set signals 32 and 33 back to their default action if this process ignores them.

    A process that glibc's ``posix_spawn`` started ignores them (GNU make starts its recipes
    so), and the programs it starts by fork and exec inherit that. glibc's ``sigaction``
    rejects these two numbers, so the kernel's ``rt_sigaction`` is called directly. A handler
    that glibc installed is left alone, and the check runs once per process.
    """
    global _glibc_signals_checked
    if _glibc_signals_checked:
        return
    _glibc_signals_checked = True
    number = _RT_SIGACTION.get(os.uname().machine)
    if number is None:
        return
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(x for x in status if x.startswith("SigIgn:"))
        ignored = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for signal_number in _GLIBC_SIGNALS:
        if ignored & (1 << (signal_number - 1)):
            # The default handler, no flags, no restorer and an empty mask: all zeros in the
            # kernel's struct sigaction on both machines.
            action = (ctypes.c_ulong * 4)()
            libc.syscall(number, signal_number, ctypes.byref(action), None, 8)


def parse_user(text: str) -> TaskUser:
    """Parse ``UID:GID:G1,G2`` (the groups may be empty); raise ValueError if malformed."""
    uid, gid, groups = text.split(":")
    return int(uid), int(gid), [int(group) for group in groups.split(",") if group]


def main(argv: list[str]) -> int:
    usage = "usage: launcher.py SOCKET_FD [--user UID:GID:GROUPS | --users] [--cgroup HOME]"
    cgroup = None
    arguments = argv[1:]
    if len(arguments) >= 3 and arguments[-2] == "--cgroup":
        cgroup = arguments[-1]
        arguments = arguments[:-2]
    options = arguments[1:2]
    if (
        len(arguments) not in (1, 2, 3)
        or not arguments[0].isdigit()
        or options not in ([], ["--user"], ["--users"])
        or (len(arguments) == 3) != (options == ["--user"])
    ):
        print(usage, file=sys.stderr)
        return 2
    user = None
    user_per_request = options == ["--users"]
    if user_per_request:
        drop_inheritable_capabilities()
    if len(arguments) == 3:
        try:
            user = parse_user(arguments[2])
        except ValueError:
            print(usage, file=sys.stderr)
            return 2
        drop_inheritable_capabilities()
    cgroup_home = -1
    if cgroup is not None:
        try:
            cgroup_home = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
            os.write(cgroup_home, b"0")
        except OSError as error:
            print(f"acsp task launcher: cannot move into cgroup {cgroup}: {error}", file=sys.stderr)
            return 1
    restore_glibc_signals()
    sock = socket.socket(fileno=int(arguments[0]))
    # The socket must not leak into the tasks, which would keep it open after the agent exits.
    sock.set_inheritable(False)
    sock.setblocking(True)
    launcher = Launcher(sock, user, user_per_request, cgroup_home)
    launcher.announce_subreaper(become_subreaper())
    launcher.run()
    return 0


def _children() -> list[int]:
    """Return this process's children, or none if the kernel does not list them."""
    own = os.getpid()
    children: list[int] = []
    try:
        for thread in os.listdir(f"/proc/{own}/task"):
            with open(f"/proc/{own}/task/{thread}/children", "rb") as file:
                children.extend(int(pid) for pid in file.read().split())
    except (OSError, ValueError):
        return []
    return children


_PR_SET_CHILD_SUBREAPER: Final = 36
"""The ``prctl`` option from ``<linux/prctl.h>``."""


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children; return whether that worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        error = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        error = str(exc)
    print(f"launcher: cannot become the tasks' child subreaper: {error}", file=sys.stderr)
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv))
