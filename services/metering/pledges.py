"""A copy of the scheduler's pledges and recalls, which provider settlements compare usage with.

The scheduler owns pledges. Metering reads them over its ListPledges and ListRecalls RPCs every
``interval_s`` and upserts them here, so that a settlement never waits on the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.db import Database

logger = logging.getLogger(__name__)

MAX_PAGES = 1000
"""Bound on pages read per sync, so that a paging bug cannot loop forever."""


@dataclass(frozen=True, slots=True)
class PledgeRecord:
    pledge_id: str
    provider: str
    region: str
    accelerator_model: str
    protected_count: int
    recallable_count: int
    window_start: datetime
    window_end: datetime


@dataclass(frozen=True, slots=True)
class RecallRecord:
    recall_id: str
    pledge_id: str
    accelerator_count: int
    start_time: datetime
    end_time: datetime


async def store_pledges(
    conn: asyncpg.Connection, pledges: Sequence[PledgeRecord], recalls: Sequence[RecallRecord]
) -> None:
    """Insert or update pledges, then recalls of known pledges, in one transaction."""
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO metering.pledges AS p
                (pledge_id, provider, region, accelerator_model, protected_count,
                 recallable_count, window_start, window_end)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (pledge_id) DO UPDATE SET
                protected_count = excluded.protected_count,
                recallable_count = excluded.recallable_count,
                window_start = excluded.window_start,
                window_end = excluded.window_end
            """,
            [
                (
                    p.pledge_id,
                    p.provider,
                    p.region,
                    p.accelerator_model,
                    p.protected_count,
                    p.recallable_count,
                    p.window_start,
                    p.window_end,
                )
                for p in pledges
            ],
        )
        known = {p.pledge_id for p in pledges} | {
            row["pledge_id"] for row in await conn.fetch("SELECT pledge_id FROM metering.pledges")
        }
        await conn.executemany(
            """
            INSERT INTO metering.recalls
                (recall_id, pledge_id, accelerator_count, start_time, end_time)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (recall_id) DO UPDATE SET
                accelerator_count = excluded.accelerator_count,
                start_time = excluded.start_time,
                end_time = excluded.end_time
            """,
            [
                (r.recall_id, r.pledge_id, r.accelerator_count, r.start_time, r.end_time)
                for r in recalls
                if r.pledge_id in known
            ],
        )


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def pledge_from_proto(pledge: scheduler_pb2.Pledge) -> PledgeRecord:
    return PledgeRecord(
        pledge.pledge_id,
        pledge.provider_id,
        pledge.region_id,
        pledge.model,
        pledge.protected_count,
        pledge.recallable_count,
        _time(pledge.window.start_time),
        _time(pledge.window.end_time),
    )


def recall_from_proto(recall: scheduler_pb2.Recall) -> RecallRecord:
    return RecallRecord(
        recall.recall_id,
        recall.pledge_id,
        recall.count,
        _time(recall.effective_time),
        _time(recall.end_time),
    )


class PledgeSync:
    """Copies pledges and recalls from the scheduler into metering's tables."""

    def __init__(
        self,
        db: Database,
        channel: grpc.aio.Channel,
        interval_s: float = 60.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._db = db
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        self._interval_s = interval_s
        self._timeout_s = timeout_s

    async def sync_once(self) -> tuple[int, int]:
        """Copy every pledge and recall; return how many of each were read."""
        pledges = [
            pledge_from_proto(p)
            for page in await self._pages("ListPledges", scheduler_pb2.ListPledgesRequest)
            for p in page.pledges
        ]
        recalls = [
            recall_from_proto(r)
            for page in await self._pages("ListRecalls", scheduler_pb2.ListRecallsRequest)
            for r in page.recalls
        ]
        async with self._db.acquire() as conn:
            await store_pledges(conn, pledges, recalls)
        return len(pledges), len(recalls)

    async def _pages(self, method: str, request_type: type) -> list[Any]:
        call = getattr(self._stub, method)
        pages = []
        token = ""
        for _ in range(MAX_PAGES):
            request = request_type(page=common_pb2.PageRequest(page_size=1000, page_token=token))
            page = await call(request, timeout=self._timeout_s)
            pages.append(page)
            token = page.page.next_page_token
            if not token:
                break
        return pages

    async def run(self, stop: asyncio.Event) -> None:
        """Sync every ``interval_s`` until ``stop`` is set; a failed sync is logged and retried."""
        while not stop.is_set():
            try:
                pledges, recalls = await self.sync_once()
                logger.debug("copied %d pledges and %d recalls", pledges, recalls)
            except grpc.aio.AioRpcError as error:
                logger.warning(
                    "could not read pledges from the scheduler: %s: %s",
                    error.code().name,
                    error.details(),
                )
            try:
                await asyncio.wait_for(stop.wait(), self._interval_s)
            except TimeoutError:
                pass
