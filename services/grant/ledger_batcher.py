"""Group concurrent ledger requests into shared transactions.

Each worker owns one bounded queue and applies what is queued there (up to ``max_batch``
requests) as one batch, so a commit and the row locks are paid once per batch instead of once
per request. Requests are routed by grant: requests on one grant always meet in the same queue,
so concurrent batches rarely wait on each other's row locks, and a hot grant gets one worker
that batches everything queued for it. A request that names a hold goes to the queue of the
hold's grant when this process placed the hold (a bounded cache), else by the hold id. Routing
only affects speed, because the row locks keep every batch correct.

With ``max_batch=1`` there is no batching: each request runs in its own transaction in the
caller's task, the plain one-transaction-per-call path.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from services.grant.ledger import Ledger, Outcome
from services.grant.ledger_ops import EntryResult, HoldRequest, LedgerRequest
from services.runtime import context
from services.runtime.errors import DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

HOLD_CACHE_SIZE: Final = 100_000
"""Hold-to-grant routes kept; about 100 bytes each."""

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
        self._max_batch = max_batch
        per_worker = max(1, max_queue // workers)
        self._queues: list[asyncio.Queue[_Item]] = [
            asyncio.Queue(maxsize=per_worker) for _ in range(workers)
        ]
        self._default_timeout_s = default_timeout_s
        self._hold_grants: OrderedDict[str, str] = OrderedDict()
        self._running = False

    @property
    def running(self) -> bool:
        """Whether the workers take requests."""
        return self._running

    async def run(self) -> None:
        """Run the workers until cancelled; requests still queued then fail with Unavailable."""
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                for number, queue in enumerate(self._queues):
                    group.create_task(self._work(queue), name=f"ledger-worker-{number}")
        finally:
            self._running = False
            for queue in self._queues:
                while not queue.empty():
                    _, future = queue.get_nowait()
                    if not future.done():
                        future.set_exception(Unavailable("the grant service is stopping; retry"))

    async def submit(self, request: LedgerRequest) -> Outcome:
        """Queue one request and wait for its outcome, at most the request's deadline."""
        results = await self.submit_many([request])
        return results[0]

    async def submit_many(self, requests: Sequence[LedgerRequest]) -> list[Outcome]:
        """Queue requests and wait for all their outcomes, in order.

        Raises Unavailable when a queue is full or the workers are not running, and
        DeadlineExceeded when the outcomes do not arrive in time. A request that timed out may
        still be applied, and retrying it with the same key returns its result.
        """
        if not self._running:
            raise Unavailable("the ledger is not running; retry")
        timeout = context.remaining_s(self._default_timeout_s)
        if self._max_batch == 1:
            try:
                async with asyncio.timeout(timeout):
                    outcomes = [(await self._ledger.apply([r]))[0] for r in requests]
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no ledger result within {timeout:.3f} s; retry with the same request_id"
                ) from None
            self._remember(requests, outcomes)
            return outcomes
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for request in requests:
            future: asyncio.Future[Outcome] = loop.create_future()
            queue = self._queues[self._route(request)]
            try:
                queue.put_nowait((request, future))
            except asyncio.QueueFull:
                log.warning("ledger queue full (%s requests); rejecting", queue.qsize())
                raise Unavailable(
                    f"the ledger queue is full ({queue.maxsize} requests); retry later"
                ) from None
            futures.append(future)
        try:
            async with asyncio.timeout(timeout):
                outcomes = list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(
                f"no ledger result within {timeout:.3f} s; retry with the same request_id"
            ) from None
        self._remember(requests, outcomes)
        return outcomes

    def _route(self, request: LedgerRequest) -> int:
        if isinstance(request, HoldRequest):
            key = request.grant_id or request.project_id or ""
        else:
            key = self._hold_grants.get(request.hold_id, request.hold_id)
        return zlib.crc32(key.encode()) % len(self._queues)

    def _remember(self, requests: Sequence[LedgerRequest], outcomes: Sequence[Outcome]) -> None:
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(request, HoldRequest) and isinstance(outcome, EntryResult):
                if outcome.hold_id is not None:
                    self._hold_grants[outcome.hold_id] = outcome.grant_id
                    if len(self._hold_grants) > HOLD_CACHE_SIZE:
                        self._hold_grants.popitem(last=False)

    async def _work(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            first = await queue.get()
            items = [first]
            while len(items) < self._max_batch and not queue.empty():
                items.append(queue.get_nowait())
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
