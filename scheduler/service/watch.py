"""Fan-out of committed job changes to ``WatchJobs`` streams, with a bounded queue each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import grpc

from services.runtime.errors import CallerError

from .model import Job

logger = logging.getLogger(__name__)

MAX_WATCHES_PER_CALLER: Final = 64
"""Streams one caller may have open. Every stream takes one of the server's concurrent calls
(ACSP_GRPC_MAX_CONCURRENT_RPCS, 1000 by default), so one caller cannot take them all."""


class TooManyWatches(CallerError):
    """A caller already has the maximum number of open watches."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WatchOverflow(Exception):
    """A watcher fell behind by more than its queue holds; it must watch again."""


@dataclass(eq=False, slots=True)
class Watcher:
    """One stream's subscription; empty filters match every job."""

    job_id: str
    project_id: str
    subject: str = ""
    """The caller that opened the stream."""
    # NOTE: a pass that changes more matching jobs than the queue can queue (the first pass over a
    # large new array, say) closes the watch at once, however fast its caller reads.
    queue: asyncio.Queue[Job | None] = field(default_factory=lambda: asyncio.Queue(1024))
    overflowed: bool = False

    def matches(self, job: Job) -> bool:
        # A job array's parent id matches its elements. Array ids are drawn like job ids, so
        # no single job has an id equal to an array's id.
        if self.job_id and self.job_id not in (job.job_id, job.array_id):
            return False
        return not self.project_id or job.spec.project_id == self.project_id

    async def next(self, timeout_s: float) -> Job | None:
        """Return the next change, or None after ``timeout_s`` without one.

        Raises :class:`WatchOverflow` once the queue overflowed and is drained.
        """
        try:
            job = await asyncio.wait_for(self.queue.get(), timeout=timeout_s)
        except TimeoutError:
            return None
        if job is None:
            raise WatchOverflow("the watch fell behind; watch again with send_initial")
        return job

    def take_queued(self) -> list[Job]:
        """Remove and return the queued changes, oldest first, without waiting.

        Raises :class:`WatchOverflow` if the queue overflowed.
        """
        changes = []
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is None:
                raise WatchOverflow("the watch fell behind; watch again with send_initial")
            changes.append(job)
        return changes


class WatchHub:
    """Registry of watchers; :meth:`publish` never blocks the scheduling loop."""

    def __init__(
        self, queue_size: int = 1024, max_per_caller: int = MAX_WATCHES_PER_CALLER
    ) -> None:
        self._watchers: set[Watcher] = set()
        # Each watcher is indexed by its narrowest filter, so a change visits only the
        # watchers that may match it instead of every open stream.
        self._by_job: dict[str, set[Watcher]] = {}
        self._by_project: dict[str, set[Watcher]] = {}
        self._unfiltered: set[Watcher] = set()
        self._queue_size = queue_size
        self._max_per_caller = max_per_caller

    def subscribe(self, job_id: str = "", project_id: str = "", subject: str = "") -> Watcher:
        """Register a watcher; raise :class:`TooManyWatches` past the caller's limit."""
        open_count = sum(1 for watcher in self._watchers if watcher.subject == subject)
        if open_count >= self._max_per_caller:
            raise TooManyWatches(
                f"{subject!r} already has {open_count} open WatchJobs streams, the maximum; "
                "close one, or watch a whole project with project_id instead of single jobs"
            )
        watcher = Watcher(job_id, project_id, subject, asyncio.Queue(self._queue_size))
        self._watchers.add(watcher)
        self._index_of(watcher).add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        index = self._index_of(watcher)
        index.discard(watcher)
        if not index and index is not self._unfiltered:
            # Drop the emptied set, so finished watches of many jobs leave no keys behind.
            if watcher.job_id:
                self._by_job.pop(watcher.job_id, None)
            else:
                self._by_project.pop(watcher.project_id, None)

    def publish(self, jobs: Iterable[Job]) -> None:
        if not self._watchers:
            return
        for job in jobs:
            for watcher in self._candidates(job):
                if watcher.overflowed or not watcher.matches(job):
                    continue
                try:
                    watcher.queue.put_nowait(job)
                except asyncio.QueueFull:
                    self._overflow(watcher)

    def _index_of(self, watcher: Watcher) -> set[Watcher]:
        if watcher.job_id:
            return self._by_job.setdefault(watcher.job_id, set())
        if watcher.project_id:
            return self._by_project.setdefault(watcher.project_id, set())
        return self._unfiltered

    def _candidates(self, job: Job) -> list[Watcher]:
        """Return the watchers that may match ``job``, copied so that an overflow may remove
        one while the caller iterates."""
        found = [*self._unfiltered, *self._by_job.get(job.job_id, ())]
        if job.array_id:
            found += self._by_job.get(job.array_id, ())
        found += self._by_project.get(job.spec.project_id, ())
        return found

    def _overflow(self, watcher: Watcher) -> None:
        watcher.overflowed = True
        self.unsubscribe(watcher)
        logger.warning(
            "watch of job %r project %r fell behind and was closed",
            watcher.job_id,
            watcher.project_id,
        )
        # Make room for the end marker by dropping the oldest queued change.
        watcher.queue.get_nowait()
        watcher.queue.put_nowait(None)
