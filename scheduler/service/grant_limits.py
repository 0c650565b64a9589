"""A grant's constraints applied to a submission: checked at submit, then narrowing placement.

A grant may limit where it is spent to some providers, some ``<provider>/<region>`` regions and
some accelerator models (``GrantConstraints`` in the grant service's API). A job whose accepted
regions, models or cross-provider choice cannot meet them is rejected at submit with
FAILED_PRECONDITION. An accepted job carries the constraints in its spec, and the engine adapter
narrows the job's allowed regions and models to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from scheduler.engine.catalog import Catalog
from services.runtime.evolve import evolve

from .model import JobSpec
from .providers import ProviderDirectory
from .validation import FieldViolation, model_meets

NO_ALLOWED_REGION: Final = "none-allowed-by-the-grant"
"""Region entry that matches no ``<provider>/<region>`` key, because it has no slash. The
engine reads an empty region set as "any region", so a set narrowed to nothing becomes this."""


@dataclass(frozen=True, slots=True)
class GrantLimits:
    """The constraints of one grant; an empty tuple allows any."""

    grant_id: str
    providers: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    """``<provider>/<region>`` keys."""
    models: tuple[str, ...] = ()
    """Catalog model names."""

    def allows_region(self, key: str) -> bool:
        """Return whether a ``<provider>/<region>`` key is within the grant's constraints."""
        if self.regions and key not in self.regions:
            return False
        return not self.providers or key.partition("/")[0] in self.providers

    def usable_providers(self) -> frozenset[str] | None:
        """Return the providers the grant allows, or None when it allows any."""
        if not self.providers and not self.regions:
            return None
        usable = {key.partition("/")[0] for key in self.regions if self.allows_region(key)}
        if not self.regions:
            usable = set(self.providers)
        return frozenset(usable)


def check_against_grant(
    spec: JobSpec,
    limits: GrantLimits,
    providers: ProviderDirectory,
    catalog: Catalog,
    prefix: str = "spec",
) -> list[FieldViolation]:
    """Return why ``spec`` cannot run within the grant's constraints; empty when it can."""
    out: list[FieldViolation] = []
    grant = limits.grant_id
    models = _allowed_models(spec, limits, catalog)
    if models is not None and not models:
        allowed = _listed(limits.models)
        if spec.models:
            reason = (
                f"none of {_listed(spec.models)} is allowed by grant {grant}, which allows "
                f"{allowed}; accept one of those"
            )
            out.append(FieldViolation(f"{prefix}.accelerators.models", reason))
        else:
            reason = (
                f"no model grant {grant} allows ({allowed}) meets the vendor, memory and "
                "software stack constraint; relax the constraint or accept a model the grant "
                "allows"
            )
            out.append(FieldViolation(f"{prefix}.accelerators", reason))
    usable = limits.usable_providers()
    if usable is not None:
        out += _check_regions(spec, limits, providers, prefix)
        if spec.allow_cross_provider and len(usable) < 2:
            only = _listed(usable) or "none"
            out.append(
                FieldViolation(
                    f"{prefix}.allow_cross_provider",
                    f"is true, but grant {grant} allows only provider {only}, so a gang "
                    "cannot span providers; set it to false",
                )
            )
    return out


def narrow_to_grant(spec: JobSpec, limits: GrantLimits, catalog: Catalog) -> JobSpec:
    """Copy the grant's constraints into ``spec``, keeping only models in the catalog."""
    return evolve(
        spec,
        grant_providers=tuple(sorted(limits.providers)),
        grant_regions=tuple(sorted(limits.regions)),
        grant_models=tuple(sorted(m for m in limits.models if m in catalog)),
    )


def spec_limits(spec: JobSpec) -> GrantLimits:
    """Return the grant constraints a spec carries (see :func:`narrow_to_grant`)."""
    return GrantLimits(spec.grant_id, spec.grant_providers, spec.grant_regions, spec.grant_models)


def narrow_models(spec: JobSpec) -> frozenset[str]:
    """Return the accepted models within the grant's; empty accepts any."""
    accepted = frozenset(spec.models)
    if not spec.grant_models:
        return accepted
    allowed = frozenset(spec.grant_models)
    narrowed = accepted & allowed if accepted else allowed
    # Submit rejects a job whose models miss the grant's, so an empty result means data that
    # predates a change. The grant's own models then apply, never "any model".
    return narrowed or allowed


def narrow_regions(
    spec: JobSpec, regions: frozenset[str], known_regions: Iterable[str]
) -> frozenset[str]:
    """Return ``regions`` (a job's resolved allowed regions, empty for any) within the grant's.

    ``known_regions`` are the ``<provider>/<region>`` keys of registered regions and of regions
    with nodes; a job that allows any region gets those its grant allows.
    """
    limits = spec_limits(spec)
    if limits.usable_providers() is None:
        return regions
    if regions:
        candidates: Iterable[str] = regions
    elif limits.regions:
        candidates = limits.regions
    else:
        candidates = known_regions
    narrowed = frozenset(key for key in candidates if limits.allows_region(key))
    return narrowed or frozenset({NO_ALLOWED_REGION})


def depends_on_known_regions(spec: JobSpec) -> bool:
    """Return whether narrowing needs the known regions: the grant names only providers."""
    return bool(spec.grant_providers) and not spec.grant_regions and not spec.allowed_regions


def _allowed_models(spec: JobSpec, limits: GrantLimits, catalog: Catalog) -> set[str] | None:
    """Return the models the job may use under the grant, or None when the grant allows any."""
    if not limits.models:
        return None
    allowed = {m for m in limits.models if m in catalog}
    if spec.models:
        return allowed & set(spec.models)
    return {m for m in allowed if model_meets(catalog.get(m), spec)}


def _check_regions(
    spec: JobSpec, limits: GrantLimits, providers: ProviderDirectory, prefix: str
) -> list[FieldViolation]:
    grant = limits.grant_id
    if limits.providers and limits.regions and limits.usable_providers() == frozenset():
        # The grant itself allows no region: every region it names is of another provider.
        return [
            FieldViolation(
                f"{prefix}.grant_id",
                f"grant {grant} allows regions {_listed(limits.regions)} but only providers "
                f"{_listed(limits.providers)}, so no region is allowed; ask the program office "
                "to correct the grant's constraints",
            )
        ]
    if not spec.allowed_regions:
        return []
    resolved = providers.resolve_regions(spec.allowed_regions)
    if any(limits.allows_region(key) for key in resolved):
        return []
    parts = []
    if limits.providers:
        parts.append(f"providers {_listed(limits.providers)}")
    if limits.regions:
        parts.append(f"regions {_listed(limits.regions)}")
    return [
        FieldViolation(
            f"{prefix}.allowed_regions",
            f"none of {_listed(spec.allowed_regions)} is within grant {grant}, which allows "
            f"{' and '.join(parts)}; allow one of those",
        )
    ]


def _listed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
