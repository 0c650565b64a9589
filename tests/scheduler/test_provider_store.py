"""The provider registry in PostgreSQL: registration, idempotency, paging, auto-registration."""

from __future__ import annotations

import asyncpg
import pytest

from scheduler.service.node_store import NodeStore
from scheduler.service.provider_store import ProviderStore, RequestReused
from scheduler.service.providers import ProviderRecord, RegionRecord


def provider(
    provider_id: str = "eu", jurisdiction: str = "EU", cross: bool = False
) -> ProviderRecord:
    return ProviderRecord(
        provider_id,
        f"{provider_id} cloud",
        (RegionRecord("fra", "Frankfurt", jurisdiction), RegionRecord("ams", "Amsterdam", "")),
        allow_cross_provider_gangs=cross,
    )


async def test_register_stores_regions_sorted(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    stored = await store.register(provider(), "r1", "rpc:RegisterProvider:r1", "office")
    assert stored.display_name == "eu cloud"
    assert [r.region_id for r in stored.regions] == ["ams", "fra"]
    assert stored.regions[1].jurisdiction == "EU"
    assert stored.revision == 1
    assert await store.get("eu") == stored


async def test_update_keeps_unlisted_regions(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    await store.register(provider(), None, "c1", "office")
    changed = ProviderRecord(
        "eu", "EU", (RegionRecord("fra", "Frankfurt", "DE"),), allow_cross_provider_gangs=True
    )
    stored = await store.register(changed, None, "c2", "op")
    assert stored.display_name == "EU"
    assert stored.allow_cross_provider_gangs
    assert {r.region_id: r.jurisdiction for r in stored.regions} == {"ams": "", "fra": "DE"}
    assert stored.revision == 2
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT cause, updated_by FROM scheduler.providers WHERE provider_id = 'eu'"
        )
    assert tuple(row) == ("c2", "op")


async def test_retry_returns_first_result(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    first = await store.register(provider(), "same", "c1", "office")
    await store.register(provider(jurisdiction="CH"), "other", "c2", "office")
    retried = await store.register(provider(), "same", "c1", "office")
    assert retried == first
    current = await store.get("eu")
    assert current is not None
    assert current.regions[1].jurisdiction == "CH"


async def test_reused_request_id_for_other_registration_fails(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    await store.register(provider(), "same", "c1", "office")
    with pytest.raises(RequestReused, match="same"):
        await store.register(provider(jurisdiction="CN"), "same", "c2", "office")
    current = await store.get("eu")
    assert current is not None
    assert current.regions[1].jurisdiction == "EU"


async def test_list_pages_by_provider_id(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    for name in ("p3", "p1", "p5", "p2", "p4"):
        await store.register(provider(name), None, "c", "office")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = await store.list_page(2, token)
        seen += [p.provider_id for p in page]
        pages += 1
        assert all(len(p.regions) == 2 for p in page)
        if not token:
            break
    assert seen == ["p1", "p2", "p3", "p4", "p5"]
    assert pages == 3


async def test_malformed_page_token_raises(pool: asyncpg.Pool) -> None:
    store = ProviderStore(pool)
    with pytest.raises(ValueError, match="page_token"):
        await store.list_page(2, "not a token!")
    with pytest.raises(ValueError, match="provider listing"):
        await store.list_page(2, "ajEyMw")


async def test_inventory_registers_unknown_provider_with_cause(pool: asyncpg.Pool) -> None:
    nodes = NodeStore(pool)
    store = ProviderStore(pool)
    await store.register(provider("eu"), None, "rpc", "office")
    await nodes.upsert_inventories(
        [("eu", "fra", "n1", b"x"), ("eu", "new", "n2", b"x"), ("auto", "r1", "n9", b"x")]
    )
    auto = await store.get("auto")
    assert auto is not None
    assert auto.auto_registered
    assert auto.regions == (RegionRecord("r1", "r1", ""),)
    assert not auto.allow_cross_provider_gangs
    eu = await store.get("eu")
    assert eu is not None
    assert not eu.auto_registered
    assert [r.region_id for r in eu.regions] == ["ams", "fra", "new"]
    async with pool.acquire() as conn:
        causes = dict(
            await conn.fetch(
                "SELECT provider_id || '/' || region_id, cause FROM scheduler.regions"
                " WHERE auto_registered"
            )
        )
    assert causes == {
        "auto/r1": "inventory of node auto.r1.n9",
        "eu/new": "inventory of node eu.new.n2",
    }


async def test_registration_clears_auto_registered(pool: asyncpg.Pool) -> None:
    nodes = NodeStore(pool)
    store = ProviderStore(pool)
    await nodes.upsert_inventories([("eu", "fra", "n1", b"x")])
    stored = await store.register(provider("eu"), None, "rpc", "office")
    assert not stored.auto_registered
    assert stored.regions[1] == RegionRecord("fra", "Frankfurt", "EU")
