"""Sweeps of the node's shared scratch folders (``ACSP_AGENT_SCRATCH_DIRS``) for a pool user's
files, before the pool hands the user to another job.

A job that runs as a pool user may leave files in ``/tmp``, ``/var/tmp`` or ``/dev/shm``
outside its own folder. They keep the user's uid, so the user's next job, maybe another
project's, could read and change them. When a user's last job on the node has ended and its
processes are gone, the agent removes whatever the user owns there, with the user's own access
(see :mod:`agents.scratch_sweep`), and only then is the user free again. A restarted agent sweeps
the users that no task runs as before it hands any out.

A sweep that leaves something of the user's keeps the user out of the pool. That is a file it
may not remove, a folder of its own that contains other users' files, or a sweep that timed out
or could not switch to the user. The sweep runs again until it finds nothing left, first after
:data:`RETRY_S` seconds, then after twice the last delay, up to :data:`MAX_RETRY_S`. A user
handed out dirty would give its next job the files that isolation is meant to keep from it,
while one user fewer costs the node one job at a time, and the log names the paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from agents.backoff import Backoff
from agents.scratch_sweep import MAX_DEPTH, SweepReport, sweep_as
from agents.task_user import TaskUser
from services.runtime.settings import SettingsError

logger = logging.getLogger(__name__)

SCRATCH_DIRS_ENV: Final = "ACSP_AGENT_SCRATCH_DIRS"
DEFAULT_SCRATCH_DIRS: Final = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
NO_SCRATCH_DIRS: Final = "none"
"""Value of ``ACSP_AGENT_SCRATCH_DIRS`` that turns the sweeps off."""

SWEEP_TIMEOUT_S: Final = 300.0
"""Seconds after which a sweep stops at its next entry and counts as failed. An estimate that
leaves room for a few million entries, not measured on a large ``/tmp``."""
RETRY_S: Final = 60.0
"""Seconds before the next sweep of a user that a sweep did not leave clean."""
MAX_RETRY_S: Final = 960.0
"""Maximum seconds between two sweeps of such a user, because each walks whole folder trees."""
MAX_CONCURRENT_SWEEPS: Final = 2
"""Sweeps that run at once. Each walks whole folder trees, so more would compete for the disk
and the CPU with the jobs."""


class ScratchSweepError(Exception):
    """A sweep could not run as the user whose files it removes."""


def parse_scratch_dirs(text: str) -> tuple[Path, ...]:
    """Parse a comma-separated list of absolute folders, or ``none`` for no folder.

    Raises ValueError naming the bad item: a relative path, ``/``, a path with ``.`` or ``..``
    parts, a folder listed twice or one inside another listed folder.
    """
    if text.strip() == NO_SCRATCH_DIRS:
        return ()
    folders: list[Path] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError("the list has an empty item; separate folders with single commas")
        if not item.startswith("/"):
            raise ValueError(f"{item!r} is not an absolute path")
        if os.path.normpath(item) != item.rstrip("/") or item.rstrip("/") == "":
            raise ValueError(
                f"{item!r} is / or has . or .. parts; give the folder's plain absolute path"
            )
        folder = Path(item)
        for other in folders:
            if folder == other:
                raise ValueError(f"{item} is listed twice")
            if folder.is_relative_to(other) or other.is_relative_to(folder):
                raise ValueError(
                    f"{item} and {other} are nested, and a sweep of the outer one covers both"
                )
        folders.append(folder)
    return tuple(folders)


def check_scratch_dirs(folders: Sequence[Path]) -> None:
    """Raise :class:`SettingsError` if one of ``folders`` exists but is not a folder.

    A sweep never follows a symbolic link, so it would fail on a listed link every time, and
    keep every user out of the pool.
    """
    for folder in folders:
        try:
            status = os.lstat(folder)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise SettingsError(
                SCRATCH_DIRS_ENV,
                f"{folder} cannot be read: {error.strerror or error}",
                "list folders that the agent can reach",
            ) from None
        if not stat.S_ISDIR(status.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(status.st_mode) else "not a folder"
            raise SettingsError(
                SCRATCH_DIRS_ENV,
                f"{folder} is {kind}",
                "list the folder itself (the target of a link), or remove the item",
            )


class ScratchSweeper:
    """Runs the sweeps of the scratch folders, each in a thread of its own."""

    def __init__(
        self,
        folders: Sequence[Path],
        timeout_s: float = SWEEP_TIMEOUT_S,
        retry_s: float = RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ) -> None:
        self.folders = tuple(folders)
        self._timeout_s = timeout_s
        self._backoff = Backoff(retry_s, max(retry_s, max_retry_s))
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_SWEEPS)

    async def sweep(self, user: TaskUser) -> SweepReport:
        """Run one sweep as ``user`` and return its report.

        Raises :class:`ScratchSweepError` when the sweep could not switch to the user. A sweep
        that runs past the timeout, or whose caller is cancelled, stops at the next entry.
        """
        async with self._slots:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[SweepReport] = loop.create_future()
            cancelled = threading.Event()
            deadline = time.monotonic() + self._timeout_s

            def stop_reason() -> str:
                if cancelled.is_set():
                    return "the sweep was cancelled"
                if time.monotonic() > deadline:
                    return f"the sweep timed out after {self._timeout_s:g} s"
                return ""

            def run() -> None:
                report: SweepReport | None = None
                failure: Exception | None = None
                try:
                    report = sweep_as(user.uid, user.gid, folders, stop_reason)
                except Exception as error:
                    failure = error
                try:
                    loop.call_soon_threadsafe(_settle, done, report, failure)
                except RuntimeError:
                    # The event loop closed while the sweep ran, so no caller awaits its report.
                    pass

            folders = [str(folder) for folder in self.folders]
            # A thread of its own, because the sweep switches the thread's file system ids,
            # which no other work may run under, even if switching back failed.
            thread = threading.Thread(target=run, name=f"scratch-sweep-uid-{user.uid}", daemon=True)
            thread.start()
            try:
                return await done
            except (OSError, ValueError) as error:
                raise ScratchSweepError(f"the sweep as {user} failed: {error}") from error
            finally:
                cancelled.set()

    async def sweep_until_clean(
        self, user: TaskUser, on_retry: Callable[[], None] | None = None
    ) -> None:
        """Sweep as ``user`` until a sweep leaves nothing of the user's, first ``retry_s`` after
        a failed one, then twice as long each time, up to ``max_retry_s``.

        Calls ``on_retry`` after each failed sweep. Logs each sweep's counts once, the first
        failure at ERROR and the later ones at DEBUG.
        """
        delays = self._backoff.delays()
        attempts = 0
        while True:
            attempts += 1
            problem = ""
            try:
                report = await self.sweep(user)
            except ScratchSweepError as error:
                problem = str(error)
            else:
                self._log_removed(user, report)
                if not report.failure_count:
                    if attempts > 1:
                        logger.info(
                            "scratch folders clean of uid %d after %d sweeps", user.uid, attempts
                        )
                    return
                problem = _describe_failures(report)
            if on_retry is not None:
                on_retry()
            delay = next(delays)
            log = logger.error if attempts == 1 else logger.debug
            log(
                "pool user uid %d stays out of the pool until a sweep of %s leaves none of its "
                "files, next sweep in %g s: %s",
                user.uid,
                ", ".join(map(str, self.folders)),
                delay,
                problem,
            )
            await asyncio.sleep(delay)

    def _log_removed(self, user: TaskUser, report: SweepReport) -> None:
        # One line per sweep, at INFO only when it removed something, because most jobs
        # leave nothing behind.
        log = logger.info if report.files or report.folders else logger.debug
        log(
            "removed %d files and %d folders (%d bytes) of uid %d from %s",
            report.files,
            report.folders,
            report.bytes,
            user.uid,
            ", ".join(map(str, self.folders)),
        )
        if report.moved:
            logger.info(
                "moved %d folders of uid %d that were nested deeper than %d folders up into "
                "their scratch folder to remove them",
                report.moved,
                user.uid,
                MAX_DEPTH,
            )


def _describe_failures(report: SweepReport) -> str:
    listed = "; ".join(f"{path}: {reason}" for path, reason in report.failures)
    more = report.failure_count - len(report.failures)
    if more:
        listed += f"; {more} more"
    return f"{report.failure_count} entries not removed ({listed})"


def _settle(
    future: asyncio.Future[SweepReport], report: SweepReport | None, error: BaseException | None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert report is not None
        future.set_result(report)
