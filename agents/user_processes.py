"""The processes that run as the users of a task user pool, found in ``/proc`` and killed.

The pool's users are dedicated to it, so every process that runs as one of them, with its
real, effective or saved uid, belongs to a job that had the user (see
:mod:`agents.task_users`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection
from typing import Final

from agents.task_process import stat_fields

_KILL_PASSES: Final = 20
"""Scans of ``/proc`` in one sweep of a user's processes. A process that forks between two
scans is found by the next one, and a killed process forks no more."""
_EXIT_WAIT_S: Final = 0.5
"""Seconds a sweep waits for the processes it killed to exit."""
_EXIT_POLL_S: Final = 0.005


def kill_user_processes(uids: Collection[int]) -> set[int]:
    """Send SIGKILL to every process whose real, effective or saved uid is in ``uids``.

    Scans ``/proc`` until a scan finds none left alive, at most :data:`_KILL_PASSES` times.
    Returns the uids that still have processes (ones that SIGKILL does not end at once).
    """
    if not uids:
        return set()
    pool_uids = frozenset(uids)
    killed: set[int] = set()
    deadline = 0.0
    for _ in range(_KILL_PASSES):
        found = _processes_of(pool_uids)
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.add(pid)
        if found:
            continue
        if not any(_alive(pid) for pid in killed):
            return set()
        deadline = deadline or time.monotonic() + _EXIT_WAIT_S
        if time.monotonic() > deadline:
            break
        time.sleep(_EXIT_POLL_S)
    return set(_processes_of(pool_uids).values())


def _processes_of(uids: frozenset[int]) -> dict[int, int]:
    """Return pid -> uid for the live processes (not zombies) that run as one of ``uids``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        uid = _process_uid(int(entry), uids)
        if uid is not None:
            found[int(entry)] = uid
    return found


def _process_uid(pid: int, uids: frozenset[int]) -> int | None:
    """Return the uid of ``uids`` that ``pid`` runs as, or None (other user, zombie, gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            text = file.read()
    except OSError:
        return None
    state = uid_line = b""
    for line in text.splitlines():
        if line.startswith(b"State:"):
            state = line
        elif line.startswith(b"Uid:"):
            uid_line = line
            break
    if b"Z" in state[6:9] or b"X" in state[6:9]:
        return None
    # Real, effective, saved and file system uid.
    for value in uid_line.split()[1:4]:
        if int(value) in uids:
            return int(value)
    return None


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def process_uid(pid: int) -> int | None:
    """Return the real uid of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
