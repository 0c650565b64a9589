"""One cgroup v2 per task, so that a stop kills every process a task started.

A task's processes can leave its process group (``setsid``) and clear their environment, and
then neither the group signal nor the spawn id search (:mod:`agents.stray_processes`) finds
them. A cgroup holds on to them: a process cannot leave it without write access to a
``cgroup.procs`` file outside it, and its children are born in it. With the agent setting
``ACSP_AGENT_TASK_CGROUP`` set to a cgroup v2 folder delegated to the agent, each task gets a
child cgroup there, named after its task id:

    ACSP_AGENT_TASK_CGROUP/
        launcher/          the task launcher between two starts
        task-<task id>/    one task's processes, and nothing else

The task's first process joins its cgroup before it executes the program. The launcher moves
itself into the task's cgroup, starts the task, and moves itself back into ``launcher/`` (see
:mod:`agents.launcher`). Both moves stay inside the delegated folder, which is what the kernel
requires of an agent that is not root. After a stop's grace period, and when a task ends,
the agent writes 1 to the cgroup's ``cgroup.kill`` (Linux 5.14 and later), which sends
SIGKILL to everything in it, and removes the cgroup once ``cgroup.events`` reports
``populated 0``. A cgroup still populated after that is killed and removed again with a
backoff that grows to 5 minutes (:func:`remove_until_gone`). The name depends on the task id
alone, so a restarted agent finds the cgroups of the tasks it adopts. At start the agent also
kills and removes, with the same retries, each task cgroup that belongs to no task it tracks,
such as one still populated when the previous agent stopped (:meth:`TaskCgroups.stale`). So
the folder must be the agent's alone, because two agents that share it kill each other's tasks:
an agent locks it at start (:meth:`TaskCgroups.lock`), and a second agent on it fails to start.

A launcher that stops replying between its two moves stays in the task's cgroup until it
resumes. The kills of a failed start spare it, because it still records the exit status of
its other tasks, and remove the cgroup once it has left.

The launcher and the tasks run only in leaf cgroups. The kernel allows no process in a cgroup
that enables controllers for its children. So an operator who wants to limit each task's memory
also moves the agent into a leaf, then enables the controllers in the folder's
``cgroup.subtree_control``.

NOTE: a task that runs as root (the agent is root and no task user is set) may write any
``cgroup.procs``, so its processes can still move out of its cgroup and escape the kill.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import os
import signal
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from agents.task_process import process_start_ticks, stat_fields, task_file_stem

logger = logging.getLogger(__name__)

TASK_CGROUP_ENV = "ACSP_AGENT_TASK_CGROUP"
LAUNCHER_CGROUP = "launcher"
"""Name of the child cgroup that the task launcher runs in between starts."""
_TASK_PREFIX = "task-"
_MAX_NAME_STEM = 128
_EMPTY_WAIT_S = 5.0
"""Maximum seconds to wait for a killed cgroup to report ``populated 0``. SIGKILL ends a
process within milliseconds unless it sleeps uninterruptibly (a hung file system or device)."""
_EMPTY_POLL_S = (0.001, 0.05)
"""First and maximum seconds between reads of ``cgroup.events``. The interval doubles."""


class TaskCgroupError(Exception):
    """The cgroup folder of ``ACSP_AGENT_TASK_CGROUP`` cannot hold the tasks' cgroups."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix


def parse_task_cgroup(text: str) -> Path:
    """Check that ``text`` is an absolute, normalized folder path, or raise ValueError.

    The folder itself is checked at agent start, by :func:`check_task_cgroup`.
    """
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    if os.path.normpath(text) != text.rstrip("/") or "\n" in text:
        raise ValueError(f"{text!r} contains . or .. or repeated / (use the plain path)")
    return Path(text)


def check_task_cgroup(root: Path) -> None:
    """Check that ``root`` is a cgroup v2 folder with ``cgroup.kill`` that the agent can use.

    Creates and removes a child cgroup to check the agent's access. Raises
    :class:`TaskCgroupError` with the reason and the fix.
    """
    if not root.is_dir():
        raise TaskCgroupError(
            f"{root} is not a folder",
            "create it (mkdir) under a cgroup v2 mount, or point the setting to one",
        )
    fs_type = _mount_type(root)
    if fs_type != "cgroup2":
        raise TaskCgroupError(
            f"{root} is on a {fs_type or 'unknown'} file system, not cgroup2",
            "point it to a folder under the cgroup v2 mount (/sys/fs/cgroup on a unified "
            "hierarchy, /sys/fs/cgroup/unified on a hybrid one)",
        )
    if not (root / "cgroup.kill").exists():
        raise TaskCgroupError(
            f"{root} has no cgroup.kill file: it is the root cgroup, or the kernel is older "
            "than Linux 5.14",
            "point it to a child cgroup (for example one that systemd delegates to the agent "
            "with Delegate=yes), on Linux 5.14 or later",
        )
    probe = root / f"probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        writable = _writable(probe / "cgroup.procs")
        probe.rmdir()
    except OSError as error:
        raise TaskCgroupError(
            f"no child cgroup can be created in {root}: {error.strerror or error}",
            "delegate the folder to the agent's user (systemd: Delegate=yes, "
            "ProtectControlGroups=no), or run the agent as root",
        ) from None
    if not writable:
        raise TaskCgroupError(
            f"the agent cannot move processes into the child cgroups of {root}",
            "delegate the folder to the agent's user (systemd: Delegate=yes), so that it owns "
            "the cgroup.procs files",
        )
    # The kernel lets a process move another only with write access to the cgroup.procs of
    # the cgroup that contains both, so the launcher's first move, from the agent's cgroup into
    # launcher/, needs that access too.
    own = _own_cgroup_folder(root)
    if own is not None:
        ancestor = Path(os.path.commonpath([own, os.path.realpath(root)]))
        if not _writable(ancestor / "cgroup.procs"):
            raise TaskCgroupError(
                f"the agent runs in cgroup {own}, outside {root}, and cannot write the "
                f"cgroup.procs of {ancestor}, which contains both",
                "run the agent inside the folder (systemd's Delegate=yes runs it in its unit's "
                "cgroup: point the setting there), or run the agent as root",
            )


def _writable(path: Path) -> bool:
    """Return whether this process may write ``path``, by its effective ids where possible."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def _own_cgroup_folder(root: Path) -> Path | None:
    """Return the folder of this process's cgroup v2 on the mount of ``root``, or None.

    None when it cannot be found: no ``0::`` line in ``/proc/self/cgroup``, or a cgroup
    namespace that hides the path.
    """
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    mount = _mount_point(root)
    if own is None or mount is None or not own.startswith("/"):
        return None
    return Path(mount) / own.lstrip("/")


def _mount_type(path: Path) -> str:
    """Return the file system type of the mount that contains ``path``, or "" if unknown."""
    found = _find_mount(path)
    return "" if found is None else found[1]


def _mount_point(path: Path) -> str | None:
    """Return the mount point of the mount that contains ``path`` if it shows its root, or None."""
    found = _find_mount(path)
    # A mount of a cgroup below the root (a cgroup namespace, a bind mount) shows only part.
    return None if found is None or found[2] != "/" else found[0]


def _find_mount(path: Path) -> tuple[str, str, str] | None:
    """Return the mount point, the file system type and the mounted root of ``path``'s mount."""
    target = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
            lines = file.readlines()
    except OSError:
        return None
    for line in lines:
        # Field 4 is the mounted root and field 5 the mount point. The file system type
        # follows the " - " separator.
        fields, _sep, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount_point = parts[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # A later mount on the same point hides the earlier one.
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, rest.split()[0], parts[3].replace("\\040", " "))
    return best


def cgroup_name(task_id: str) -> str:
    """Return the name of ``task_id``'s cgroup: ``task-`` and the id, made safe.

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``. When that
    changes the id or cuts it, a hash of the whole id follows, so that two ids never share a
    cgroup.
    """
    stem = task_file_stem(task_id)[:_MAX_NAME_STEM]
    if stem != task_id:
        stem += "-" + hashlib.sha256(task_id.encode()).hexdigest()[:16]
    return _TASK_PREFIX + stem


class TaskCgroups:
    """The task cgroups under one delegated cgroup v2 folder (``ACSP_AGENT_TASK_CGROUP``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stale_names: set[str] = set()
        """Names of the cgroups of no task that the agent kills and removes, and may still be
        retrying. A task whose cgroup has such a name must not start while it exists, because
        a retry would kill the task too."""
        self._lock_descriptor = -1

    def lock(self) -> None:
        """Lock the folder for this process, so that no other agent uses it meanwhile.

        Takes an exclusive ``flock`` on the folder without waiting, which the kernel releases
        when the process ends, and raises :class:`TaskCgroupError` when another process holds
        it. The descriptor is close-on-exec, so the task launcher does not keep the lock.
        """
        if self._lock_descriptor >= 0:
            return
        try:
            descriptor = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise TaskCgroupError(
                f"{self.root} cannot be opened to lock it: {error.strerror or error}",
                "give the agent's user read access to the folder",
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if not isinstance(error, BlockingIOError):
                raise TaskCgroupError(
                    f"{self.root} cannot be locked: {error.strerror or error}",
                    "point the setting to a folder under the cgroup v2 mount",
                ) from None
            raise TaskCgroupError(
                f"another agent uses the task cgroups in {self.root}, and each agent kills the "
                "task cgroups there that belong to none of its own tasks",
                "stop that agent first, or give each agent a cgroup folder of its own",
            ) from None
        self._lock_descriptor = descriptor

    def unlock(self) -> None:
        """Release the lock that :meth:`lock` took. A second call does nothing."""
        descriptor, self._lock_descriptor = self._lock_descriptor, -1
        if descriptor >= 0:
            os.close(descriptor)

    @property
    def launcher_home(self) -> Path:
        """The cgroup that the task launcher runs in between two starts."""
        return self.root / LAUNCHER_CGROUP

    def make_launcher_home(self) -> Path:
        """Create the launcher's cgroup if needed, and return its path."""
        self.launcher_home.mkdir(exist_ok=True)
        return self.launcher_home

    def path(self, task_id: str) -> Path:
        return self.root / cgroup_name(task_id)

    def create(self, task_id: str) -> Path:
        """Create ``task_id``'s cgroup, or keep the one left by a start that never ran."""
        path = self.path(task_id)
        path.mkdir(exist_ok=True)
        return path

    def find(self, task_id: str) -> Path | None:
        """Return the cgroup of a task that runs, found by its name, or None if none exists."""
        path = self.path(task_id)
        return path if path.is_dir() else None

    def stale(self, task_ids: Iterable[str]) -> list[Path]:
        """Return the task cgroups in the folder that belong to none of ``task_ids``.

        Logs an error and returns an empty list when the folder cannot be listed.
        """
        names = {cgroup_name(task_id) for task_id in task_ids}
        try:
            entries = list(os.scandir(self.root))
        except OSError as error:
            logger.error("cannot list the task cgroups in %s: %s", self.root, error)
            return []
        return sorted(
            Path(entry.path)
            for entry in entries
            if entry.name.startswith(_TASK_PREFIX)
            and entry.name not in names
            and entry.is_dir(follow_symlinks=False)
        )


def is_populated(cgroup: Path) -> bool:
    """Return whether a process runs in ``cgroup`` or below it, and False if it is gone."""
    try:
        with open(cgroup / "cgroup.events", "rb") as file:
            events = file.read()
    except FileNotFoundError:
        return False
    return b"populated 1" in events


def member_pids(cgroup: Path) -> list[int]:
    """Return the processes in ``cgroup`` and in the cgroups below it (a task may make some)."""
    pids: list[int] = []
    for folder, _subfolders, _files in os.walk(cgroup):
        try:
            with open(os.path.join(folder, "cgroup.procs"), "rb") as file:
                pids.extend(int(pid) for pid in file.read().split())
        except FileNotFoundError:
            continue
    return pids


def signal_members(cgroup: Path, signum: int, outside_group: int = 0) -> int:
    """Send ``signum`` to the processes in ``cgroup``, and return how many got it.

    With ``outside_group``, processes of that process group are left out, because the caller
    signals the group with ``killpg``. Processes that exit meanwhile are skipped.
    """
    signalled = 0
    for pid in member_pids(cgroup):
        if outside_group:
            fields = stat_fields(pid)
            if fields is None or int(fields[2]) == outside_group:
                continue
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
        except PermissionError as error:
            logger.error("cannot signal process %d of cgroup %s: %s", pid, cgroup, error)
            continue
        signalled += 1
    return signalled


def kill_members(cgroup: Path) -> bool:
    """Write 1 to ``cgroup.kill``, which sends SIGKILL to every process in and below it.

    Returns False if the cgroup is gone.
    """
    try:
        descriptor = os.open(cgroup / "cgroup.kill", os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        os.write(descriptor, b"1")
    finally:
        os.close(descriptor)
    return True


def remove(cgroup: Path) -> bool:
    """Remove an empty cgroup and the cgroups below it, or return False if one is populated.

    A cgroup that is already gone counts as removed.
    """
    try:
        os.rmdir(cgroup)
        return True
    except FileNotFoundError:
        return True
    except OSError as error:
        # EBUSY: processes, or cgroups that the task made below its own.
        if error.errno != errno.EBUSY:
            raise
    for folder, _subfolders, _files in os.walk(cgroup, topdown=False):
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError as error:
            if error.errno == errno.EBUSY:
                return False
            raise
    return True


LauncherIdentity = tuple[int, int]
"""A task launcher's pid and start ticks, as :attr:`agents.task_process.TaskLauncher.identity`."""


def _kill(
    cgroup: Path, task_id: str, spared: Collection[LauncherIdentity], retry: bool = False
) -> tuple[int, bool]:
    """Send SIGKILL to the processes in ``cgroup``, and return how many and whether a launcher
    of ``spared`` is among them. A ``retry`` logs the spared launcher at DEBUG only.

    A task launcher is in a task's cgroup only between its move in and its move out around a
    start. One that stopped replying there (blocked, or stopped) still records the exits of
    its other tasks, so it is left alive, and the others get SIGKILL one by one in place of
    ``cgroup.kill``. A child that it starts after the list was read is killed by a later retry.
    """
    if not is_populated(cgroup):
        return 0, False
    members = member_pids(cgroup)
    inside = {
        pid
        for pid, ticks in spared
        if pid in members and ticks and process_start_ticks(pid) == ticks
    }
    if not inside:
        kill_members(cgroup)
        return len(members), False
    log = logger.debug if retry else logger.warning
    log(
        "task launcher %s is in cgroup %s of task %s; sending SIGKILL to its other processes "
        "one by one and removing the cgroup once the launcher has left",
        ", ".join(map(str, sorted(inside))),
        cgroup,
        task_id,
    )
    _kill_listed(cgroup, [pid for pid in members if pid not in inside])
    return len(members) - len(inside), True


def _kill_listed(cgroup: Path, pids: list[int]) -> None:
    """Send SIGKILL to each of ``pids`` that is still in ``cgroup``, through a pidfd.

    A listed process may exit and its pid go to a process outside the cgroup before the
    signal. So each pid is pinned with a pidfd first, and the membership is read again. A
    pidfd whose process is alive when signalled held its pid when the membership was read.
    """
    pidfds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        still_inside = set(member_pids(cgroup))
        for pid, pidfd in pidfds.items():
            if pid not in still_inside:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                continue
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


async def _wait_empty(cgroup: Path) -> bool:
    """Wait up to :data:`_EMPTY_WAIT_S` for ``cgroup`` to report ``populated 0``."""
    interval_s, max_interval_s = _EMPTY_POLL_S
    deadline = time.monotonic() + _EMPTY_WAIT_S
    while is_populated(cgroup):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
        interval_s = min(interval_s * 2, max_interval_s)
    return True


async def kill_and_remove(
    cgroup: Path, task_id: str, spared: Collection[LauncherIdentity] = ()
) -> int:
    """Kill what runs in a task's cgroup, wait until it is empty, and remove it.

    Returns how many processes were killed. A cgroup still populated after
    :data:`_EMPTY_WAIT_S` seconds, or one that contains a launcher of ``spared``, is logged and
    left in place for :func:`remove_until_gone`. ``OSError`` of the removal is logged too, so
    that a task always ends.
    """
    count, launcher_inside = _kill(cgroup, task_id, spared)
    if launcher_inside:
        return count
    if await _wait_empty(cgroup):
        _remove_logged(cgroup, task_id)
        return count
    logger.error(
        "cgroup %s of task %s still has processes %s %g s after SIGKILL; leaving it in place "
        "and retrying later",
        cgroup,
        task_id,
        member_pids(cgroup),
        _EMPTY_WAIT_S,
    )
    return count


async def remove_until_gone(
    cgroup: Path,
    task_id: str,
    delays: Iterator[float],
    spared: Collection[LauncherIdentity] = (),
) -> None:
    """Kill what runs in a cgroup that :func:`kill_and_remove` left in place, and remove it,
    after each delay of ``delays`` until it is gone.

    Logs the processes that remain after each attempt at DEBUG, because the first attempt
    logged them at ERROR, and the removal at INFO.
    """
    attempts = 1
    while os.path.isdir(cgroup):  # noqa: ASYNC240 - cgroupfs, which never waits on a disk
        await asyncio.sleep(next(delays))
        attempts += 1
        count, launcher_inside = _kill(cgroup, task_id, spared, retry=True)
        if not launcher_inside and await _wait_empty(cgroup):
            try:
                if remove(cgroup):
                    logger.info(
                        "cgroup %s of task %s removed after %d attempts, the last of which "
                        "killed %d processes",
                        cgroup,
                        task_id,
                        attempts,
                        count,
                    )
                    return
            except OSError as error:
                logger.debug("cannot remove cgroup %s of task %s: %s", cgroup, task_id, error)
                continue
        logger.debug(
            "cgroup %s of task %s still has processes %s after %d attempts",
            cgroup,
            task_id,
            member_pids(cgroup),
            attempts,
        )


def kill_and_remove_now(
    cgroup: Path, task_id: str, spared: Collection[LauncherIdentity] = ()
) -> int:
    """Do what :func:`kill_and_remove` does, blocking, for a task that ended while the agent
    was down (one per such task, at start)."""
    count, launcher_inside = _kill(cgroup, task_id, spared)
    if launcher_inside:
        return count
    deadline = time.monotonic() + _EMPTY_WAIT_S
    while is_populated(cgroup):
        if time.monotonic() > deadline:
            logger.error(
                "cgroup %s of task %s still has processes %s after SIGKILL; leaving it in "
                "place and retrying later",
                cgroup,
                task_id,
                member_pids(cgroup),
            )
            return count
        time.sleep(_EMPTY_POLL_S[0])
    _remove_logged(cgroup, task_id)
    return count


def _remove_logged(cgroup: Path, task_id: str) -> None:
    try:
        if not remove(cgroup):
            logger.error("cgroup %s of task %s is populated again; leaving it", cgroup, task_id)
    except OSError as error:
        logger.error("cannot remove cgroup %s of task %s: %s", cgroup, task_id, error)
