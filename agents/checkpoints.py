"""Checkpoint files: where a task writes its latest checkpoint reference for the agent to report.

Each task started from a command gets ``ACSP_CHECKPOINT_FILE``, a path in the node's task
directory. The task writes its latest checkpoint reference there (a URI or any string of at
most :data:`MAX_REFERENCE_BYTES` bytes of UTF-8), ideally to a temporary file that it then
renames over the path, so the agent never reads half a write. The agent reads the file on its
usage tick, and on the task's end, only when the file's size, modification time or inode
changed, and reports each new reference once.

With a pool of task users (``ACSP_AGENT_TASK_USERS``) the file is in the job's own folder,
``<task folder>/jobs/<job>``, which only the job's user and the agent can enter.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agents.task_process import task_file_stem
from agents.task_users import job_folder

logger = logging.getLogger(__name__)

MAX_REFERENCE_BYTES: Final = 4096
"""Maximum length of a reported reference in UTF-8 bytes, the same as the scheduler's."""

FILE_ENV: Final = "ACSP_CHECKPOINT_FILE"
"""Environment variable that names the task's checkpoint file."""

REFERENCE_ENV: Final = "ACSP_CHECKPOINT_REF"
"""Environment variable with the reference the task resumes from; unset when there is none."""


@dataclass(slots=True)
class _Watched:
    path: Path
    stat_key: tuple[int, int, int] | None = None
    """Inode, size and modification time (ns) of the file when it was last read."""
    reported: str = ""
    """The last reference reported (or the one the task started from)."""


class CheckpointFiles:
    """The checkpoint files of one node's tasks, and the last reference reported for each."""

    def __init__(self, directory: Path, per_job: bool = False) -> None:
        """``directory`` is the task folder. With ``per_job`` the files are in the jobs'
        folders under it, which the task runner makes."""
        # Absolute, because tasks run in another working directory than the agent.
        self._directory = directory.absolute()
        self._per_job = per_job
        self._directory_made = per_job
        self._watched: dict[str, _Watched] = {}

    def environment(
        self, task_id: str, start_reference: str, job_id: str = ""
    ) -> tuple[tuple[str, str], ...]:
        """Prepare ``task_id``'s checkpoint file and return the variables that tell the task."""
        if not self._directory_made:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._directory_made = True
        path = self._path(task_id, job_id)
        watched = self._watched.get(task_id)
        if watched is None:
            self._watched[task_id] = _Watched(path, reported=start_reference)
        env = [(FILE_ENV, str(path))]
        if start_reference:
            env.append((REFERENCE_ENV, start_reference))
        return tuple(env)

    def watch(self, task_id: str, job_id: str = "") -> None:
        """Watch the file of a task found running again after an agent restart.

        The last reported reference is not persisted, so the current one is reported once
        more. The scheduler ignores a reference equal to the one it stored.
        """
        if task_id not in self._watched:
            self._watched[task_id] = _Watched(self._path(task_id, job_id))

    def changed(self, task_id: str) -> str | None:
        """Return the task's reference if it changed since the last report, else None."""
        watched = self._watched.get(task_id)
        if watched is None:
            return None
        try:
            status = watched.path.stat()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("checkpoint file of task %s is unreadable: %s", task_id, error)
            return None
        stat_key = (status.st_ino, status.st_size, status.st_mtime_ns)
        if stat_key == watched.stat_key:
            return None
        watched.stat_key = stat_key
        reference = _read_reference(task_id, watched.path)
        if reference is None or reference == watched.reported:
            return None
        watched.reported = reference
        return reference

    def forget(self, task_id: str, job_id: str = "") -> None:
        """Stop watching an ended task and delete its file.

        The file of a task that ended while the agent was down is deleted too.
        """
        self._watched.pop(task_id, None)
        try:
            self._path(task_id, job_id).unlink(missing_ok=True)
        except PermissionError as error:
            if not self._per_job:
                logger.warning("checkpoint file of task %s was not deleted: %s", task_id, error)
            # An agent that is not root cannot write in the job's folder, and the file stays
            # there with the job's other files.
        except OSError as error:
            logger.warning("checkpoint file of task %s was not deleted: %s", task_id, error)

    def _path(self, task_id: str, job_id: str) -> Path:
        folder = job_folder(self._directory, job_id) if self._per_job else self._directory
        return folder / f"{task_file_stem(task_id)}.checkpoint"


def _read_reference(task_id: str, path: Path) -> str | None:
    """Read a reference, or return None (with a warning) if it is empty, too long or not UTF-8.

    Only a regular file is read. O_NOFOLLOW keeps a task from having the agent publish another
    file through a symbolic link, and O_NONBLOCK keeps a FIFO from blocking the agent.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                logger.warning("checkpoint file of task %s is not a regular file", task_id)
                return None
            data = file.read(MAX_REFERENCE_BYTES + 1)
    except OSError as error:
        logger.warning("checkpoint file of task %s is unreadable: %s", task_id, error)
        return None
    if len(data) > MAX_REFERENCE_BYTES:
        logger.warning(
            "checkpoint reference of task %s ignored: it is over %d bytes",
            task_id,
            MAX_REFERENCE_BYTES,
        )
        return None
    try:
        reference = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        logger.warning("checkpoint reference of task %s ignored: it is not UTF-8", task_id)
        return None
    return reference or None


PLAYED_INTERVAL_ENV: Final = "ACSP_SIMULATED_CHECKPOINT_S"
"""Job environment variable: played seconds between the checkpoints a played task reports."""


class PlayedCheckpoints:
    """Checkpoints of tasks that the simulated backend plays without a process.

    A played task whose job sets :data:`PLAYED_INTERVAL_ENV` reports the reference
    ``simulated://<task_id>/<played seconds>`` after every whole interval of played time, so
    simulated fleets exercise checkpoint reporting, requeue and refunds. A resumed played task
    still plays its whole run time.
    """

    def __init__(self) -> None:
        self._intervals: dict[str, float] = {}
        self._reported: dict[str, int] = {}
        """Task id to the number of intervals already reported."""

    def add(self, task_id: str, env: tuple[tuple[str, str], ...]) -> None:
        """Start counting intervals for a task whose job environment sets the interval."""
        text = dict(env).get(PLAYED_INTERVAL_ENV)
        if text is None:
            return
        try:
            interval_s = float(text)
        except ValueError:
            interval_s = math.nan
        if not math.isfinite(interval_s) or interval_s <= 0:
            logger.warning(
                "task %s: %s=%r is not a positive number of seconds; it reports no checkpoints",
                task_id,
                PLAYED_INTERVAL_ENV,
                text,
            )
            return
        self._intervals[task_id] = interval_s

    def changed(self, task_id: str, played_s: float) -> str | None:
        """Return a new reference if another whole interval was played since the last one."""
        interval_s = self._intervals.get(task_id)
        if interval_s is None:
            return None
        steps = math.floor(played_s / interval_s)
        if steps <= self._reported.get(task_id, 0):
            return None
        self._reported[task_id] = steps
        return f"simulated://{task_id}/{steps * interval_s:g}s"

    def forget(self, task_id: str) -> None:
        self._intervals.pop(task_id, None)
        self._reported.pop(task_id, None)
