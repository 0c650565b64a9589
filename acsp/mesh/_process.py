"""Child processes of the local mesh: start with a log file, stop in two phases, tail the log."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
_DECORATION: Final = re.compile(r"^[\s|+\-\d]*$")
TAIL_LINES: Final = 20
"""Lines of a child's log shown when it dies."""


# A trampoline that runs first in each child and then replaces itself with the real program
# (same pid). Started as the supervisor's user, it switches to the child's user (argv[2] and
# argv[3], -1 to stay). Then it requests that Linux send SIGTERM to the child when the
# supervisor's thread dies, even by SIGKILL, and exits at once if the supervisor (argv[1]) is
# already gone. The request comes after the change of user because such a change clears it,
# and it survives exec. This is not a preexec_fn because Python code between fork and exec
# runs the fork handlers of libraries such as grpcio in the child, which aborted PostgreSQL's
# start in a process that had used gRPC.
_DIE_WITH_PARENT: Final = (
    "import ctypes, os, signal, sys\n"
    "parent, uid, gid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])\n"
    "if uid >= 0:\n"
    "    os.setgroups([])\n"
    "    os.setgid(gid)\n"
    "    os.setuid(uid)\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[4], sys.argv[4:])\n"
)


def _with_parent_death_signal(argv: Sequence[str], user: str | None) -> list[str]:
    uid = gid = -1
    if user is not None:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _DIE_WITH_PARENT,
        str(os.getpid()),
        str(uid),
        str(gid),
        *argv,
    ]


class ChildProcess:
    """One process that the mesh started, with its output in ``log_path``.

    Each child runs in its own session, so a Ctrl-C in the terminal reaches only the
    supervisor, which then stops the children in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._user = user
        self._stop_signal = stop_signal
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *_with_parent_death_signal(self.argv, self._user),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        logger.info("started %s (pid %s): %s", self.name, self._process.pid, " ".join(self.argv))

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit status."""
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        return await self._process.wait()

    async def stop(self, grace_s: float) -> int | None:
        """Send the stop signal, wait up to ``grace_s`` seconds, then SIGKILL.

        Returns the exit status, or None if the process was never started.
        """
        process = self._process
        if process is None:
            return None
        if process.returncode is not None:
            return process.returncode
        self._signal(self._stop_signal)
        try:
            return await asyncio.wait_for(asyncio.shield(process.wait()), grace_s)
        except TimeoutError:
            logger.warning(
                "%s (pid %s) did not exit within %.1f s of %s; killing it",
                self.name,
                process.pid,
                grace_s,
                self._stop_signal.name,
            )
        self._signal(signal.SIGKILL)
        # After SIGKILL the kernel reaps the process promptly; the bound only guards a stuck
        # uninterruptible sleep.
        return await asyncio.wait_for(process.wait(), 10.0)

    async def kill(self) -> int | None:
        """SIGKILL the process and its group at once, as a crash would; return its status."""
        process = self._process
        if process is None:
            return None
        self._signal(signal.SIGKILL)
        return await asyncio.wait_for(process.wait(), 10.0)

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            # The child leads its own process group, so this reaches its own children too.
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return

    def tail(self, lines: int = TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the child's log, or '' if there is none."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        text = data[-64 * 1024 :].decode("utf-8", errors="replace")
        # Skip the frame lines of printed exception groups ("+---- 1 ----", "|"), which
        # otherwise fill the tail and hide the error itself.
        meaningful = [line for line in text.splitlines() if not _DECORATION.match(line)]
        return "\n".join(meaningful[-lines:])

    def describe_exit(self) -> str:
        """Return a sentence that describes how the process ended, for error messages."""
        code = self.returncode
        if code is None:
            return f"{self.name} is still running"
        if code < 0:
            try:
                ending = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                ending = f"was killed by signal {-code}"
        else:
            ending = f"exited with status {code}"
        return f"{self.name} (pid {self.pid}) {ending}; log: {self.log_path}"


_PR_SET_CHILD_SUBREAPER: Final = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children instead of init's (Linux only).

    A node agent leaves the tasks it started running when it stops (they run in sessions of
    their own, so a restarted agent can adopt them). As a subreaper the supervisor still
    finds them, through :func:`adopted_orphans`, reaps those that exit while it runs
    (:func:`reap_exited_orphans`) and stops the rest with the mesh.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0)


def adopted_orphans(known: set[int]) -> list[int]:
    """Return the pids of this process's children that are not in ``known``."""
    me = os.getpid()
    orphans = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in known:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after its closing bracket.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == me:
            orphans.append(int(entry.name))
    return orphans


def reap_exited_orphans(known: set[int]) -> list[tuple[int, int]]:
    """Reap the adopted orphans that have exited; return the pid and exit code of each.

    Children in ``known`` are left alone, because asyncio's child watcher waits for each of
    them by pid and would lose the exit status to this call. The caller must make sure that
    ``known`` contains every child that this process started itself. The exit code is negative,
    -N, for a process that signal N ended, as in :attr:`subprocess.Popen.returncode`.
    """
    # WNOWAIT leaves the exited child waitable, so a known child is not reaped here. The
    # scan of /proc runs only when some child has exited.
    try:
        exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return []
    if exited is None:
        return []
    reaped = []
    for pid in adopted_orphans(known):
        try:
            reaped_pid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if reaped_pid == pid:
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped


async def stop_orphans(known: set[int], grace_s: float) -> list[int]:
    """SIGTERM the adopted orphans, SIGKILL those still running after ``grace_s``, reap all.

    Returns the pids that were stopped.
    """
    orphans = adopted_orphans(known)
    if not orphans:
        return []
    logger.warning("stopping %d process(es) left behind by the mesh: %s", len(orphans), orphans)
    for pid in orphans:
        _kill_quietly(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    remaining = set(orphans)
    while remaining and loop.time() < deadline:
        remaining = {pid for pid in remaining if not _reaped(pid)}
        if remaining:
            await asyncio.sleep(0.05)
    for pid in remaining:
        _kill_quietly(pid, signal.SIGKILL)
    while remaining:
        remaining = {pid for pid in remaining if not _reaped(pid)}
        if remaining:
            await asyncio.sleep(0.05)
    return orphans


def _kill_quietly(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it exited; return True once it is gone."""
    try:
        reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return reaped_pid == pid
