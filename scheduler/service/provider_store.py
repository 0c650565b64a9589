"""Rows of ``scheduler.providers``, ``scheduler.regions`` and ``scheduler.provider_requests``."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from acsp.subjects import TOKEN_PATTERN

from .providers import ProviderRecord, RegionRecord

logger = logging.getLogger(__name__)

_PAGE_TOKEN_PREFIX = "provider:"


class RequestReused(Exception):
    """A request id was already used to register something else."""


class ProviderStore:
    """The provider registry in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout_s

    async def register(
        self, provider: ProviderRecord, request_id: str | None, cause: str, subject: str
    ) -> ProviderRecord:
        """Create or update a provider and the regions it lists; return the stored provider.

        Regions the call does not list keep what they had, since nodes and pledges may still
        name them. A request id seen before returns the provider as that first call left it,
        or raises :class:`RequestReused` if it registered something else.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            digest = provider.digest()
            if request_id:
                # The insert waits for a concurrent call with the same key to commit, so
                # exactly one of them writes and the other reads its result.
                claimed = await conn.fetchval(
                    "INSERT INTO scheduler.provider_requests (request_id, provider_id, digest)"
                    " VALUES ($1, $2, $3) ON CONFLICT (request_id) DO NOTHING"
                    " RETURNING request_id",
                    request_id,
                    provider.provider_id,
                    digest,
                    timeout=self._timeout,
                )
                if claimed is None:
                    return await self._earlier(conn, request_id, digest)
            await self._write(conn, provider, cause, subject)
            stored = await self._read(conn, provider.provider_id)
            assert stored is not None
            if request_id:
                await conn.execute(
                    "UPDATE scheduler.provider_requests SET response = $2 WHERE request_id = $1",
                    request_id,
                    json.dumps(_record_to_json(stored)),
                    timeout=self._timeout,
                )
        return stored

    async def _earlier(
        self, conn: asyncpg.Connection, request_id: str, digest: str
    ) -> ProviderRecord:
        row = await conn.fetchrow(
            "SELECT digest, response FROM scheduler.provider_requests WHERE request_id = $1",
            request_id,
            timeout=self._timeout,
        )
        assert row is not None and row["response"] is not None
        if row["digest"] != digest:
            raise RequestReused(
                f"request_id {request_id!r} was already used for a different registration"
            )
        return _record_from_json(json.loads(row["response"]))

    async def _write(
        self, conn: asyncpg.Connection, provider: ProviderRecord, cause: str, subject: str
    ) -> None:
        await conn.execute(
            "INSERT INTO scheduler.providers (provider_id, display_name,"
            " allow_cross_provider_gangs, auto_registered, cause, updated_by)"
            " VALUES ($1, $2, $3, false, $4, $5)"
            " ON CONFLICT (provider_id) DO UPDATE SET display_name = EXCLUDED.display_name,"
            " allow_cross_provider_gangs = EXCLUDED.allow_cross_provider_gangs,"
            " auto_registered = false, cause = EXCLUDED.cause, updated_by = EXCLUDED.updated_by,"
            " revision = scheduler.providers.revision + 1, updated_at = now()",
            provider.provider_id,
            provider.display_name,
            provider.allow_cross_provider_gangs,
            cause,
            subject,
            timeout=self._timeout,
        )
        if not provider.regions:
            return
        await conn.executemany(
            "INSERT INTO scheduler.regions (provider_id, region_id, display_name, jurisdiction,"
            " auto_registered, cause) VALUES ($1, $2, $3, $4, false, $5)"
            " ON CONFLICT (provider_id, region_id) DO UPDATE"
            " SET display_name = EXCLUDED.display_name, jurisdiction = EXCLUDED.jurisdiction,"
            " auto_registered = false, cause = EXCLUDED.cause, updated_at = now()",
            # Region order, as in register_named_regions, so concurrent writers lock the rows
            # in the same order and do not deadlock.
            [
                (provider.provider_id, r.region_id, r.display_name, r.jurisdiction, cause)
                for r in sorted(provider.regions, key=lambda r: r.region_id)
            ],
            timeout=self._timeout,
        )

    async def get(self, provider_id: str) -> ProviderRecord | None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await self._read(conn, provider_id)

    async def _read(self, conn: asyncpg.Connection, provider_id: str) -> ProviderRecord | None:
        found = await self._providers(conn, [provider_id])
        return found[0] if found else None

    async def list_page(self, page_size: int, page_token: str) -> tuple[list[ProviderRecord], str]:
        """Return one page of providers by id and the token of the next page ("" at the end).

        Raises ``ValueError`` for a token no listing returned.
        """
        after = decode_provider_page_token(page_token) if page_token else ""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            ids = await conn.fetch(
                "SELECT provider_id FROM scheduler.providers WHERE provider_id > $1"
                " ORDER BY provider_id LIMIT $2",
                after,
                page_size + 1,
                timeout=self._timeout,
            )
            more = len(ids) > page_size
            page = [row[0] for row in ids[:page_size]]
            providers = await self._providers(conn, page)
        token = encode_provider_page_token(page[-1]) if more else ""
        return providers, token

    async def all(self) -> list[ProviderRecord]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            ids = await conn.fetch(
                "SELECT provider_id FROM scheduler.providers ORDER BY provider_id",
                timeout=self._timeout,
            )
            return await self._providers(conn, [row[0] for row in ids])

    async def _providers(
        self, conn: asyncpg.Connection, provider_ids: Sequence[str]
    ) -> list[ProviderRecord]:
        if not provider_ids:
            return []
        rows = await conn.fetch(
            "SELECT provider_id, display_name, allow_cross_provider_gangs, auto_registered,"
            " revision FROM scheduler.providers WHERE provider_id = ANY($1::text[])"
            " ORDER BY provider_id",
            list(provider_ids),
            timeout=self._timeout,
        )
        region_rows = await conn.fetch(
            "SELECT provider_id, region_id, display_name, jurisdiction FROM scheduler.regions"
            " WHERE provider_id = ANY($1::text[]) ORDER BY provider_id, region_id",
            list(provider_ids),
            timeout=self._timeout,
        )
        regions: dict[str, list[RegionRecord]] = {}
        for row in region_rows:
            regions.setdefault(row["provider_id"], []).append(
                RegionRecord(row["region_id"], row["display_name"], row["jurisdiction"])
            )
        return [
            ProviderRecord(
                provider_id=row["provider_id"],
                display_name=row["display_name"],
                regions=tuple(regions.get(row["provider_id"], ())),
                allow_cross_provider_gangs=row["allow_cross_provider_gangs"],
                auto_registered=row["auto_registered"],
                revision=row["revision"],
            )
            for row in rows
        ]


async def register_named_regions(
    conn: asyncpg.Connection, named: Sequence[tuple[str, str, str]], timeout_s: float
) -> None:
    """Register the unregistered providers and regions of ``(provider, region, node)`` rows.

    They get no jurisdiction and no cross-provider gangs, with the first node that named
    them as the cause; registered ones are left as they are.
    """
    first: dict[tuple[str, str], str] = {}
    for provider, region, node in sorted(named):
        first.setdefault((provider, region), f"{provider}.{region}.{node}")
    providers: dict[str, str] = {}
    for (provider, _), node_key in first.items():
        providers.setdefault(provider, node_key)
    added_providers = await conn.fetch(
        "INSERT INTO scheduler.providers (provider_id, display_name, auto_registered, cause)"
        " SELECT p, p, true, 'inventory of node ' || n"
        " FROM unnest($1::text[], $2::text[]) AS t (p, n)"
        " ON CONFLICT (provider_id) DO NOTHING RETURNING provider_id, cause",
        list(providers),
        list(providers.values()),
        timeout=timeout_s,
    )
    added_regions = await conn.fetch(
        "INSERT INTO scheduler.regions (provider_id, region_id, display_name, auto_registered,"
        " cause) SELECT p, r, r, true, 'inventory of node ' || n"
        " FROM unnest($1::text[], $2::text[], $3::text[]) AS t (p, r, n)"
        " ON CONFLICT (provider_id, region_id) DO NOTHING RETURNING provider_id, region_id, cause",
        [key[0] for key in first],
        [key[1] for key in first],
        list(first.values()),
        timeout=timeout_s,
    )
    for row in added_providers:
        logger.info("provider %s registered automatically from the %s", row[0], row[1])
    for row in added_regions:
        logger.info("region %s/%s registered automatically from the %s", row[0], row[1], row[2])


def encode_provider_page_token(last_provider_id: str) -> str:
    raw = (_PAGE_TOKEN_PREFIX + last_provider_id).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_provider_page_token(token: str) -> str:
    """Return the provider id a page token continues after; raise ``ValueError`` if malformed."""
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"page_token {token!r} is malformed") from exc
    if not value.startswith(_PAGE_TOKEN_PREFIX):
        raise ValueError(f"page_token {token!r} is not a provider listing's token")
    provider_id = value.removeprefix(_PAGE_TOKEN_PREFIX)
    # A forged id reaches PostgreSQL as the bound of the next page, where a NUL character
    # would fail as an internal error.
    if not TOKEN_PATTERN.match(provider_id):
        raise ValueError(f"page_token {token!r} is malformed")
    return provider_id


def _record_to_json(provider: ProviderRecord) -> dict[str, object]:
    return {
        "provider_id": provider.provider_id,
        "display_name": provider.display_name,
        "allow_cross_provider_gangs": provider.allow_cross_provider_gangs,
        "regions": [[r.region_id, r.display_name, r.jurisdiction] for r in provider.regions],
        "revision": provider.revision,
    }


def _record_from_json(value: dict[str, Any]) -> ProviderRecord:
    regions = value["regions"]
    return ProviderRecord(
        provider_id=str(value["provider_id"]),
        display_name=str(value["display_name"]),
        regions=tuple(RegionRecord(str(r[0]), str(r[1]), str(r[2])) for r in regions),
        allow_cross_provider_gangs=bool(value["allow_cross_provider_gangs"]),
        revision=int(value["revision"]),
    )
