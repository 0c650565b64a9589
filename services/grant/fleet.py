"""The providers and regions the scheduler has registered, checked when a grant's limits are set.

A grant limited to a provider or region that does not exist can pay for no placement, and its
limits cannot be changed after the award. So an award (and an application) that names providers
or regions is checked against the scheduler's registrations. Awards are rare, so each check
makes one paged ListProviders call instead of keeping a copy in sync.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import grpc

from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.grant.errors import InvalidArgument
from services.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

LIST_TIMEOUT_S: Final = 5.0
"""Seconds one ListProviders page may take; the incoming request's deadline can cut it."""
PAGE_SIZE: Final = 1000
"""Providers per ListProviders page: the scheduler's maximum page size."""
MAX_PAGES: Final = 100
"""Pages read before giving up, so that a token that never ends cannot loop forever."""
LIST_COMMAND: Final = "acsp fleet providers"


@dataclass(frozen=True, slots=True)
class Registered:
    """The registered providers, each with the ids of its regions."""

    regions: Mapping[str, frozenset[str]]

    def listed(self) -> str:
        return ", ".join(sorted(self.regions)) or "none yet"


def check_registered(
    registered: Registered,
    providers_field: str,
    providers: Sequence[str],
    regions_field: str,
    regions: Sequence[str],
) -> None:
    """Raise InvalidArgument naming the first provider or region that is not registered."""
    for index, provider in enumerate(providers):
        if provider not in registered.regions:
            raise InvalidArgument(
                f"{providers_field}[{index}]",
                f"provider {provider!r} is not registered with the scheduler (registered: "
                f"{registered.listed()})",
                f"name a registered provider ({LIST_COMMAND} lists them), or register it first",
            )
    for index, key in enumerate(regions):
        provider, _, region = key.partition("/")
        known = registered.regions.get(provider)
        if known is None:
            raise InvalidArgument(
                f"{regions_field}[{index}]",
                f"region {key!r} is of provider {provider!r}, which is not registered with the "
                f"scheduler (registered: {registered.listed()})",
                f"name a region of a registered provider ({LIST_COMMAND} lists them)",
            )
        if region not in known:
            choices = ", ".join(f"{provider}/{r}" for r in sorted(known)) or "none"
            raise InvalidArgument(
                f"{regions_field}[{index}]",
                f"provider {provider!r} has no region {region!r} (its regions: {choices})",
                f"name one of its regions ({LIST_COMMAND} lists them)",
            )


class ProviderRegistry:
    """Reader of the providers and regions registered with the scheduler, over gRPC."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerServiceStub, address: str) -> None:
        self._stub = stub
        self._address = address

    async def registered(self) -> Registered:
        """List every registered provider; raise Unavailable when the scheduler fails to."""
        regions: dict[str, frozenset[str]] = {}
        token = ""
        for _ in range(MAX_PAGES):
            request = scheduler_pb2.ListProvidersRequest(
                page=common_pb2.PageRequest(page_size=PAGE_SIZE, page_token=token)
            )
            try:
                response = await self._stub.ListProviders(request, timeout=LIST_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                logger.warning(
                    "listing providers at the scheduler %s failed: %s %s",
                    self._address,
                    error.code().name,
                    error.details(),
                )
                raise Unavailable(
                    f"the scheduler at {self._address} did not list its providers "
                    f"({error.code().name}: {error.details()}), so the grant's providers and "
                    "regions could not be checked; nothing was changed, retry when the "
                    "scheduler is reachable"
                ) from None
            for provider in response.providers:
                regions[provider.provider_id] = frozenset(r.region_id for r in provider.regions)
            token = response.page.next_page_token
            if not token:
                return Registered(regions)
        raise Unavailable(
            f"the scheduler at {self._address} listed more than {MAX_PAGES} pages of providers; "
            "nothing was changed, retry later"
        )
