"""The unprivileged user that a node's tasks run as (``ACSP_AGENT_TASK_USER``), and its checks.

By default a task runs as the agent's own user, so a job's code can read what the agent reads
(its NATS credentials, TLS keys and state) and signal the agent and its task launcher. With a
task user set, each task runs with that user's uid, primary group and supplementary groups,
and with none of the agent's groups or capabilities. Then the kernel keeps the task from
signalling or tracing the agent and the launcher, which run as another uid, and file modes keep
it from the agent's files.

The agent must be able to switch user: it runs as root, or has the capabilities in
:data:`NON_ROOT_CAPABILITIES`. :func:`check_agent_can_switch` checks that at start.

Tasks share the node's task folder (``<state dir>/tasks``), their working directory, where they
write their outputs and checkpoint files. :func:`share_task_folder` gives the task user's group
write access to it, with the sticky bit, so that a task cannot remove or replace the logs and
exit status files that the agent owns there.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.runtime.settings import SettingsError

logger = logging.getLogger(__name__)

TASK_USER_ENV: Final = "ACSP_AGENT_TASK_USER"

CAPABILITY_NUMBERS: Final = {
    "CAP_CHOWN": 0,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SYS_PTRACE": 19,
}
"""Numbers of the capabilities named here, from ``linux/capability.h``."""

NON_ROOT_CAPABILITIES: Final = (
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_DAC_READ_SEARCH",
    "CAP_SYS_PTRACE",
)
"""Capabilities an agent that is not root needs to run tasks as another user.

CAP_SETUID and CAP_SETGID switch the user. CAP_KILL stops the tasks. CAP_CHOWN gives the task
folder to the task user's group. CAP_DAC_READ_SEARCH reads the checkpoint files that tasks
write. CAP_SYS_PTRACE reads a task's ``/proc/<pid>/environ``, where the agent finds a task whose
start got no reply, and shows other users' processes under ``hidepid``.
"""

LAUNCHER_CAPABILITIES: Final = ("CAP_SETUID", "CAP_SETGID")
"""Capabilities the task launcher, a program the agent executes, needs in the ambient set."""

POOL_LAUNCHER_CAPABILITIES: Final = (*LAUNCHER_CAPABILITIES, "CAP_DAC_READ_SEARCH")
"""Capabilities the task launcher needs with a pool of task users, which also enters each
job's folder (mode 0700, owned by the job's user) to start the job's tasks there."""

TASK_FOLDER_MODE: Final = 0o1770
"""Mode of the task folder with a task user: the agent owns it, the task user's group writes,
and the sticky bit keeps that group from removing or renaming the agent's files."""


@dataclass(frozen=True, slots=True)
class TaskUser:
    """A user that tasks run as."""

    name: str
    """Name in the user database, or the uid as text when it has no entry."""
    uid: int
    gid: int
    """Primary group id."""
    groups: tuple[int, ...]
    """Supplementary group ids, the primary one among them when the user database lists it."""
    home: str
    """Home folder from the user database; empty when the uid has no entry."""

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"

    @property
    def launcher_argument(self) -> str:
        """The user as the task launcher's ``--user`` argument: ``UID:GID:G1,G2``."""
        return f"{self.uid}:{self.gid}:{','.join(str(group) for group in self.groups)}"


def parse_task_user(text: str) -> TaskUser:
    """Parse ``USER[:GROUP]``, each a name or a number, from the user and group databases.

    Raises ValueError with the reason for an unknown user or group, and for root: a task that
    runs as uid 0 or gid 0 keeps the powers that a task user is meant to take away.
    """
    user_text, _, group_text = text.partition(":")
    entry = _user_entry(user_text)
    if entry is None:
        if not user_text.isdigit():
            raise ValueError(f"no user {user_text!r} in the user database")
        if not group_text:
            raise ValueError(
                f"uid {user_text} has no entry in the user database, so give its group"
            )
        uid, name, home, base_gid = int(user_text), user_text, "", None
    else:
        uid, name, home, base_gid = entry.pw_uid, entry.pw_name, entry.pw_dir, entry.pw_gid
    gid = _group_id(group_text) if group_text else base_gid
    assert gid is not None
    groups = tuple(sorted(set(os.getgrouplist(name, gid)))) if entry is not None else ()
    if uid == 0:
        raise ValueError("it is root (uid 0), which would give tasks the agent's powers")
    if gid == 0 or 0 in groups:
        raise ValueError("its groups include root (gid 0), which would give tasks root's files")
    return TaskUser(name, uid, gid, groups, home)


def _user_entry(text: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        return None


def _group_id(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group {text!r} in the group database") from None


def capability_sets(status_text: str) -> dict[str, int]:
    """Return the capability sets (``CapEff``, ``CapAmb`` …) of a ``/proc/<pid>/status`` text."""
    sets = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            sets[key] = int(value.strip(), 16)
    return sets


def missing_capabilities(capabilities: int, names: Iterable[str]) -> list[str]:
    """Return those of ``names`` whose bit is not set in the capability set ``capabilities``."""
    return [name for name in names if not capabilities >> CAPABILITY_NUMBERS[name] & 1]


def check_agent_can_switch(
    user: TaskUser,
    uses_launcher: bool,
    euid: int | None = None,
    status_text: str | None = None,
    variable: str = TASK_USER_ENV,
    launcher_capabilities: tuple[str, ...] = LAUNCHER_CAPABILITIES,
    egid: int | None = None,
) -> None:
    """Raise :class:`SettingsError` unless this process can start tasks as ``user``, a user
    outside the agent's primary group.

    ``uses_launcher`` is True when the task launcher, a program that the agent executes, starts
    the tasks. The launcher keeps only the agent's ambient capabilities. ``euid`` and
    ``status_text`` (``/proc/self/status``) default to this process's own, and so does
    ``egid``. ``variable`` is
    the setting that names ``user``, for the error, and ``launcher_capabilities`` those that
    the launcher needs.
    """
    euid = os.geteuid() if euid is None else euid
    if user.uid == euid:
        raise SettingsError(
            variable,
            f"{user} is the agent's own user, so tasks could signal the agent and read its files",
            "create a separate unprivileged user for tasks, or unset it",
        )
    egid = os.getegid() if egid is None else egid
    if egid in (user.gid, *user.groups):
        raise SettingsError(
            variable,
            f"{user} is in the agent's group {egid}, so tasks could read the task logs and "
            "other files that the agent shares with its group",
            "give tasks a user outside the agent's group, or run the agent with another group",
        )
    if euid == 0:
        return
    if status_text is None:
        status_text = Path("/proc/self/status").read_text(encoding="ascii")
    sets = capability_sets(status_text)
    missing = missing_capabilities(sets.get("CapEff", 0), NON_ROOT_CAPABILITIES)
    if uses_launcher:
        ambient = missing_capabilities(sets.get("CapAmb", 0), launcher_capabilities)
        missing += [f"ambient {name}" for name in ambient]
    if missing:
        raise SettingsError(
            variable,
            f"the agent runs as uid {euid} without {', '.join(missing)}, so it cannot start"
            f" tasks as {user}",
            "run the agent as root, or grant it the ambient capabilities "
            f"{' '.join(NON_ROOT_CAPABILITIES)} (systemd: AmbientCapabilities=), or unset it",
        )


def check_task_folder_reachable(user: TaskUser, state_dir: Path) -> None:
    """Raise :class:`SettingsError` if ``user`` cannot search the folders down to ``state_dir``.

    Tasks get the absolute path of their checkpoint file in the task folder under it. Only the
    mode bits are read, not access control lists.
    """
    folder = state_dir.absolute()
    for path in (folder, *folder.parents):
        if not _user_may(user, path.stat(), stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            raise SettingsError(
                "ACSP_AGENT_STATE_DIR",
                f"{path} is not searchable by the task user {user}, so tasks cannot reach"
                f" their folder {folder / 'tasks'}",
                f"let them search it (chmod o+x {path}; the state directory may be 0711), or"
                " choose a state directory that they can reach",
            )


def warn_readable_files(user: TaskUser | None, files: Iterable[tuple[str, Path]]) -> list[str]:
    """Log a warning for each credential file that users other than the agent's may read.

    ``files`` pairs each setting with its file or folder. One is flagged when its mode lets
    others read it (list it, for a folder), or lets the task user ``user`` do so. Returns the
    settings flagged.
    """
    flagged = []
    for variable, path in files:
        try:
            status = path.stat()
        except OSError as error:
            logger.warning("cannot check the mode of %s=%s: %s", variable, path, error)
            continue
        readable_by_task = user is not None and _user_may(
            user, status, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH
        )
        if status.st_mode & stat.S_IROTH or readable_by_task:
            flagged.append(variable)
            logger.warning(
                "%s=%s (mode %03o) is readable by users other than the agent's%s; "
                "make it readable only by the agent's user (chmod %s)",
                variable,
                path,
                stat.S_IMODE(status.st_mode),
                f", among them the task user {user}" if readable_by_task else "",
                "711" if stat.S_ISDIR(status.st_mode) else "600",
            )
    return flagged


def _user_may(user: TaskUser, status: os.stat_result, owner: int, group: int, other: int) -> bool:
    """Return whether ``user`` gets a permission from a file's mode bits (one bit per class)."""
    if status.st_uid == user.uid:
        return bool(status.st_mode & owner)
    if status.st_gid == user.gid or status.st_gid in user.groups:
        return bool(status.st_mode & group)
    return bool(status.st_mode & other)


def share_task_folder(folder: Path, user: TaskUser) -> None:
    """Give ``user``'s group write access to the task folder, with the sticky bit."""
    os.chown(folder, -1, user.gid)
    os.chmod(folder, TASK_FOLDER_MODE)
