"""Stop a running local mesh from another process, as ``acsp down`` does."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Final

from acsp.mesh.data_dir_lock import LOCK_FILE_NAME, lock_holder
from acsp.mesh.endpoints import MESH_FILE_NAME, MeshInfo, pid_running

POLL_INTERVAL_S: Final = 0.1
START_TIME_SLACK_S: Final = 2.0
"""Seconds by which the supervisor's start time may appear to follow the modification time of
its mesh file or lock file. /proc gives the boot time in whole seconds, so a start time read
from it may be up to 1 s late."""


class MeshStopTimeoutError(Exception):
    """The supervisor was signalled but still ran when the wait ended."""


def supervisor_running(info: MeshInfo) -> bool:
    """Return whether the supervisor that wrote ``info``'s mesh file still runs."""
    return mesh_process_running(info, info.supervisor_pid)


def mesh_process_running(info: MeshInfo, pid: int) -> bool:
    """Return whether process ``pid``, which ``info``'s mesh file names, still runs.

    The supervisor writes the file after it starts its children and again after it restarts
    one. A process id is reused once its process exits, so a process that started after the
    file was written is another program (checked on Linux, through /proc). A zombie has exited
    and counts as stopped.
    """
    # The supervisor removes its mesh file as the last step of its stop, so a missing file
    # leaves only the liveness check.
    return _started_before(pid, info.data_dir / MESH_FILE_NAME)


def lock_holding_supervisor(data_dir: Path) -> int | None:
    """Return the pid of the supervisor that holds ``data_dir``'s lock, or None if none runs.

    The supervisor records its pid in the lock file right after it takes the lock, and runs
    until it releases the lock, so it started before the file's last change. A recorded pid
    whose process started later belongs to another program, which took the pid after a
    process that inherited the lock outlived the supervisor.
    """
    pid = lock_holder(data_dir)
    if pid is None:
        return None
    return pid if _started_before(pid, data_dir / LOCK_FILE_NAME) else None


def _started_before(pid: int, path: Path) -> bool:
    """Return whether ``pid`` runs and started before ``path`` was last modified (with slack).

    A zombie has exited and counts as stopped. Without /proc, or without ``path``, only
    whether it runs counts.
    """
    if not pid_running(pid) or _is_zombie(pid):
        return False
    started = _start_time(pid)
    if started is None:
        return True
    try:
        written = path.stat().st_mtime
    except FileNotFoundError:
        return True
    return started <= written + START_TIME_SLACK_S


def stop_supervisor(pid: int, timeout_s: float) -> None:
    """Send SIGTERM to the mesh's supervisor ``pid`` and wait up to ``timeout_s`` for it to exit.

    The supervisor stops its children, removes its own mesh file and releases the lock before
    it exits. Raises :class:`MeshStopTimeoutError` if it still runs when the wait ends.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while pid_running(pid) and not _is_zombie(pid):
        if time.monotonic() > deadline:
            raise MeshStopTimeoutError(
                f"the mesh's supervisor (pid {pid}) still runs {timeout_s:g} s after SIGTERM"
            )
        time.sleep(POLL_INTERVAL_S)


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "Z"


def _start_time(pid: int) -> float | None:
    """Return when process ``pid`` started, in seconds since the epoch, or None off Linux."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        boot_time = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return None
    # Field 22 of /proc/PID/stat is the start time in clock ticks after boot. fields[0] is field 3.
    ticks = int(fields[19])
    return boot_time + ticks / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name, or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after its closing bracket.
    return stat.rsplit(")", 1)[1].split()
