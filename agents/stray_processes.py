"""Finding a task's processes that left its process group, by the spawn id in their environment.

A task runs as its own session and process group, and the runner signals that group. A child
that calls ``setsid`` or ``setpgid`` (a daemon, a double fork) leaves the group but keeps the
environment it inherited, including the task's spawn id variable. The runner finds such strays
by scanning ``/proc`` for that value, and signals them with the group.

NOTE: a process that clears or rewrites its environment before it leaves the group is not
found; only a cgroup per task would catch it.
"""

from __future__ import annotations

import logging
import os
import signal

from agents.task_process import SPAWN_ID_ENV, stat_fields

logger = logging.getLogger(__name__)

_KILL_PASSES = 20
"""Scans of ``/proc`` when killing strays: a process that forks between two scans is found in the
next one, and a killed process forks no more."""


def find_task_processes(spawn_id: str, outside_group: int = 0) -> list[int]:
    """Return the live processes whose environment sets the spawn id variable to ``spawn_id``.

    With ``outside_group``, processes of that process group are left out. Processes whose
    environment cannot be read (another user's, without the right to read it) are skipped.
    """
    if not spawn_id:
        return []
    target = f"{SPAWN_ID_ENV}={spawn_id}".encode()
    own = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        pid = int(entry)
        fields = stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        if outside_group and int(fields[2]) == outside_group:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            continue
        if target in environ.split(b"\0"):
            found.append(pid)
    return found


def signal_strays(spawn_id: str, group: int, signum: int) -> int:
    """Send ``signum`` to the task's processes outside process group ``group``; return how many.

    The group itself is signalled with ``killpg``, so its members get the signal only once.
    """
    signalled = 0
    for pid in find_task_processes(spawn_id, outside_group=group):
        if _signal(pid, signum):
            signalled += 1
    return signalled


def kill_task_processes(spawn_id: str) -> int:
    """Send SIGKILL to the task's processes until none is left; return how many were killed.

    Gives up after a bounded number of scans, logging the processes still alive, because a
    process started by another user cannot always be killed.
    """
    killed: set[int] = set()
    for _ in range(_KILL_PASSES):
        pids = find_task_processes(spawn_id)
        if not pids:
            return len(killed)
        for pid in pids:
            if _signal(pid, signal.SIGKILL):
                killed.add(pid)
    left = find_task_processes(spawn_id)
    if left:
        logger.error(
            "processes %s of spawn id %s still run after %d rounds of SIGKILL",
            left,
            spawn_id,
            _KILL_PASSES,
        )
    return len(killed)


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        logger.error("cannot signal process %d: %s", pid, error)
        return False
    return True
