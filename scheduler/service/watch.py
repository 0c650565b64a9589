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


QUEUED_JOBS: Final = 8192
"""Jobs whose changes one watch may have waiting before it is closed."""


@dataclass(eq=False, slots=True)
class Watcher:
    """One stream's subscription; empty filters match every job.

    Changes wait in ``pending``, the latest per job: a job that changes again before the stream
    sends it keeps its place with its new state, so repeated changes of the same jobs take no
    more room. More than ``limit`` jobs waiting closes the watch.
    """

    job_id: str
    project_id: str
    subject: str = ""
    """The caller that opened the stream."""
    limit: int = QUEUED_JOBS
    pending: dict[str, Job] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False

    def matches(self, job: Job) -> bool:
        # A job array's parent id matches its elements. Array ids are drawn like job ids, so
        # no single job has an id equal to an array's id.
        if self.job_id and self.job_id not in (job.job_id, job.array_id):
            return False
        return not self.project_id or job.spec.project_id == self.project_id

    def offer(self, job: Job) -> bool:
        """Queue the change of ``job``; return False if that would pass the limit."""
        if job.job_id not in self.pending and len(self.pending) >= self.limit:
            return False
        self.pending[job.job_id] = job
        self.arrived.set()
        return True

    async def next(self, timeout_s: float) -> Job | None:
        """Return the next change, or None after ``timeout_s`` without one.

        Raises :class:`WatchOverflow` once the watch overflowed and its queue is empty.
        """
        if not self.pending and not self.overflowed:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=timeout_s)
            except TimeoutError:
                return None
        if self.pending:
            return self.pending.pop(next(iter(self.pending)))
        if self.overflowed:
            raise WatchOverflow("the watch fell behind; watch again with send_initial")
        return None

    def take_queued(self) -> list[Job]:
        """Remove and return the queued changes, oldest first, without waiting.

        Raises :class:`WatchOverflow` if the watch overflowed.
        """
        if self.overflowed:
            raise WatchOverflow("the watch fell behind; watch again with send_initial")
        changes = list(self.pending.values())
        self.pending.clear()
        return changes


class WatchHub:
    """Registry of watchers; :meth:`publish` never blocks the scheduling loop."""

    def __init__(
        self, queue_size: int = QUEUED_JOBS, max_per_caller: int = MAX_WATCHES_PER_CALLER
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
        watcher = Watcher(job_id, project_id, subject, self._queue_size)
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
                if not watcher.offer(job):
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
        watcher.arrived.set()
