"""Coalesce many single-job submissions into few ``SubmitJobs`` calls.

A tool that submits thousands of small jobs at once can await :meth:`JobSubmitter.submit` once
per job, from as many coroutines as it likes. The scheduler then receives one ``SubmitJobs``
call per batch. Jobs submitted while ``max_in_flight`` calls are outstanding, or within
``linger_s`` of the first job of a batch, go out together, up to ``max_batch`` jobs and
``max_batch_bytes`` of encoded requests a call. Each caller gets its own ``SubmitJobResponse``::

    submitter = JobSubmitter(client.scheduler)
    responses = await asyncio.gather(*(submitter.submit(request) for request in requests))
    await submitter.close()

The scheduler checks every item of a ``SubmitJobs`` call before it stores any, so one invalid
job rejects its whole batch and stores nothing. The submitter then sends that batch again one
``SubmitJob`` per job, so each caller gets its own job or its own error. A request without a
``request_id`` gets a fresh UUID, which makes the batch safe to retry (see :mod:`acsp.client`).
A caller that stops waiting does not take its job back: once queued, the job is submitted.
A call cancelled under the submitter, for example by closing its channel, cancels the waits of
its callers, as a direct ``SubmitJob`` call raises ``asyncio.CancelledError`` then.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import grpc
import grpc.aio

from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc

ITEM_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
"""Codes that one job of a batch can cause; the batch is then sent one job per call."""

MAX_BATCH_BYTES: Final = 3 * 1024 * 1024
"""Default cap on the encoded jobs of one call, below gRPC's default 4 MiB receive limit."""


@dataclass(slots=True)
class _Pending:
    request: scheduler_pb2.SubmitJobRequest
    done: asyncio.Future[scheduler_pb2.SubmitJobResponse]


class JobSubmitter:
    """Submit jobs one by one; send them to the scheduler in batches."""

    def __init__(
        self,
        scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
        *,
        max_batch: int = 100,
        linger_s: float = 0.002,
        max_in_flight: int = 4,
        timeout_s: float = 30.0,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_batch_bytes < 1:
            raise ValueError(
                f"max_batch ({max_batch}), max_in_flight ({max_in_flight}) and max_batch_bytes"
                f" ({max_batch_bytes}) must each be at least 1"
            )
        if linger_s < 0:
            raise ValueError(f"linger_s is {linger_s}; use 0 or more")
        self._scheduler = scheduler
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._linger_s = linger_s
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata) if metadata is not None else None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False
        self.calls_made = 0
        """``SubmitJobs`` and fallback ``SubmitJob`` calls sent so far."""

    async def submit(
        self, request: scheduler_pb2.SubmitJobRequest
    ) -> scheduler_pb2.SubmitJobResponse:
        """Submit one job and return what ``SubmitJob`` would have returned for it.

        Raises ``grpc.aio.AioRpcError`` with the scheduler's status when the job is rejected
        or the call fails. Raises RuntimeError after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("this JobSubmitter is closed; create a new one")
        if not request.request_id:
            request = scheduler_pb2.SubmitJobRequest(
                request_id=str(uuid.uuid4()), spec=request.spec
            )
        if self._worker is None:
            self._worker = asyncio.create_task(self._collect(), name="acsp-job-submitter")
        done: asyncio.Future[scheduler_pb2.SubmitJobResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.put_nowait(_Pending(request, done))
        return await done

    async def close(self) -> None:
        """Send what is queued, wait for every call and stop. Later submits raise."""
        self._closed = True
        await self._queue.join()
        if self._calls:
            await asyncio.wait(self._calls)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _collect(self) -> None:
        carried: _Pending | None = None
        while True:
            # A batch starts filling only once a call slot is free, so while every slot waits
            # on the scheduler the next batch grows instead of queueing behind them.
            await self._slots.acquire()
            first = carried if carried is not None else await self._queue.get()
            carried = None
            batch = [first]
            size = first.request.ByteSize()
            if self._linger_s > 0:
                await asyncio.sleep(self._linger_s)
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                size += item.request.ByteSize()
                if size > self._max_batch_bytes:
                    # The server would reject the whole call as too large, so the job that
                    # does not fit opens the next batch. A job over the cap is sent alone.
                    carried = item
                    break
                batch.append(item)
            call = asyncio.create_task(self._send(batch))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            await self._send_batch(batch)
        finally:
            self._slots.release()
            for item in batch:
                self._queue.task_done()
                if not item.done.done():
                    # The call was cancelled, or failed in a way not handled above.
                    item.done.cancel()

    async def _send_batch(self, batch: list[_Pending]) -> None:
        request = scheduler_pb2.SubmitJobsRequest(jobs=[item.request for item in batch])
        self.calls_made += 1
        try:
            response = await self._scheduler.SubmitJobs(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            if len(batch) > 1 and error.code() in ITEM_ERRORS:
                # Nothing of the batch was stored: find the culprit, one job per call.
                await asyncio.gather(*(self._send_one(item) for item in batch))
                return
            for item in batch:
                _settle(item, error=error)
            return
        except Exception as error:  # the caller sees any other failure as its own
            for item in batch:
                _settle(item, error=error)
            return
        for item, result in zip(batch, response.results, strict=True):
            _settle(item, result=result)

    async def _send_one(self, item: _Pending) -> None:
        self.calls_made += 1
        try:
            result = await self._scheduler.SubmitJob(
                item.request, timeout=self._timeout_s, metadata=self._metadata
            )
        except Exception as error:  # the caller gets the scheduler's error for its job
            _settle(item, error=error)
            return
        _settle(item, result=result)


def _settle(
    item: _Pending,
    *,
    result: scheduler_pb2.SubmitJobResponse | None = None,
    error: BaseException | None = None,
) -> None:
    if item.done.done():
        return  # The caller stopped waiting (cancelled).
    if error is not None:
        item.done.set_exception(error)
    else:
        item.done.set_result(result)  # type: ignore[arg-type]
