"""Node inventories, drains and down marks in ``scheduler.nodes``, failed accelerators in
``scheduler.failed_accelerators``, and deleted nodes in ``scheduler.node_deletions``.

Drains are written with the scheduling loop's turn (see :meth:`.store.JobStore.commit_turn`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from .engine_adapter import AcceleratorHealth
from .fleet import Drain
from .node_deletion import NodeDeletion
from .provider_store import register_named_regions
from .store import check_epoch


class NodeStore:
    """Node inventories, drains and down marks, so a new leader has the fleet before agents
    report."""

    def __init__(
        self, pool: asyncpg.Pool, timeout_s: float = 10.0, *, fence: tuple[str, int] | None = None
    ) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._fence = fence
        """Shard and leader epoch every write checks first, raising ``Fenced`` once deposed."""

    async def _check_fence(self, conn: asyncpg.Connection) -> None:
        if self._fence is not None:
            await check_epoch(conn, *self._fence, self._timeout)

    async def upsert_inventories(self, rows: Sequence[tuple[str, str, str, bytes]]) -> None:
        """Store ``(provider, region, node, serialized Inventory)`` rows.

        Providers and regions that no one registered are registered automatically in the same
        transaction (see :func:`~.provider_store.register_named_regions`).
        """
        if not rows:
            return
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_fence(conn)
            await register_named_regions(conn, [r[:3] for r in rows], self._timeout)
            await conn.execute(
                "INSERT INTO scheduler.nodes (provider, region, node, inventory)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
                " ON CONFLICT (provider, region, node) DO UPDATE"
                " SET inventory = EXCLUDED.inventory, updated_at = now()",
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                timeout=self._timeout,
            )

    async def set_down(self, changes: Mapping[str, str | None]) -> None:
        """Mark nodes down with the operator's reason, or clear the mark where it is None.

        ``changes`` maps a node key (``provider.region.node``) to the reason. Keys of nodes
        with no stored inventory change nothing.
        """
        if not changes:
            return
        parts = [key.split(".", 2) for key in changes]
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_fence(conn)
            await conn.execute(
                "UPDATE scheduler.nodes AS n SET down = u.down, down_reason = u.reason,"
                " updated_at = now()"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::text[])"
                " AS u(provider, region, node, down, reason)"
                " WHERE n.provider = u.provider AND n.region = u.region AND n.node = u.node",
                [p[0] for p in parts],
                [p[1] for p in parts],
                [p[2] for p in parts],
                [reason is not None for reason in changes.values()],
                [reason or "" for reason in changes.values()],
                timeout=self._timeout,
            )

    async def delete(self, deletions: Sequence[NodeDeletion]) -> None:
        """Delete nodes with their failed accelerators, and record each deletion.

        A deletion whose request id is recorded already is not recorded again.
        """
        if not deletions:
            return
        parts = [deletion.node_key.split(".", 2) for deletion in deletions]
        providers = [p[0] for p in parts]
        regions = [p[1] for p in parts]
        nodes = [p[2] for p in parts]
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_fence(conn)
            await conn.execute(
                "DELETE FROM scheduler.failed_accelerators AS f"
                " USING unnest($1::text[], $2::text[], $3::text[]) AS d(provider, region, node)"
                " WHERE f.provider = d.provider AND f.region = d.region AND f.node = d.node",
                providers,
                regions,
                nodes,
                timeout=self._timeout,
            )
            await conn.execute(
                "DELETE FROM scheduler.nodes AS n"
                " USING unnest($1::text[], $2::text[], $3::text[]) AS d(provider, region, node)"
                " WHERE n.provider = d.provider AND n.region = d.region AND n.node = d.node",
                providers,
                regions,
                nodes,
                timeout=self._timeout,
            )
            await conn.execute(
                "INSERT INTO scheduler.node_deletions"
                " (request_id, provider, region, node, reason, deleted_by, node_message)"
                " SELECT nullif(d.request_id, ''), d.provider, d.region, d.node, d.reason,"
                " d.deleted_by, d.node_message"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
                " $6::text[], $7::bytea[])"
                " AS d(request_id, provider, region, node, reason, deleted_by, node_message)"
                " ON CONFLICT (request_id) DO NOTHING",
                [deletion.request_id for deletion in deletions],
                providers,
                regions,
                nodes,
                [deletion.reason for deletion in deletions],
                [deletion.deleted_by for deletion in deletions],
                [deletion.node_message for deletion in deletions],
                timeout=self._timeout,
            )

    async def deletion(self, request_id: str) -> tuple[str, bytes] | None:
        """Return the key and the serialized ``acsp.v1.Node`` of the node that the DeleteNode
        call with ``request_id`` deleted, or None if no call with that id deleted one."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(
                "SELECT provider, region, node, node_message FROM scheduler.node_deletions"
                " WHERE request_id = $1",
                request_id,
                timeout=self._timeout,
            )
        if row is None:
            return None
        return f"{row[0]}.{row[1]}.{row[2]}", row[3]

    async def load_down(self) -> dict[str, str]:
        """Return the key and reason of every node marked down."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT provider, region, node, down_reason FROM scheduler.nodes WHERE down",
                timeout=self._timeout,
            )
        return {f"{r[0]}.{r[1]}.{r[2]}": r[3] for r in rows}

    async def load(self) -> list[tuple[bytes, Drain | None, str]]:
        """Return the serialized Inventory of every known node, its drain in force (None if it
        does not drain) and the reason of its latest drain or undrain."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT inventory, draining, drain_source, drain_reason, drain_at"
                " FROM scheduler.nodes WHERE inventory IS NOT NULL ORDER BY provider, region, node",
                timeout=self._timeout,
            )
        return [(row[0], _drain(row) if row[1] else None, row[3]) for row in rows]

    async def record_accelerator_health(self, changes: Sequence[AcceleratorHealth]) -> None:
        """Store failures and delete recovered accelerators, in the order of ``changes``."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await self._check_fence(conn)
            for change in changes:
                provider, region, node = change.node_key.split(".", 2)
                if change.failed:
                    await conn.execute(
                        "INSERT INTO scheduler.failed_accelerators"
                        " (provider, region, node, accelerator_id, event_id, reason)"
                        " VALUES ($1, $2, $3, $4, $5, $6)"
                        " ON CONFLICT (provider, region, node, accelerator_id) DO NOTHING",
                        provider,
                        region,
                        node,
                        change.accelerator_id,
                        change.event_id,
                        change.reason,
                        timeout=self._timeout,
                    )
                else:
                    await conn.execute(
                        "DELETE FROM scheduler.failed_accelerators WHERE provider = $1"
                        " AND region = $2 AND node = $3 AND accelerator_id = $4",
                        provider,
                        region,
                        node,
                        change.accelerator_id,
                        timeout=self._timeout,
                    )

    async def load_failed_accelerators(self) -> list[AcceleratorHealth]:
        """Return every stored accelerator failure."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT provider, region, node, accelerator_id, event_id, reason"
                " FROM scheduler.failed_accelerators"
                " ORDER BY provider, region, node, accelerator_id",
                timeout=self._timeout,
            )
        return [AcceleratorHealth(f"{r[0]}.{r[1]}.{r[2]}", r[3], True, r[4], r[5]) for r in rows]


def _drain(row: asyncpg.Record) -> Drain:
    at = row["drain_at"]
    return Drain(row["drain_source"], row["drain_reason"], at.timestamp() if at else 0.0)
