"""Finding a task's processes that left its process group, by the spawn id in their environment.

A task runs as its own session and process group, and the runner signals that group. A child
that calls ``setsid`` or ``setpgid`` (a daemon, a double fork) leaves the group but keeps the
environment it inherited, including the task's spawn id variable. The runner finds such strays
by that value, and signals them with the group.

When a task has ended, everything it left running has become a child of the task launcher,
which is the tasks' child subreaper (see ``agents.launcher``). Then only the launcher's children
that lead no running task are read, which costs a few file reads per task instead of a scan of
every process on the node. Otherwise (a stop while the task runs, a launcher that is gone or is
no subreaper) the runner scans ``/proc``.

NOTE: a process that clears or rewrites its environment before it leaves the group is not
found. On a node with the agent setting ``ACSP_AGENT_TASK_CGROUP``, each task runs in a cgroup
of its own, which keeps such a process, and the runner kills that cgroup instead of searching
(see :mod:`agents.task_cgroups`). A task that a restarted agent adopts without a cgroup (it
was started before the setting was on) is still searched for here.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Collection, Iterable

from agents.task_process import SPAWN_ID_ENV, stat_fields

logger = logging.getLogger(__name__)

_KILL_PASSES = 20
"""Scans of ``/proc`` when killing strays: a process that forks between two scans is found in the
next one, and a killed process forks no more."""

_EXIT_WAIT_S = 0.5
"""How long a kill waits for killed processes to finish exiting, so that their children are
found. A pid that an unrelated new process took over meanwhile costs at most this much."""

_EXIT_POLL_S = 0.001


def find_task_processes(spawn_id: str, outside_group: int = 0) -> list[int]:
    """Return the live processes whose environment sets the spawn id variable to ``spawn_id``.

    With ``outside_group``, processes of that process group are left out. Processes whose
    environment cannot be read (another user's, without the right to read it) are skipped.
    """
    if not spawn_id:
        return []
    own = os.getpid()
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        pid = int(entry)
        fields = stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):
            continue
        if outside_group and int(fields[2]) == outside_group:
            continue
        live.append(pid)
    return carrying(spawn_id, live)


def adopted_processes(adopter: int, spawn_id: str, leaders: Collection[int]) -> list[int] | None:
    """Return the children of ``adopter`` outside ``leaders`` that carry ``spawn_id``.

    ``adopter`` is the task launcher and ``leaders`` the pids of the tasks it runs, whose
    environment need not be read. Returns None when the children cannot be listed (a kernel
    without ``/proc/PID/task/TID/children``, or ``adopter`` gone).
    """
    children: list[int] = []
    try:
        for thread in os.listdir(f"/proc/{adopter}/task"):
            with open(f"/proc/{adopter}/task/{thread}/children", "rb") as file:
                children.extend(int(pid) for pid in file.read().split())
    except (OSError, ValueError):
        return None
    return carrying(spawn_id, [pid for pid in children if pid not in leaders])


def carrying(spawn_id: str, pids: Iterable[int]) -> list[int]:
    """Return those of ``pids`` whose environment sets the spawn id variable to ``spawn_id``."""
    target = f"{SPAWN_ID_ENV}={spawn_id}".encode()
    found = []
    for pid in pids:
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


def kill_task_processes(
    spawn_id: str,
    adopter: int = 0,
    leaders: Collection[int] = frozenset(),
    adopted: Iterable[int] | None = None,
) -> int:
    """Send SIGKILL to the task's processes until none is left; return how many were killed.

    With ``adopter`` (the launcher of an ended task, which is its child subreaper), only the
    adopter's children outside ``leaders`` are searched. ``adopted`` is the list of those
    children that the launcher sent with the task's exit, which the first round reads instead,
    so a task that left nothing behind costs no read at all. A killed process's children become
    the adopter's in turn, so the next round finds them. Gives up after a bounded number of
    rounds, logging the processes still alive, because a process started by another user
    cannot always be killed.
    """
    first = None if adopted is None or not adopter else carrying(spawn_id, adopted)
    if first == []:
        return 0

    def find() -> list[int]:
        nonlocal first
        if first is not None:
            found, first = first, None
            return found
        if adopter:
            adopted = adopted_processes(adopter, spawn_id, leaders)
            if adopted is not None:
                return adopted
        return find_task_processes(spawn_id)

    killed: set[int] = set()
    rounds = 0
    deadline = 0.0
    while rounds < _KILL_PASSES:
        # A killed process stops showing its environment before its children pass to the
        # adopter, so only a search after every killed process has exited can find none left.
        exited = not any(_exiting(pid) for pid in killed)
        pids = find()
        if pids:
            rounds += 1
            for pid in pids:
                if _signal(pid, signal.SIGKILL):
                    killed.add(pid)
            continue
        if exited:
            return len(killed)
        now = time.monotonic()
        deadline = deadline or now + _EXIT_WAIT_S
        if now > deadline:
            break
        time.sleep(_EXIT_POLL_S)
    left = find()
    if left:
        logger.error(
            "processes %s of spawn id %s still run after %d rounds of SIGKILL",
            left,
            spawn_id,
            _KILL_PASSES,
        )
    return len(killed)


def _exiting(pid: int) -> bool:
    """Return whether ``pid`` still exists and is not yet a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        logger.error("cannot signal process %d: %s", pid, error)
        return False
    return True
