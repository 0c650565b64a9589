"""The provider registry's values: providers, their regions and jurisdictions (no I/O).

A provider registers itself (``RegisterProvider``) with its regions, the jurisdiction of each
region and whether its capacity may join gangs that span providers. A node whose inventory
names an unregistered provider or region is still scheduled: the node store registers
the provider and region automatically, with no jurisdiction and no cross-provider gangs, and
records the node that caused it. A later ``RegisterProvider`` call sets them properly.
A pledge must name a registered region, whether a node or ``RegisterProvider`` registered it.

:class:`ProviderDirectory` is what the engine adapter reads when it builds a job's engine
input: ``jurisdiction:<code>`` entries of a job's allowed regions become the registered
regions of that jurisdiction, and a gang may span providers only when every provider it may
use allows it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from acsp.subjects import check_token
from acsp.v1 import scheduler_pb2

from .validation import JURISDICTION_CODE, JURISDICTION_PREFIX, FieldViolation

MAX_DISPLAY_NAME: Final = 128
MAX_REGIONS: Final = 1000


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """One region of a provider."""

    region_id: str
    display_name: str = ""
    jurisdiction: str = ""
    """Jurisdiction code such as ``CN`` or ``EU``; empty when none is declared, so no
    ``jurisdiction:`` constraint matches the region."""


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A registered provider; ``regions`` are sorted by id."""

    provider_id: str
    display_name: str = ""
    regions: tuple[RegionRecord, ...] = ()
    allow_cross_provider_gangs: bool = False
    auto_registered: bool = False
    """True while the provider exists only because a node's inventory named it."""
    revision: int = 0
    """Count of registrations stored; 0 for a record not stored yet."""

    def digest(self) -> str:
        """Fingerprint of the registration, to detect a request id reused for another one."""
        body = {
            "provider_id": self.provider_id,
            "display_name": self.display_name,
            "allow_cross_provider_gangs": self.allow_cross_provider_gangs,
            "regions": [[r.region_id, r.display_name, r.jurisdiction] for r in self.regions],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def provider_from_proto(msg: scheduler_pb2.Provider) -> tuple[ProviderRecord, list[FieldViolation]]:
    """Convert a provider to register; every invalid field comes back as a violation.

    An empty display name becomes the id. Regions keep the request's order.
    """
    bad: list[FieldViolation] = []
    _check_id(bad, "provider.provider_id", msg.provider_id)
    _check_display_name(bad, "provider.display_name", msg.display_name)
    if len(msg.regions) > MAX_REGIONS:
        bad.append(
            FieldViolation(
                "provider.regions", f"lists {len(msg.regions)} regions; list at most {MAX_REGIONS}"
            )
        )
    seen: dict[str, int] = {}
    regions = []
    for i, region in enumerate(msg.regions):
        prefix = f"provider.regions[{i}]"
        _check_id(bad, f"{prefix}.region_id", region.region_id)
        first = seen.setdefault(region.region_id, i)
        if first != i:
            bad.append(
                FieldViolation(
                    f"{prefix}.region_id",
                    f"{region.region_id!r} is listed twice (also at regions[{first}]); "
                    "list each region once",
                )
            )
        _check_display_name(bad, f"{prefix}.display_name", region.display_name)
        if region.jurisdiction and not JURISDICTION_CODE.fullmatch(region.jurisdiction):
            bad.append(
                FieldViolation(
                    f"{prefix}.jurisdiction",
                    f"{region.jurisdiction!r} is not a jurisdiction code; use 2 to 8 capital "
                    "letters such as CN or EU, or leave it empty",
                )
            )
        regions.append(
            RegionRecord(
                region.region_id, region.display_name or region.region_id, region.jurisdiction
            )
        )
    record = ProviderRecord(
        provider_id=msg.provider_id,
        display_name=msg.display_name or msg.provider_id,
        regions=tuple(regions),
        allow_cross_provider_gangs=msg.allow_cross_provider_gangs,
    )
    return record, bad


def provider_to_proto(provider: ProviderRecord) -> scheduler_pb2.Provider:
    return scheduler_pb2.Provider(
        provider_id=provider.provider_id,
        display_name=provider.display_name,
        regions=[
            scheduler_pb2.Region(
                region_id=r.region_id, display_name=r.display_name, jurisdiction=r.jurisdiction
            )
            for r in provider.regions
        ],
        allow_cross_provider_gangs=provider.allow_cross_provider_gangs,
    )


def _check_id(bad: list[FieldViolation], field: str, value: str) -> None:
    name = field.rsplit(".", 1)[-1]
    try:
        check_token(name, value)
    except ValueError as exc:
        bad.append(FieldViolation(field, str(exc)))


def _check_display_name(bad: list[FieldViolation], field: str, value: str) -> None:
    if len(value) > MAX_DISPLAY_NAME:
        bad.append(
            FieldViolation(
                field, f"is {len(value)} characters long; use at most {MAX_DISPLAY_NAME}"
            )
        )
    elif any(ord(c) < 32 for c in value):
        bad.append(FieldViolation(field, "contains a control character; remove it"))


class ProviderDirectory:
    """Registered providers, indexed for building the engine's inputs."""

    def __init__(self, providers: Iterable[ProviderRecord] = ()) -> None:
        self._providers: dict[str, ProviderRecord] = {p.provider_id: p for p in providers}
        self.region_keys: Final[frozenset[str]] = frozenset(
            f"{p.provider_id}/{r.region_id}" for p in self._providers.values() for r in p.regions
        )
        """``provider/region`` keys of every registered region, with or without nodes."""
        regions: dict[str, set[str]] = {}
        for provider in self._providers.values():
            for region in provider.regions:
                if region.jurisdiction:
                    key = f"{provider.provider_id}/{region.region_id}"
                    regions.setdefault(region.jurisdiction, set()).add(key)
        self._by_jurisdiction: Mapping[str, frozenset[str]] = {
            code: frozenset(keys) for code, keys in regions.items()
        }

    @property
    def jurisdictions(self) -> frozenset[str]:
        """Codes that at least one registered region declares."""
        return frozenset(self._by_jurisdiction)

    def get(self, provider_id: str) -> ProviderRecord | None:
        return self._providers.get(provider_id)

    def provider_ids(self) -> frozenset[str]:
        return frozenset(self._providers)

    def regions_in(self, jurisdiction: str) -> frozenset[str]:
        """``provider/region`` keys of the regions that declare ``jurisdiction``."""
        return self._by_jurisdiction.get(jurisdiction, frozenset())

    def allows_cross_provider(self, provider_id: str) -> bool:
        """Return whether gangs may span this provider and another; False when unregistered."""
        provider = self._providers.get(provider_id)
        return provider is not None and provider.allow_cross_provider_gangs

    def with_provider(self, provider: ProviderRecord) -> ProviderDirectory:
        """Return a copy in which ``provider`` replaces an older revision of itself."""
        current = self._providers.get(provider.provider_id)
        if current is not None and current.revision > provider.revision:
            return self
        others = [p for p in self._providers.values() if p.provider_id != provider.provider_id]
        return ProviderDirectory([*others, provider])

    def resolve_regions(self, allowed: Iterable[str]) -> frozenset[str]:
        """Turn a job's allowed regions into ``provider/region`` keys.

        A ``jurisdiction:<code>`` entry becomes the regions of that jurisdiction. An entry whose
        jurisdiction has no region is kept as it is: it matches no region, so the job waits
        instead of running anywhere, which an empty set would allow.
        """
        keys: set[str] = set()
        for entry in allowed:
            if entry.startswith(JURISDICTION_PREFIX):
                regions = self.regions_in(entry.removeprefix(JURISDICTION_PREFIX))
                if regions:
                    keys.update(regions)
                    continue
            keys.add(entry)
        return frozenset(keys)
