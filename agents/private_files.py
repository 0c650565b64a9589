"""The modes of the files that only the agent reads: state, spool, dead letters, counters, lock.

The state folder may be one that every local user can pass through. A local mesh run as root,
for one, keeps its fleet's state in the temporary folder with mode 0711, so that the tasks'
user reaches its task folder. These files contain job and task ids, task records and usage
samples, so the agent creates them readable and writable by its own user alone (mode 0600,
less what the umask clears), and the spool's folder with mode 0700.
:func:`restrict_modes` narrows the modes of such files that an earlier version created.

The task folder, the task logs and the hosts files keep the modes that the tasks' users need.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

PRIVATE_FILE_MODE: Final = 0o600
PRIVATE_FOLDER_MODE: Final = 0o700


def private_opener(path: str, flags: int) -> int:
    """Open ``path`` for :func:`open`, creating a missing file with mode 0600."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def restrict_modes(paths: Iterable[Path]) -> list[Path]:
    """Remove the group's and others' access from those of ``paths`` that have it.

    Changes only regular files and folders of the agent's user, never the target of a
    symbolic link. A file is left with mode 0600 at most, and a folder with 0700 at most. A
    missing path is skipped, and one whose mode cannot be changed is logged. Returns the
    paths changed.
    """
    changed = []
    for path in paths:
        try:
            status = path.lstat()
        except FileNotFoundError:
            continue
        if status.st_uid != os.geteuid() or not status.st_mode & 0o077:
            continue
        if stat.S_ISREG(status.st_mode):
            mode = stat.S_IMODE(status.st_mode) & PRIVATE_FILE_MODE
        elif stat.S_ISDIR(status.st_mode):
            mode = stat.S_IMODE(status.st_mode) & PRIVATE_FOLDER_MODE
        else:
            continue
        try:
            path.chmod(mode)
        except OSError as error:
            logger.warning(
                "%s (mode %03o) stays readable by other users: %s",
                path,
                stat.S_IMODE(status.st_mode),
                error.strerror or error,
            )
            continue
        changed.append(path)
    if changed:
        logger.info("removed the access of other users from %s", ", ".join(map(str, changed)))
    return changed
