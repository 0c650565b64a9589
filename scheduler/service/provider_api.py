"""Provider registry RPCs of the scheduler: RegisterProvider and ListProviders."""

from __future__ import annotations

import asyncio
from typing import Final

import grpc

from acsp.v1 import common_pb2, scheduler_pb2
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.context import remaining_s, request_id
from services.runtime.errors import FailedPrecondition, InvalidArgument, PermissionDenied

from .errors import InvalidFields
from .inputs import ProviderRegistered
from .leadership import Leadership
from .provider_store import ProviderStore, RequestReused
from .providers import provider_from_proto, provider_to_proto
from .validation import MAX_REQUEST_ID_LENGTH, check_length

REGISTRARS: Final = (Role.PROGRAM_OFFICE, Role.PROVIDER_OPERATOR)
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000


class ProviderRpcs:
    """Handlers of the provider registry half of ``SchedulerService``."""

    def __init__(self, leadership: Leadership) -> None:
        self._lead = leadership
        self._providers = ProviderStore(leadership.pool)

    def known_jurisdictions(self) -> frozenset[str] | None:
        """Jurisdiction codes of the leader's registry; None on a standby, which checks none
        because it rejects submissions anyway."""
        term = self._lead.current
        return term.book.engine.providers.jurisdictions if term is not None else None

    def known_regions(self) -> frozenset[str] | None:
        """``provider/region`` keys that a job may name, from the leader's memory; None on a
        standby, which checks none because it rejects submissions anyway."""
        # NOTE: a region that a leader of another shard registers during this term is missing
        # here until this shard's next term reads the registry from PostgreSQL.
        term = self._lead.current
        return term.book.engine.known_regions if term is not None else None

    async def RegisterProvider(
        self, request: scheduler_pb2.RegisterProviderRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Provider:
        principal = require_roles(*REGISTRARS)
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        if not request.HasField("provider"):
            raise InvalidArgument("provider", "is missing", "pass the provider and its regions")
        provider, violations = provider_from_proto(request.provider)
        if violations:
            raise InvalidFields(violations)
        _check_registrar(principal, provider.provider_id)
        leader = self._lead.require()
        cause = f"rpc:RegisterProvider:{request.request_id or request_id() or ''}"
        try:
            stored = await self._providers.register(
                provider, request.request_id or None, cause, principal.subject
            )
        except RequestReused as exc:
            raise FailedPrecondition(str(exc), field="request_id") from None
        # Return once the leader uses the registration, so that a job submitted next may name
        # the jurisdictions it declares.
        # NOTE: only this shard's leader applies the registration now; a leader of another
        # shard reads it from PostgreSQL when its next term starts.
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await leader.inbox.put(ProviderRegistered(stored, applied))
        await asyncio.wait_for(applied, timeout=remaining_s(10.0))
        return provider_to_proto(stored)

    async def ListProviders(
        self, request: scheduler_pb2.ListProvidersRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListProvidersResponse:
        current_principal()
        size = request.page.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page.page_size",
                f"{size} is above {MAX_PAGE_SIZE}",
                f"ask for at most {MAX_PAGE_SIZE}",
            )
        try:
            providers, token = await self._providers.list_page(size, request.page.page_token)
        except ValueError as exc:
            raise InvalidArgument(
                "page.page_token", str(exc), "pass a token a provider listing returned"
            ) from None
        return scheduler_pb2.ListProvidersResponse(
            providers=[provider_to_proto(p) for p in providers],
            page=common_pb2.PageResponse(next_page_token=token),
        )


def _check_registrar(principal: Principal, provider_id: str) -> None:
    """Let the program office register any provider and an operator only their own."""
    if Role.PROGRAM_OFFICE in principal.roles:
        return
    if principal.provider is None:
        raise PermissionDenied(
            f"provider operator {principal.subject!r} has a token that names no provider; "
            "ask for a token of your provider"
        )
    if principal.provider != provider_id:
        raise PermissionDenied(
            f"operator of provider {principal.provider!r} cannot register provider {provider_id!r}"
        )
