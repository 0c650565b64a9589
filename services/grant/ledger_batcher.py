"""Group concurrent ledger requests into shared transactions.

Requests wait in one bounded queue; a fixed set of workers each take what is queued (up to
``max_batch``) and apply it as one batch, so the commit and the row locks of a hot grant are
paid once per batch instead of once per request. With ``max_batch=1`` this is the plain
one-transaction-per-request path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from services.grant.ledger import Ledger, Outcome
from services.grant.ledger_ops import LedgerRequest
from services.runtime import context
from services.runtime.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

_Item = tuple[LedgerRequest, "asyncio.Future[Outcome]"]


class LedgerBatcher:
    """Owns the ledger workers; start with :meth:`run` inside the service's task group."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        workers: int = 4,
        max_batch: int = 64,
        max_queue: int = 4096,
        default_timeout_s: float = 10.0,
    ) -> None:
        self._ledger = ledger
        self._workers = workers
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._default_timeout_s = default_timeout_s
        self._running = False

    async def run(self) -> None:
        """Run the workers until cancelled; requests still queued then fail with Unavailable."""
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                for number in range(self._workers):
                    group.create_task(self._work(), name=f"ledger-worker-{number}")
        finally:
            self._running = False
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(Unavailable("the grant service is stopping; retry"))

    async def submit(self, request: LedgerRequest) -> Outcome:
        """Queue one request and wait for its outcome, at most the request's deadline."""
        results = await self.submit_many([request])
        return results[0]

    async def submit_many(self, requests: Sequence[LedgerRequest]) -> list[Outcome]:
        """Queue requests and wait for all their outcomes, in order.

        Raises Unavailable when the queue is full or the workers are not running, and
        DeadlineExceeded when the outcomes do not arrive in time; a request that timed out may
        still be applied, and retrying it with the same key returns its result.
        """
        if not self._running:
            raise Unavailable("the ledger is not running; retry")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for request in requests:
            future: asyncio.Future[Outcome] = loop.create_future()
            try:
                self._queue.put_nowait((request, future))
            except asyncio.QueueFull:
                log.warning("ledger queue full (%s requests); rejecting", self._queue.qsize())
                raise Unavailable(
                    f"the ledger queue is full ({self._queue.maxsize} requests); retry later"
                ) from None
            futures.append(future)
        timeout = context.remaining_s(self._default_timeout_s)
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(
                f"the ledger did not answer within {timeout:.3f} s; retry with the same request_id"
            ) from None

    async def _work(self) -> None:
        while True:
            first = await self._queue.get()
            items = [first]
            while len(items) < self._max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            live = [(r, f) for r, f in items if not f.cancelled()]
            if not live:
                continue
            try:
                # Shielded so that a batch in flight commits or rolls back whole at shutdown.
                outcomes = await asyncio.shield(self._ledger.apply([r for r, _ in live]))
            except asyncio.CancelledError:
                for _, future in live:
                    if not future.done():
                        future.set_exception(Unavailable("the grant service is stopping; retry"))
                raise
            except Exception as error:
                # Any failure of the batch belongs to every caller waiting on it.
                log.error("ledger batch of %s requests failed: %s", len(live), error, exc_info=True)
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), outcome in zip(live, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
