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

The file contains the status as a shell reports it (the exit code, or 128 + N for signal N), the
format earlier agents wrote with a shell around each task, so that one reader serves both.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import sys
from typing import Any

_READ_SIZE = 1 << 20
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
"""Signals Python ignores at start-up; an ignored signal would stay ignored in the task."""


class Launcher:
    """Starts tasks on request and reports their exits, on one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
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
        while self._exit_paths:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exit_path = self._exit_paths.pop(pid, None)
            if exit_path is None:
                continue
            status = os.waitstatus_to_exitcode(wait_status)
            _write_status(exit_path, status)
            self._out.append(b'{"pid": %d, "status": %d}\n' % (pid, status))

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


_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def _write_status(path: str, status: int) -> None:
    """Write ``status`` as a shell reports it, whole or not at all (through a renamed file)."""
    shell_status = status if status >= 0 else 128 - status
    partial = path + ".partial"
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(descriptor, b"%d\n" % shell_status)
        finally:
            os.close(descriptor)
        os.rename(partial, path)
    except OSError as error:
        # The agent still gets the exit message. Only a restarted agent would miss the status.
        print(f"acsp task launcher: cannot write {path}: {error}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: launcher.py SOCKET_FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    # The socket must not leak into the tasks, which would keep it open after the agent exits.
    sock.set_inheritable(False)
    sock.setblocking(True)
    Launcher(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
