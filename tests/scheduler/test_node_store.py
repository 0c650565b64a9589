"""Down marks, drains and deletions of nodes in PostgreSQL: stored, cleared, and fenced like
every node write."""

from __future__ import annotations

import asyncpg
import pytest

from scheduler.service.engine_adapter import AcceleratorHealth
from scheduler.service.fleet import Drain, DrainChange
from scheduler.service.node_deletion import NodeDeletion
from scheduler.service.node_store import NodeStore
from scheduler.service.store import Fenced, JobStore

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
    assert await nodes.load() == [(b"one", None, ""), (b"two", None, "")]
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


async def test_drains_round_trip_with_source(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    epoch = lease.epoch or 0
    nodes = NodeStore(pool, fence=("s0", epoch))
    store = JobStore(pool, "s0")
    await nodes.upsert_inventories([("p", "r", "n1", b"one"), ("p", "r", "n2", b"two")])
    agent = Drain("agent", "health: xid 79", 1_700_000_000.25)
    operator = Drain("operator", "maintenance", 1_700_000_001.0)

    # A node with no stored inventory is skipped.
    ghost = DrainChange("p.r.ghost", True, operator)
    await store.commit_turn(
        [],
        [],
        [],
        [],
        epoch,
        drains=[DrainChange("p.r.n1", True, agent), DrainChange("p.r.n2", True, operator), ghost],
    )

    assert await nodes.load() == [
        (b"one", agent, "health: xid 79"),
        (b"two", operator, "maintenance"),
    ]
    rows = await pool.fetch(
        "SELECT node, draining, drain_source FROM scheduler.nodes ORDER BY node"
    )
    assert [tuple(row) for row in rows] == [("n1", True, "agent"), ("n2", True, "operator")]

    # The row keeps who ended the drain and why.
    withdrawn = Drain("agent", "agent withdrew its drain request", 1_700_000_002.0)
    await store.commit_turn([], [], [], [], epoch, drains=[DrainChange("p.r.n1", False, withdrawn)])

    assert await nodes.load() == [
        (b"one", None, "agent withdrew its drain request"),
        (b"two", operator, "maintenance"),
    ]
    row = await pool.fetchrow(
        "SELECT draining, drain_source, drain_at FROM scheduler.nodes WHERE node = 'n1'"
    )
    assert row is not None
    assert row["draining"] is False
    assert row["drain_source"] == "agent"
    assert row["drain_at"].timestamp() == withdrawn.at
    await lease.release()


async def test_drain_needs_a_source(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one")])

    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE scheduler.nodes SET draining = true WHERE node = 'n1'")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE scheduler.nodes SET drain_source = 'provider'")
    await lease.release()


async def test_deletion_removes_node_and_failures(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one"), ("p", "r", "n2", b"two")])
    await nodes.record_accelerator_health(
        [
            AcceleratorHealth("p.r.n1", "GPU-1", True, "hev-1", "XID 79"),
            AcceleratorHealth("p.r.n2", "GPU-1", True, "hev-2", "XID 79"),
        ]
    )

    await nodes.delete([NodeDeletion("p.r.n1", "req-1", "retired", "ops", b"node-one")])

    assert await nodes.load() == [(b"two", None, "")]
    assert [f.node_key for f in await nodes.load_failed_accelerators()] == ["p.r.n2"]
    assert await nodes.deletion("req-1") == ("p.r.n1", b"node-one")
    assert await nodes.deletion("req-2") is None
    row = await pool.fetchrow(
        "SELECT provider, region, node, reason, deleted_by, deleted_at"
        " FROM scheduler.node_deletions WHERE request_id = 'req-1'"
    )
    assert row is not None
    assert (row["provider"], row["region"], row["node"]) == ("p", "r", "n1")
    assert (row["reason"], row["deleted_by"]) == ("retired", "ops")
    assert row["deleted_at"] is not None
    await lease.release()


async def test_deletion_records_each_request_once(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one"), ("p", "r", "n2", b"two")])

    await nodes.delete(
        [
            NodeDeletion("p.r.n1", "req-1", "", "ops", b"first"),
            NodeDeletion("p.r.n2", "", "", "ops", b"no id"),
        ]
    )
    # The same request id again, e.g. for a node that returned, keeps the first record.
    await nodes.upsert_inventories([("p", "r", "n1", b"one again")])
    await nodes.delete(
        [
            NodeDeletion("p.r.n1", "req-1", "", "ops", b"second"),
            NodeDeletion("p.r.n1", "", "", "ops", b"no id again"),
        ]
    )

    assert await nodes.load() == []
    assert await nodes.deletion("req-1") == ("p.r.n1", b"first")
    count = await pool.fetchval("SELECT count(*) FROM scheduler.node_deletions")
    assert count == 3
    await lease.release()


async def test_deposed_leader_deletes_no_node(pool: asyncpg.Pool, database_dsn: str) -> None:
    lease = await lead(database_dsn, "a")
    nodes = NodeStore(pool, fence=("s0", lease.epoch or 0))
    await nodes.upsert_inventories([("p", "r", "n1", b"one")])
    await lease.release()
    takeover = await lead(database_dsn, "b")

    with pytest.raises(Fenced):
        await nodes.delete([NodeDeletion("p.r.n1", "req-1", "", "ops", b"one")])

    assert await nodes.load() == [(b"one", None, "")]
    assert await nodes.deletion("req-1") is None
    await takeover.release()
