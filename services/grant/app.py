"""The grant service's shared state: settings, database, ledger and its batcher."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from nats.js.client import JetStreamContext

from acsp.v1 import common_pb2
from services.grant.errors import InvalidArgument
from services.grant.fleet import ProviderRegistry, check_registered
from services.grant.ledger import Ledger
from services.grant.ledger_batcher import LedgerBatcher
from services.grant.settings import GrantSettings
from services.runtime.db import Database
from services.runtime.errors import Unavailable

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REQUEST_ID_LIMIT: Final = 200


@dataclass
class GrantApp:
    """Set up by the service's start hook; the servicer reads it on every call."""

    settings: GrantSettings
    db: Database | None = None
    ledger: Ledger | None = None
    batcher: LedgerBatcher | None = None
    js: JetStreamContext | None = None
    """JetStream, when the service runs with NATS; used to read the current rate card."""

    providers: ProviderRegistry | None = None
    """The scheduler's registered providers; None when ACSP_SCHEDULER_ADDRESS is not set."""

    async def check_registered(
        self,
        providers_field: str,
        providers: tuple[str, ...],
        regions_field: str,
        regions: tuple[str, ...],
    ) -> None:
        """Raise InvalidArgument unless the scheduler registered every provider and region.

        Without a scheduler address only the format was checked, by the caller.
        """
        if self.providers is None or not (providers or regions):
            return
        registered = await self.providers.registered()
        check_registered(registered, providers_field, providers, regions_field, regions)

    def database(self) -> Database:
        if self.db is None:
            raise Unavailable("the grant service is still starting; retry")
        return self.db

    def ledger_batcher(self) -> LedgerBatcher:
        if self.batcher is None:
            raise Unavailable("the grant service is still starting; retry")
        return self.batcher

    def direct_ledger(self) -> Ledger:
        if self.ledger is None:
            raise Unavailable("the grant service is still starting; retry")
        return self.ledger


def page_in(page: common_pb2.PageRequest) -> tuple[int, str]:
    """Return (limit, token) of a page request; the token is the last key of the prior page."""
    size = page.page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page.page_size", f"{size} is above {MAX_PAGE_SIZE}", f"ask for at most {MAX_PAGE_SIZE}"
        )
    return size, page.page_token


def page_out(keys: list[str], limit: int) -> common_pb2.PageResponse:
    """Return the next-page token: the last key when the page was full, else empty."""
    return common_pb2.PageResponse(next_page_token=keys[-1] if len(keys) == limit else "")


def identifier_in(field_name: str, value: str) -> str:
    """Validate an id chosen by the caller (institution, project)."""
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            field_name,
            f"{value!r} is not a valid id",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def reference_in(field_name: str, value: str) -> str:
    """Validate a reference to an existing object by id (grant, hold, application)."""
    if not value:
        raise InvalidArgument(field_name, "is missing", f"give the {field_name}")
    if len(value) > REQUEST_ID_LIMIT:
        raise InvalidArgument(
            field_name, "is too long", f"keep it to {REQUEST_ID_LIMIT} characters"
        )
    return value


def scoped_key(kind: str, caller: str, request_id: str) -> str:
    """Return the stored idempotency key of a caller's request of one kind.

    The key contains the caller, so a request id that another caller used starts a new
    request instead of returning theirs. The caller's length makes the key unambiguous.
    """
    return f"{kind}:{len(caller)}:{caller}/{request_id}"


def request_id_in(value: str, field_name: str = "request_id") -> str:
    """Validate an idempotency key: required, because money RPCs must be safe to retry."""
    if not value.strip():
        raise InvalidArgument(
            field_name, "is missing", "give a unique idempotency key and reuse it on retries"
        )
    if len(value) > REQUEST_ID_LIMIT:
        raise InvalidArgument(
            field_name, f"is {len(value)} characters", f"keep it to {REQUEST_ID_LIMIT} characters"
        )
    return value
