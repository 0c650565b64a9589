"""Persistence of jobs and dispatch records, every write fenced by the leader epoch.

Each writing transaction first reads the shard's epoch with ``FOR SHARE`` and raises
:class:`Fenced` when another leader has taken over. A new leader bumps the epoch with an
``UPDATE`` that waits for those shared locks, so once it holds the new epoch no write of
the old leader can commit.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, cast

import asyncpg

from .codec import (
    from_datetime,
    placement_from_json,
    placement_to_json,
    spec_from_json,
    spec_to_json,
    to_datetime,
)
from .fleet import DrainChange
from .model import TERMINAL_STATES, Job, JobFilter, JobState
from .store_sql import (
    ACK_DISPATCHES,
    COMMIT_TURN,
    COUNT_EVENT_REJECTIONS,
    INSERT_DISPATCHES,
    INSERT_JOBS,
    JOB_SELECT_LIST,
    LOAD_ORPHANS,
    MOVE_DEAD_EVENTS,
    PURGE_DISPATCHES,
    PURGE_EVENTS,
    UPDATE_JOBS,
)

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE: Final = 1000
DEFAULT_PAGE_SIZE: Final = 100
PURGE_CHUNK: Final = 10_000
"""Rows one purge statement deletes at most."""


class Fenced(Exception):
    """This process's leader epoch is stale: another scheduler leads the shard now."""

    def __init__(self, shard: str, mine: int, current: int | None) -> None:
        super().__init__(f"shard {shard!r}: epoch {mine} is fenced off by epoch {current}")
        self.shard = shard
        self.mine = mine
        self.current = current


async def check_epoch(conn: asyncpg.Connection, shard: str, epoch: int, timeout_s: float) -> None:
    """Raise :class:`Fenced` unless ``shard``'s leader epoch is still ``epoch``.

    Call it first in a transaction: the row stays locked FOR SHARE until the transaction ends,
    so no new leader can take the shard while the rest of it writes.
    """
    current = await conn.fetchval(
        "SELECT epoch FROM scheduler.leaders WHERE shard = $1 FOR SHARE", shard, timeout=timeout_s
    )
    if current != epoch:
        raise Fenced(shard, epoch, current)


@dataclass(frozen=True, slots=True)
class DispatchRecord:
    """A command to one agent, recorded before it is published."""

    job_id: str
    attempt: int
    task_index: int
    kind: str
    """``start`` or ``stop``."""
    node_key: str
    payload: bytes
    """The serialized command, republished unchanged after a restart."""

    @property
    def key(self) -> tuple[str, int, int, str]:
        return (self.job_id, self.attempt, self.task_index, self.kind)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A job event for ``ACSP_EVENTS``, recorded with the change that caused it."""

    subject: str
    msg_id: str
    """The event id, also the ``Nats-Msg-Id``."""
    payload: bytes


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """A job event moved to ``scheduler.dead_events`` because JetStream rejected it for good."""

    event_id: str
    subject: str
    reason: str
    """Reason of the last rejection, from JetStream or the NATS client."""
    rejections: int


@dataclass(frozen=True, slots=True)
class Orphan:
    """A task copy sent a stop that its node has not confirmed, and what it held there."""

    node_key: str
    task_id: str
    """``<job_id>/<attempt>/<task_index>``."""
    accelerators: tuple[str, ...]
    millis: int
    """Thousandths of each accelerator it held."""
    rendezvous_port: int = 0
    """Port reserved on the node for the copy of a task 0, or 0 when none was reserved."""


_JOB_COLUMNS: Final = (
    "job_id",
    "shard",
    "owner",
    "institution",
    "grant_id",
    "project_id",
    "spec",
    "state",
    "pending_reason",
    "reason",
    "attempt",
    "array_id",
    "array_index",
    "submitted_at",
    "started_at",
    "ended_at",
    "hold_id",
    "hold_amount",
    "checkpoint_ref",
    "exit_code",
    "placement",
    "cause",
    "epoch",
)


class JobStore:
    """Reads and fenced writes of the ``scheduler`` schema for one shard."""

    def __init__(self, pool: asyncpg.Pool, shard: str, timeout_s: float = 10.0) -> None:
        self._pool = pool
        self.shard = shard
        self._timeout = timeout_s

    async def _check_epoch(self, conn: asyncpg.Connection, epoch: int) -> None:
        await check_epoch(conn, self.shard, epoch, self._timeout)

    async def insert_jobs(
        self, jobs: Sequence[Job], request_ids: Sequence[str | None], epoch: int, cause: str
    ) -> dict[str, Job]:
        """Insert new jobs in one statement; return the job stored for each request id.

        A request id seen before keeps its first job, so a retried submission returns the
        original instead of creating a second one.
        """
        records = [self._job_record(job, epoch, cause) for job in jobs]
        columns = list(zip(*records, strict=True)) if records else [()] * len(_JOB_COLUMNS)
        async with self._pool.acquire(timeout=self._timeout) as conn:
            # One statement, so no transaction: it inserts only while the leaders row, locked
            # FOR SHARE until it commits, still holds this epoch.
            inserted = await conn.fetch(
                INSERT_JOBS,
                *[list(c) for c in columns],
                list(request_ids),
                self.shard,
                epoch,
                timeout=self._timeout,
            )
            done = {row[0] for row in inserted}
            if jobs and not done:
                # Nothing inserted: every request id was stored before, or the epoch moved on.
                await self._check_epoch(conn, epoch)
            # A request id repeated in this statement is inserted once, and its copies get the
            # inserted Job object itself. The submission batcher hands a job to the scheduling
            # loop only when it gets back the object it inserted.
            fresh = {
                rid
                for job, rid in zip(jobs, request_ids, strict=True)
                if rid and job.job_id in done
            }
            missing = [
                rid
                for job, rid in zip(jobs, request_ids, strict=True)
                if job.job_id not in done and rid and rid not in fresh
            ]
            existing = (
                await conn.fetch(
                    f"SELECT {JOB_SELECT_LIST}, request_id FROM scheduler.jobs"
                    " WHERE request_id = ANY($1::text[])",
                    missing,
                    timeout=self._timeout,
                )
                if missing
                else []
            )
        out = {
            rid: job
            for job, rid in zip(jobs, request_ids, strict=True)
            if rid and job.job_id in done
        }
        for row in existing:
            out[row["request_id"]] = _job_from_row(row)
        return out

    async def commit_turn(
        self,
        jobs: Sequence[Job],
        causes: Sequence[str],
        dispatches: Sequence[DispatchRecord],
        events: Sequence[OutboxEvent],
        epoch: int,
        published: Sequence[tuple[str, int, int, str]] = (),
        published_events: Sequence[str] = (),
        orphans: Sequence[Orphan] = (),
        confirmed: Sequence[tuple[str, str]] = (),
        drains: Sequence[DrainChange] = (),
    ) -> list[DispatchRecord]:
        """Write job changes, commands, events and node drains in one fenced statement.

        Returns the commands not recorded before, as :meth:`record_dispatches` does. One
        statement (:data:`COMMIT_TURN`) is one round trip where a transaction of its parts
        took seven. ``published`` and ``published_events`` are commands and events JetStream
        has stored since the last turn, marked here as :meth:`ack_published` would.
        ``orphans`` are new task copies waiting for a confirmed stop, and ``confirmed`` the
        node key and task id of those confirmed; no copy may be in both. ``drains`` are the
        drains started or ended, at most one per node. A node with no stored row is skipped.
        """
        if not (
            jobs
            or dispatches
            or events
            or published
            or published_events
            or orphans
            or confirmed
            or drains
        ):
            return []
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                COMMIT_TURN,
                self.shard,
                epoch,
                *_key_columns(published),
                list(published_events),
                *_job_columns(jobs, causes),
                *_dispatch_columns(dispatches),
                *_event_columns(events),
                [o.node_key for o in orphans],
                [o.task_id for o in orphans],
                [json.dumps(o.accelerators) for o in orphans],
                [o.millis for o in orphans],
                [o.rendezvous_port for o in orphans],
                [node_key for node_key, _ in confirmed],
                [task_id for _, task_id in confirmed],
                *_drain_columns(drains),
                # Last, so that the numbers of the parameters before them stay as they were.
                [job.replacements for job in jobs],
                [to_datetime(job.stop_deadline) for job in jobs],
                timeout=self._timeout,
            )
        if rows and rows[0][0] is None:
            raise Fenced(self.shard, epoch, rows[0][4])
        fresh = {(row[0], row[1], row[2], row[3]) for row in rows}
        return [r for r in dispatches if r.key in fresh]

    async def update_jobs(self, jobs: Sequence[Job], epoch: int, causes: Sequence[str]) -> None:
        """Write the mutable columns of ``jobs`` in one statement."""
        if not jobs:
            return
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_epoch(conn, epoch)
            await self._update_jobs(conn, jobs, epoch, causes)

    async def _update_jobs(
        self, conn: asyncpg.Connection, jobs: Sequence[Job], epoch: int, causes: Sequence[str]
    ) -> None:
        await conn.execute(
            UPDATE_JOBS,
            *_job_columns(jobs, causes),
            epoch,
            [job.replacements for job in jobs],
            [to_datetime(job.stop_deadline) for job in jobs],
            timeout=self._timeout,
        )

    async def record_dispatches(
        self, records: Sequence[DispatchRecord], epoch: int
    ) -> list[DispatchRecord]:
        """Record commands before publishing; return those not recorded before."""
        if not records:
            return []
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_epoch(conn, epoch)
            return await self._insert_dispatches(conn, records, epoch)

    async def _insert_dispatches(
        self, conn: asyncpg.Connection, records: Sequence[DispatchRecord], epoch: int
    ) -> list[DispatchRecord]:
        rows = await conn.fetch(
            INSERT_DISPATCHES,
            *_dispatch_columns(records),
            epoch,
            timeout=self._timeout,
        )
        fresh = {(row[0], row[1], row[2], row[3]) for row in rows}
        return [r for r in records if r.key in fresh]

    async def ack_dispatches(self, keys: Iterable[tuple[str, int, int, str]]) -> None:
        """Mark commands as stored by JetStream; unacked ones are republished after a restart."""
        await self.ack_published(keys, [])

    async def ack_published(
        self, keys: Iterable[tuple[str, int, int, str]], event_ids: Sequence[str]
    ) -> None:
        """Mark commands and job events as stored by JetStream, on one pooled connection."""
        keys = list(keys)
        if not keys and not event_ids:
            return
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await self._ack(conn, keys, event_ids)

    async def _ack(
        self,
        conn: asyncpg.Connection,
        keys: Sequence[tuple[str, int, int, str]],
        event_ids: Sequence[str],
    ) -> None:
        if keys:
            await conn.execute(
                ACK_DISPATCHES,
                *_key_columns(keys),
                timeout=self._timeout,
            )
        if event_ids:
            await self._ack_events(conn, event_ids)

    async def unacked_dispatches(self, older_than_s: float = 0.0) -> list[DispatchRecord]:
        """Return commands recorded but not acknowledged by JetStream, oldest first."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT d.job_id, d.attempt, d.task_index, d.kind, d.node_key, d.payload"
                " FROM scheduler.dispatches d JOIN scheduler.jobs j USING (job_id)"
                " WHERE d.acked_at IS NULL AND j.shard = $1"
                " AND d.created_at <= now() - make_interval(secs => $2)"
                " ORDER BY d.created_at, d.kind DESC LIMIT 10000",
                self.shard,
                older_than_s,
                timeout=self._timeout,
            )
        return [DispatchRecord(*row) for row in rows]

    async def record_events(self, events: Sequence[OutboxEvent], epoch: int) -> None:
        """Record job events in the outbox before publishing; a repeated id is kept once."""
        if not events:
            return
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_epoch(conn, epoch)
            await self._insert_events(conn, events)

    async def _insert_events(self, conn: asyncpg.Connection, events: Sequence[OutboxEvent]) -> None:
        await conn.execute(
            "INSERT INTO scheduler.outbox (event_id, shard, subject, payload)"
            " SELECT u.event_id, $4, u.subject, u.payload"
            " FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(event_id, subject, payload)"
            " ON CONFLICT DO NOTHING",
            *_event_columns(events),
            self.shard,
            timeout=self._timeout,
        )

    async def ack_events(self, event_ids: Sequence[str]) -> None:
        await self.ack_published([], event_ids)

    async def _ack_events(self, conn: asyncpg.Connection, event_ids: Sequence[str]) -> None:
        await conn.execute(
            "UPDATE scheduler.outbox SET acked_at = now()"
            " WHERE event_id = ANY($1::text[]) AND acked_at IS NULL",
            list(event_ids),
            timeout=self._timeout,
        )

    async def unacked_events(self, older_than_s: float = 0.0) -> list[OutboxEvent]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT subject, event_id, payload FROM scheduler.outbox"
                " WHERE acked_at IS NULL AND shard = $1"
                " AND created_at <= now() - make_interval(secs => $2)"
                " ORDER BY created_at LIMIT 10000",
                self.shard,
                older_than_s,
                timeout=self._timeout,
            )
        return [OutboxEvent(row[0], row[1], row[2]) for row in rows]

    async def reject_events(
        self, rejected: Sequence[tuple[str, str]], limit: int, epoch: int
    ) -> list[DeadEvent]:
        """Count a rejection of each event, and move those rejected ``limit`` times.

        ``rejected`` contains event ids, each with the reason JetStream rejected it for good. An
        event at the limit moves from the outbox to ``scheduler.dead_events`` in the same
        transaction, so it is neither lost nor published again. Acknowledged events and events
        of other shards change nothing. Returns the events moved.
        """
        if not rejected:
            return []
        reasons = dict(rejected)
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_epoch(conn, epoch)
            counted = await conn.fetch(
                COUNT_EVENT_REJECTIONS, self.shard, list(reasons), timeout=self._timeout
            )
            due = [row["event_id"] for row in counted if row["rejections"] >= limit]
            if not due:
                return []
            moved = await conn.fetch(
                MOVE_DEAD_EVENTS,
                self.shard,
                due,
                [reasons[event_id] for event_id in due],
                timeout=self._timeout,
            )
        return [DeadEvent(*row) for row in moved]

    async def dispatched_keys(self, job_ids: Sequence[str]) -> set[tuple[str, int, int, str]]:
        """Return the keys of every command recorded for ``job_ids``."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT job_id, attempt, task_index, kind FROM scheduler.dispatches"
                " WHERE job_id = ANY($1::text[])",
                list(job_ids),
                timeout=self._timeout,
            )
        return {(row[0], row[1], row[2], row[3]) for row in rows}

    async def purge_acked(self, retention_s: float, chunk: int = PURGE_CHUNK) -> tuple[int, int]:
        """Delete commands and job events that JetStream stored over ``retention_s`` ago.

        Events of the shard are deleted whatever their job's state, but commands only once
        their job has ended. Unacknowledged rows always stay. Each statement deletes at most
        ``chunk`` rows in its own transaction. Returns the number of commands and of events
        deleted.
        """
        terminal = sorted(TERMINAL_STATES)
        async with self._pool.acquire(timeout=self._timeout) as conn:
            commands = await self._purge(conn, PURGE_DISPATCHES, retention_s, chunk, terminal)
            events = await self._purge(conn, PURGE_EVENTS, retention_s, chunk)
        return commands, events

    async def _purge(
        self, conn: asyncpg.Connection, sql: str, retention_s: float, chunk: int, *extra: Any
    ) -> int:
        """Run a purge ``DELETE`` until it deletes fewer than ``chunk`` rows; return the total."""
        total = 0
        while True:
            status: str = await conn.execute(
                sql, self.shard, retention_s, chunk, *extra, timeout=self._timeout
            )
            deleted = int(status.rsplit(" ", 1)[1])
            total += deleted
            if deleted < chunk:
                return total

    async def load_open_jobs(self) -> list[Job]:
        """Return every pending, starting or running job of the shard, oldest first."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {JOB_SELECT_LIST} FROM scheduler.jobs WHERE shard = $1"
                " AND ended_at IS NULL"
                " AND state IN ('pending', 'starting', 'running', 'stopping') ORDER BY job_id",
                self.shard,
                timeout=self._timeout,
            )
        return [_job_from_row(row) for row in rows]

    async def load_orphans(self) -> list[Orphan]:
        """Return the shard's task copies still waiting for a confirmed stop, oldest first."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(LOAD_ORPHANS, self.shard, timeout=self._timeout)
        return [Orphan(row[0], row[1], tuple(row[2]), row[3], row[4]) for row in rows]

    async def ended_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """Return the jobs of ``job_ids`` that have ended, in id order."""
        if not job_ids:
            return []
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {JOB_SELECT_LIST} FROM scheduler.jobs"
                " WHERE job_id = ANY($1::text[]) AND state = ANY($2::text[]) ORDER BY job_id",
                list(job_ids),
                sorted(TERMINAL_STATES),
                timeout=self._timeout,
            )
        return [_job_from_row(row) for row in rows]

    async def jobs_by_request_ids(self, request_ids: Sequence[str]) -> dict[str, Job]:
        """Return the stored job of each of ``request_ids`` that has one."""
        if not request_ids:
            return {}
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {JOB_SELECT_LIST}, request_id FROM scheduler.jobs"
                " WHERE request_id = ANY($1::text[])",
                list(request_ids),
                timeout=self._timeout,
            )
        return {row["request_id"]: _job_from_row(row) for row in rows}

    async def get_job(self, job_id: str) -> Job | None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                f"SELECT {JOB_SELECT_LIST} FROM scheduler.jobs WHERE job_id = $1",
                job_id,
                timeout=self._timeout,
            )
        return None if row is None else _job_from_row(row)

    async def list_jobs(
        self, filters: JobFilter, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """Return one page of jobs, newest first, and the token of the next page."""
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        clauses: list[str] = []
        args: list[Any] = []

        def where(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.format(f"${len(args)}"))

        if page_token:
            where("job_id < {}", decode_page_token(page_token))
        if filters.states:
            where("state = ANY({}::text[])", list(filters.states))
        if filters.project_id:
            where("project_id = {}", filters.project_id)
        if filters.owner:
            where("owner = {}", filters.owner)
        if filters.array_id:
            where("array_id = {}", filters.array_id)
        sql = f"SELECT {JOB_SELECT_LIST} FROM scheduler.jobs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        args.append(size + 1)
        sql += f" ORDER BY job_id DESC LIMIT ${len(args)}"
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(sql, *args, timeout=self._timeout)
        jobs = [_job_from_row(row) for row in rows[:size]]
        token = encode_page_token(jobs[-1].job_id) if len(rows) > size else ""
        return jobs, token

    async def job_states(self, job_ids: list[str]) -> dict[str, str]:
        """Return the state of each of ``job_ids`` that the shard holds, by job id."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT job_id, state FROM scheduler.jobs"
                " WHERE job_id = ANY($1::text[]) AND shard = $2",
                job_ids,
                self.shard,
                timeout=self._timeout,
            )
        return {row["job_id"]: row["state"] for row in rows}

    async def awaited_jobs(self, ids: list[str]) -> list[tuple[str, str, str, str]]:
        """Return job id, array id, project id and state of the shard's jobs with one of
        ``ids`` as their job id or array id.

        Only the shard's own, because its leader never learns how another shard's job ends,
        so a job that waited for one would wait forever.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT job_id, array_id, project_id, state FROM scheduler.jobs"
                " WHERE job_id = ANY($1::text[]) AND shard = $2"
                " UNION ALL"
                " SELECT job_id, array_id, project_id, state FROM scheduler.jobs"
                " WHERE array_id = ANY($1::text[]) AND array_id <> '' AND shard = $2",
                ids,
                self.shard,
                timeout=self._timeout,
            )
        return [(r["job_id"], r["array_id"], r["project_id"], r["state"]) for r in rows]

    async def array_jobs(self, array_id: str) -> list[Job]:
        """Return every element of the job array ``array_id`` in index order; empty if none."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                f"SELECT {JOB_SELECT_LIST} FROM scheduler.jobs WHERE array_id = $1"
                " ORDER BY array_index",
                array_id,
                timeout=self._timeout,
            )
        return [_job_from_row(row) for row in rows]

    async def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Return open and recent job counts per state, and pending jobs per reason."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            states = await conn.fetch(
                "SELECT state, count(*) FROM scheduler.jobs WHERE shard = $1 GROUP BY state",
                self.shard,
                timeout=self._timeout,
            )
            reasons = await conn.fetch(
                "SELECT pending_reason, count(*) FROM scheduler.jobs"
                " WHERE shard = $1 AND state = 'pending' GROUP BY pending_reason",
                self.shard,
                timeout=self._timeout,
            )
        return (
            {row[0]: row[1] for row in states},
            {(row[0] or "unspecified"): row[1] for row in reasons},
        )

    def _job_record(self, job: Job, epoch: int, cause: str) -> tuple[Any, ...]:
        return (
            job.job_id,
            self.shard,
            job.owner,
            job.institution,
            job.spec.grant_id,
            job.spec.project_id,
            spec_to_json(job.spec),
            job.state,
            job.pending_reason,
            job.reason,
            job.attempt,
            job.array_id,
            job.array_index,
            to_datetime(job.submitted_at),
            to_datetime(job.started_at),
            to_datetime(job.ended_at),
            job.hold_id,
            job.hold_amount,
            job.checkpoint_ref,
            job.exit_code,
            placement_to_json(job.placement),
            cause,
            epoch,
        )


def encode_page_token(last_job_id: str) -> str:
    return base64.urlsafe_b64encode(last_job_id.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """Return the job id a page token continues after; raises ``ValueError`` if malformed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = raw.decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"page_token {token!r} is malformed") from exc
    if not _PAGE_TOKEN_JOB_ID.fullmatch(value):
        raise ValueError(f"page_token {token!r} is malformed")
    return value


_PAGE_TOKEN_JOB_ID: Final = re.compile(r"j[A-Za-z0-9_.:-]{1,127}")
"""A job id that a page token may carry. A forged token's value reaches PostgreSQL as the bound
of the next page, and one with a NUL character fails there as an internal error."""


def _job_from_row(row: asyncpg.Record) -> Job:
    submitted = cast(datetime, row["submitted_at"])
    hold_amount = cast(Decimal | None, row["hold_amount"])
    spec = spec_from_json(row["spec"])
    # The grant a job that named none is paid by, once its hold is placed. A pending job waits
    # for its next hold, for which the grant service picks again.
    picked = bool(row["grant_id"]) and not spec.grant_id and row["state"] != "pending"
    if picked:
        spec = replace(spec, grant_id=row["grant_id"])
    return Job(
        job_id=row["job_id"],
        spec=spec,
        owner=row["owner"],
        institution=row["institution"],
        state=cast(JobState, row["state"]),
        pending_reason=row["pending_reason"],
        reason=row["reason"],
        attempt=row["attempt"],
        array_id=row["array_id"],
        array_index=row["array_index"],
        submitted_at=submitted.timestamp(),
        started_at=from_datetime(row["started_at"]),
        ended_at=from_datetime(row["ended_at"]),
        hold_id=row["hold_id"],
        hold_amount=hold_amount,
        checkpoint_ref=row["checkpoint_ref"],
        checkpoint_at=from_datetime(row["checkpoint_at"]),
        exit_code=row["exit_code"],
        placement=placement_from_json(row["placement"]),
        stop_outcome=row["stop_outcome"],
        start_failures=row["start_failures"],
        avoid_nodes=tuple(json.loads(row["avoid_nodes"])),
        attempt_reason=row["attempt_reason"],
        rendezvous_port=row["rendezvous_port"],
        preemptor_id=row["preemptor_id"],
        replacements=row["replacements"],
        stop_deadline=from_datetime(row["stop_deadline"]),
        grant_picked=picked,
        updated_at=from_datetime(row["updated_at"]),
    )


def _job_columns(jobs: Sequence[Job], causes: Sequence[str]) -> list[list[Any]]:
    """Return the mutable columns of ``jobs`` as the arrays UPDATE_JOBS and COMMIT_TURN take."""
    return [
        [job.job_id for job in jobs],
        [job.state for job in jobs],
        [job.pending_reason for job in jobs],
        [job.reason for job in jobs],
        [job.attempt for job in jobs],
        [to_datetime(job.started_at) for job in jobs],
        [to_datetime(job.ended_at) for job in jobs],
        [job.hold_id for job in jobs],
        [job.hold_amount for job in jobs],
        [job.checkpoint_ref for job in jobs],
        [to_datetime(job.checkpoint_at) for job in jobs],
        [job.exit_code for job in jobs],
        [placement_to_json(job.placement) for job in jobs],
        list(causes),
        [job.stop_outcome for job in jobs],
        [job.spec.grant_id for job in jobs],
        # None writes the database's clock, for callers that change a job outside a loop turn.
        [to_datetime(job.updated_at) for job in jobs],
        [job.start_failures for job in jobs],
        [json.dumps(job.avoid_nodes) for job in jobs],
        [job.attempt_reason for job in jobs],
        [job.rendezvous_port for job in jobs],
        [job.preemptor_id for job in jobs],
    ]


def _dispatch_columns(records: Sequence[DispatchRecord]) -> list[list[Any]]:
    """Return ``records`` as the arrays INSERT_DISPATCHES and COMMIT_TURN take."""
    return [
        [r.job_id for r in records],
        [r.attempt for r in records],
        [r.task_index for r in records],
        [r.kind for r in records],
        [r.node_key for r in records],
        [r.payload for r in records],
    ]


def _key_columns(keys: Sequence[tuple[str, int, int, str]]) -> list[list[Any]]:
    """Return command keys as the job, attempt, task and kind arrays of an acknowledgement."""
    return [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], [k[3] for k in keys]]


def _event_columns(events: Sequence[OutboxEvent]) -> list[list[Any]]:
    """Return outbox events as their id, subject and payload arrays."""
    return [[e.msg_id for e in events], [e.subject for e in events], [e.payload for e in events]]


def _drain_columns(drains: Sequence[DrainChange]) -> list[list[Any]]:
    """Return drain changes as the node, flag, source, reason and time arrays of COMMIT_TURN."""
    parts = [change.node_key.split(".", 2) for change in drains]
    return [
        [p[0] for p in parts],
        [p[1] for p in parts],
        [p[2] for p in parts],
        [change.draining for change in drains],
        [change.cause.source for change in drains],
        [change.cause.reason for change in drains],
        [to_datetime(change.cause.at) if change.cause.at else None for change in drains],
    ]
