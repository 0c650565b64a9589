"""A copy of the scheduler's pledges and recalls, which provider settlements compare usage with.

The scheduler owns pledges. Metering reads them over its ListPledges and ListRecalls RPCs every
``interval_s`` and upserts them here, so that a settlement never waits on the scheduler.

Only the scheduler's leader counts each pledge's registered and healthy accelerators. A standby
lists the pledges with ``fleet_counted`` false, and a copy from it would leave every pledge
uncounted in settlements. So a copy tries each scheduler replica in turn, starting with the one
that led last, and takes the first listing that counts the fleet. When no replica counts it,
the copy stores the first standby's listing without counts and logs a warning. No listing,
from the leader or a standby, is stored when a copy stored since the listing started is newer.
Another metering replica's copy may commit while a listing is read or waits for the database,
and the older listing must not replace it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.time_range import LATEST_TIME
from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.metering.scheduler_replicas import SchedulerReplicas
from services.runtime.db import Database
from services.runtime.errors import Unavailable

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
    created_at: datetime
    """When the scheduler stored the pledge; hours before it are not counted."""
    registered_count: int | None = None
    """Accelerators of the pool registered when the scheduler listed the pledge; None when
    it did not count them (a standby scheduler)."""
    healthy_count: int | None = None
    """Of those, the ones on up nodes and not failed; None when not counted."""


@dataclass(frozen=True, slots=True)
class RecallRecord:
    recall_id: str
    pledge_id: str
    accelerator_count: int
    start_time: datetime
    end_time: datetime


async def store_pledges(
    conn: asyncpg.Connection,
    pledges: Sequence[PledgeRecord],
    recalls: Sequence[RecallRecord],
    now: datetime | None = None,
) -> None:
    """Insert or update pledges, then recalls of known pledges, in one transaction.

    A stored pledge keeps the earlier of its stored and its new ``created_at``.

    The counts of a pledge whose window contains ``now`` (default: the current time) are
    added to ``metering.pledge_capacity`` when they differ from its latest row.
    """
    now = now or datetime.now(UTC)
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO metering.pledges AS p
                (pledge_id, provider, region, accelerator_model, protected_count,
                 recallable_count, window_start, window_end, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (pledge_id) DO UPDATE SET
                protected_count = excluded.protected_count,
                recallable_count = excluded.recallable_count,
                window_start = excluded.window_start,
                window_end = excluded.window_end,
                created_at = least(p.created_at, excluded.created_at)
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
                    p.created_at,
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
        await _store_capacity(conn, pledges, now)


async def _store_capacity(
    conn: asyncpg.Connection, pledges: Sequence[PledgeRecord], now: datetime
) -> None:
    counted = [
        p
        for p in pledges
        if p.registered_count is not None
        and p.healthy_count is not None
        and p.window_start <= now < p.window_end
    ]
    if not counted:
        return
    latest = {
        row["pledge_id"]: (row["registered_count"], row["healthy_count"])
        for row in await conn.fetch(
            """
            SELECT DISTINCT ON (pledge_id) pledge_id, registered_count, healthy_count
            FROM metering.pledge_capacity WHERE pledge_id = ANY($1::text[])
            ORDER BY pledge_id, observed_at DESC
            """,
            [p.pledge_id for p in counted],
        )
    }
    await conn.executemany(
        """
        INSERT INTO metering.pledge_capacity
            (pledge_id, observed_at, registered_count, healthy_count)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (pledge_id, observed_at) DO NOTHING
        """,
        [
            (p.pledge_id, now, p.registered_count, p.healthy_count)
            for p in counted
            if latest.get(p.pledge_id) != (p.registered_count, p.healthy_count)
        ],
    )


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def pledge_from_proto(
    pledge: scheduler_pb2.Pledge, counted: bool = False, listed_at: datetime | None = None
) -> PledgeRecord:
    """Convert a listed pledge; ``counted`` is whether the listing counted the fleet.

    A pledge without a create_time (from a scheduler older than that field) counts as created
    at ``listed_at`` (default: the current time), the earliest time it is known to exist.
    """
    if pledge.HasField("create_time"):
        created_at = _time(pledge.create_time)
    else:
        created_at = listed_at or datetime.now(UTC)
    return PledgeRecord(
        pledge.pledge_id,
        pledge.provider_id,
        pledge.region_id,
        pledge.model,
        pledge.protected_count,
        pledge.recallable_count,
        _time(pledge.window.start_time),
        _time(pledge.window.end_time),
        created_at,
        pledge.registered_count if counted else None,
        pledge.healthy_count if counted else None,
    )


def recall_from_proto(recall: scheduler_pb2.Recall) -> RecallRecord:
    return RecallRecord(
        recall.recall_id,
        recall.pledge_id,
        recall.count,
        _time(recall.effective_time),
        # The scheduler stores an open-ended recall with its pledge's end, but a recall stored
        # before that has none. It lasts until the last time the services accept, and
        # settlements stop counting it when its pledge ends.
        _time(recall.end_time) if recall.HasField("end_time") else LATEST_TIME,
    )


async def _newer_copy(
    conn: asyncpg.Connection, provider: str, listed_at: datetime
) -> datetime | None:
    """Return the time of a stored copy newer than ``listed_at`` that a copy of ``provider``'s
    pledges (every provider's when empty) would overwrite, or None."""
    newer: datetime | None = await conn.fetchval(
        """
        SELECT max(copied_at) FROM metering.pledge_copies
        WHERE ($1 = '' OR provider IN ('', $1)) AND copied_at > $2
        """,
        provider,
        listed_at,
    )
    return newer


class PledgeSync:
    """Copies pledges and recalls from the scheduler's leader into metering's tables."""

    def __init__(
        self,
        db: Database,
        replicas: SchedulerReplicas,
        interval_s: float = 60.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._db = db
        self._replicas = replicas
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        # The periodic copy and a settlement's copy take turns, because SchedulerReplicas may
        # close a channel that the other copy is using.
        self._lock = asyncio.Lock()

    async def sync_once(self, provider: str = "") -> tuple[int, int]:
        """Copy every pledge and recall, or only ``provider``'s; return how many of each were read.

        Raises ``grpc.aio.AioRpcError`` when no scheduler replica can list them.
        """
        async with self._lock:
            return await self._copy(provider)

    async def _copy(self, provider: str) -> tuple[int, int]:
        listed_at = datetime.now(UTC)
        stub, pledge_pages, counted = await self._list_pledges(provider)
        pledges = [
            pledge_from_proto(p, page.fleet_counted, listed_at)
            for page in pledge_pages
            for p in page.pledges
        ]
        recalls = [
            recall_from_proto(r)
            for page in await self._pages(
                stub.ListRecalls, scheduler_pb2.ListRecallsRequest, provider
            )
            for r in page.recalls
        ]
        async with self._db.acquire() as conn, conn.transaction():
            # Copies from every metering replica take turns, so none commits between the
            # check of the stored copy's time below and this copy's store. A listing older
            # than the stored copy is dropped even from the leader, because storing it would
            # undo the pledge changes of that copy while its newer time stays.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('metering.pledge_copies'))")
            newer = await _newer_copy(conn, provider, listed_at)
            if newer is not None:
                logger.warning(
                    "the pledges that %s listed at %s are not stored, because they are older "
                    "than the copy stored at %s",
                    "the scheduler's leader" if counted else "a standby scheduler",
                    listed_at.isoformat(),
                    newer.isoformat(),
                )
                return len(pledges), len(recalls)
            await store_pledges(conn, pledges, recalls)
            await conn.execute(
                """
                INSERT INTO metering.pledge_copies (provider, copied_at) VALUES ($1, $2)
                ON CONFLICT (provider) DO UPDATE
                    SET copied_at = greatest(metering.pledge_copies.copied_at, excluded.copied_at)
                """,
                provider,
                listed_at,
            )
        return len(pledges), len(recalls)

    async def _list_pledges(
        self, provider: str
    ) -> tuple[scheduler_pb2_grpc.SchedulerServiceStub, list[Any], bool]:
        """List the pledges from the first replica that counts the fleet, the leader.

        Returns the replica's stub, the pages and whether they count the fleet. Without such a
        replica, returns the listing of the first standby that returned one. Raises the last
        ``grpc.aio.AioRpcError`` when every replica failed.
        """
        standby: tuple[str, scheduler_pb2_grpc.SchedulerServiceStub, list[Any]] | None = None
        failure: grpc.aio.AioRpcError | None = None
        replicas = await self._replicas.replicas()
        for address, channel in replicas:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            try:
                pages = await self._pages(
                    stub.ListPledges, scheduler_pb2.ListPledgesRequest, provider
                )
            except grpc.aio.AioRpcError as error:
                logger.warning(
                    "scheduler replica %s could not list pledges: %s: %s",
                    address,
                    error.code().name,
                    error.details(),
                )
                failure = error
                continue
            # A standby leaves fleet_counted false on every page.
            if all(page.fleet_counted for page in pages):
                if self._replicas.mark_leader(address):
                    logger.info("copying pledges from scheduler replica %s, which leads", address)
                return stub, pages, True
            if standby is None:
                standby = (address, stub, pages)
        if standby is None:
            assert failure is not None, "SchedulerReplicas returns at least one replica"
            raise failure
        address, stub, pages = standby
        logger.warning(
            "no scheduler replica of %s counted the pledges' accelerators, so the pledges are "
            "copied from standby %s without counts and settlements list them as uncounted; "
            "make ACSP_SCHEDULER_ADDRESS name every scheduler replica",
            ", ".join(a for a, _ in replicas),
            address,
        )
        return stub, pages, False

    async def _pages(
        self, call: Callable[..., Awaitable[Any]], request_type: type, provider: str
    ) -> list[Any]:
        pages = []
        token = ""
        for _ in range(MAX_PAGES):
            request = request_type(
                provider_id=provider,
                page=common_pb2.PageRequest(page_size=1000, page_token=token),
            )
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
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                OSError,
                TimeoutError,
                Unavailable,
            ) as error:
                # A database blip must not stop the service; the next sync copies everything.
                logger.warning("could not store the pledge copy: %s; retrying", error)
            try:
                await asyncio.wait_for(stop.wait(), self._interval_s)
            except TimeoutError:
                pass
