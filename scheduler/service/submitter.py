"""Group commit of submissions: many concurrent SubmitJob calls share one INSERT.

A call waits at most ``linger_s`` for others to join its batch, so under load each statement
carries hundreds of jobs while a lone call still returns within milliseconds. Before the
INSERT, one lookup of the batch's request ids rejects each call that reuses a request id for
other jobs, so a rejected call stores none of its jobs. Jobs reach the
scheduling loop only after their batch committed. Up to ``max_flushes`` batches are stored at
once, so a call that arrives during one INSERT does not wait for its round trip. Batches stored
at once may reach the loop in either order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from services.runtime.errors import ServiceError, Unavailable

from .inputs import Input, Submitted
from .model import Job
from .request_ids import Submission, check_stored, stored_keys
from .store import Fenced, JobStore

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    jobs: list[Job]
    request_ids: list[str | None]
    submissions: Sequence[Submission]
    done: asyncio.Future[list[Job]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SubmissionBatcher:
    """Batches inserts for one leader epoch."""

    def __init__(
        self,
        store: JobStore,
        epoch: int,
        inbox: asyncio.Queue[Input],
        *,
        max_batch: int = 2000,
        linger_s: float = 0.002,
        max_queued: int = 20_000,
        max_flushes: int = 2,
    ) -> None:
        self._store = store
        self._epoch = epoch
        self._inbox = inbox
        self._max_batch = max_batch
        self._linger = linger_s
        self._max_flushes = max_flushes
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_queued)

    async def submit(
        self,
        jobs: list[Job],
        request_ids: list[str | None],
        submissions: Sequence[Submission] = (),
    ) -> list[Job]:
        """Store ``jobs`` and hand them to the loop; return the stored jobs in order.

        A request id stored before returns the job first created under it. ``submissions``
        are the call's parts whose request ids are checked before anything is stored (see
        :func:`~.request_ids.check_stored`); a failed check raises its error and stores none
        of ``jobs``.
        """
        pending = _Pending(jobs, request_ids, submissions)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Unavailable(
                f"{self._queue.qsize()} submissions are queued; retry with backoff"
            ) from None
        return await asyncio.shield(pending.done)

    async def run(self) -> None:
        """Collect and store batches, ``max_flushes`` at once, until cancelled or fenced."""
        slots = asyncio.Semaphore(self._max_flushes)
        async with asyncio.TaskGroup() as flushes:
            while True:
                # A batch starts filling only once a slot is free, so while every slot waits
                # on PostgreSQL the next batch grows instead of queueing behind them.
                await slots.acquire()
                batch = [await self._queue.get()]
                size = len(batch[0].jobs)
                await asyncio.sleep(self._linger)
                while size < self._max_batch and not self._queue.empty():
                    item = self._queue.get_nowait()
                    batch.append(item)
                    size += len(item.jobs)
                flushes.create_task(self._flush_and_release(batch, slots))

    async def _flush_and_release(self, batch: list[_Pending], slots: asyncio.Semaphore) -> None:
        try:
            await self._flush(batch)
        finally:
            slots.release()

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            batch = await self._reject_reused(batch)
            if not batch:
                return
            jobs = [job for item in batch for job in item.jobs]
            request_ids = [rid for item in batch for rid in item.request_ids]
            stored = await self._store.insert_jobs(jobs, request_ids, self._epoch, "rpc:SubmitJob")
        except Fenced:
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(Unavailable("this scheduler is no longer the leader"))
            raise
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            count = sum(len(item.jobs) for item in batch)
            logger.error("storing %d submitted jobs failed: %s", count, exc)
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(Unavailable(f"storing the job failed: {exc}"))
            return
        fresh = [
            j
            for j, rid in zip(jobs, request_ids, strict=True)
            if rid is None or stored.get(rid) is j
        ]
        if fresh:
            await self._inbox.put(Submitted(tuple(fresh)))
        for item in batch:
            result = [
                stored.get(rid, job) if rid else job
                for job, rid in zip(item.jobs, item.request_ids, strict=True)
            ]
            if not item.done.done():
                item.done.set_result(result)

    async def _reject_reused(self, batch: list[_Pending]) -> list[_Pending]:
        """Fail each call whose request ids were used for other jobs; return the others.

        One lookup serves the whole batch, so a SubmitJob call costs no query of its own.
        """
        keys = [key for item in batch for key in stored_keys(item.submissions)]
        if not keys:
            return batch
        found = await self._store.jobs_by_request_ids(keys)
        if not found:
            return batch
        passed = []
        for item in batch:
            try:
                check_stored(item.submissions, found)
            except ServiceError as error:
                if not item.done.done():
                    item.done.set_exception(error)
                continue
            passed.append(item)
        return passed
