"""Down marks of nodes in PostgreSQL: stored, cleared, and fenced like every node write."""

from __future__ import annotations

import asyncpg
import pytest

from scheduler.service.node_store import NodeStore
from scheduler.service.store import Fenced

from .test_store import lead


async def test_down_mark_round_trips(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one"), ("p", "r", "n2", b"two")])

    await nodes.set_down({"p.r.n1": "powered off", "p.r.n2": "disk failed"})
    assert await nodes.load_down() == {"p.r.n1": "powered off", "p.r.n2": "disk failed"}

    # The mark is cleared once the node is heard from, and the inventory stays.
    await nodes.set_down({"p.r.n2": None})
    assert await nodes.load_down() == {"p.r.n1": "powered off"}
    assert await nodes.load() == [(b"one", False, ""), (b"two", False, "")]
    await lease.release()


async def test_down_mark_of_unstored_node_is_ignored(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))

    await nodes.set_down({"p.r.ghost": "powered off"})

    assert await nodes.load_down() == {}
    await lease.release()


async def test_deposed_leader_marks_no_node_down(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one")])
    await lease.release()
    takeover = await lead(database_dsn, "b")

    with pytest.raises(Fenced):
        await nodes.set_down({"p.r.n1": "powered off"})

    assert await nodes.load_down() == {}
    await takeover.release()
