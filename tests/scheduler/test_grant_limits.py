"""Grant constraints: checked against a submission, then narrowing its engine input."""

from __future__ import annotations

from dataclasses import replace

from scheduler.engine import spec as es
from scheduler.engine.catalog import Catalog
from scheduler.service.engine_adapter import depends_on_providers, job_to_engine
from scheduler.service.grant_limits import (
    NO_ALLOWED_REGION,
    GrantLimits,
    check_against_grant,
    narrow_to_grant,
)
from scheduler.service.model import Job, JobSpec
from scheduler.service.providers import ProviderDirectory, ProviderRecord, RegionRecord

CATALOG = Catalog()
PROVIDERS = ProviderDirectory(
    [
        ProviderRecord(
            "cloud-a",
            regions=(RegionRecord("east", jurisdiction="EU"), RegionRecord("west")),
            allow_cross_provider_gangs=True,
        ),
        ProviderRecord(
            "cloud-b",
            regions=(RegionRecord("north", jurisdiction="EU"),),
            allow_cross_provider_gangs=True,
        ),
    ]
)


def spec(**fields: object) -> JobSpec:
    base = JobSpec(name="j", project_id="p1", grant_id="g1", command=("true",))
    return replace(base, **fields)  # type: ignore[arg-type]


def fields_of(job_spec: JobSpec, limits: GrantLimits) -> list[str]:
    return [v.field for v in check_against_grant(job_spec, limits, PROVIDERS, CATALOG)]


def test_unconstrained_grant_accepts_any_spec() -> None:
    limits = GrantLimits("g1")

    assert fields_of(spec(allow_cross_provider=True, models=("MI300X",)), limits) == []


def test_models_outside_grant_rejected() -> None:
    limits = GrantLimits("g1", models=("H100-SXM5-80GB", "H800"))
    [violation] = check_against_grant(spec(models=("A100-SXM4-80GB",)), limits, PROVIDERS, CATALOG)

    assert violation.field == "spec.accelerators.models"
    assert "H100-SXM5-80GB, H800" in violation.reason
    assert fields_of(spec(models=("A100-SXM4-80GB", "H800")), limits) == []
    assert fields_of(spec(), limits) == []


def test_constraint_matching_no_grant_model_rejected() -> None:
    limits = GrantLimits("g1", models=("H100-SXM5-80GB",))

    assert fields_of(spec(vendor="amd"), limits) == ["spec.accelerators"]
    assert fields_of(spec(min_memory_gib=100), limits) == ["spec.accelerators"]


def test_regions_outside_grant_rejected() -> None:
    by_region = GrantLimits("g1", regions=("cloud-a/east",))
    by_provider = GrantLimits("g1", providers=("cloud-b",))
    [violation] = check_against_grant(
        spec(allowed_regions=("cloud-a/west",)), by_region, PROVIDERS, CATALOG
    )

    assert violation.field == "spec.allowed_regions"
    assert "regions cloud-a/east" in violation.reason
    assert fields_of(spec(allowed_regions=("cloud-a/west", "cloud-a/east")), by_region) == []
    assert fields_of(spec(allowed_regions=("cloud-a/east",)), by_provider) == [
        "spec.allowed_regions"
    ]
    assert fields_of(spec(allowed_regions=("jurisdiction:EU",)), by_provider) == []
    assert fields_of(spec(), by_provider) == []


def test_grant_allowing_no_region_rejected() -> None:
    limits = GrantLimits("g1", providers=("cloud-b",), regions=("cloud-a/east",))

    assert fields_of(spec(), limits) == ["spec.grant_id"]


def test_cross_provider_needs_two_grant_providers() -> None:
    one = GrantLimits("g1", providers=("cloud-a",))
    one_by_region = GrantLimits("g1", regions=("cloud-a/east", "cloud-a/west"))
    two = GrantLimits("g1", regions=("cloud-a/east", "cloud-b/north"))
    [violation] = check_against_grant(spec(allow_cross_provider=True), one, PROVIDERS, CATALOG)

    assert violation.field == "spec.allow_cross_provider"
    assert "only provider cloud-a" in violation.reason
    assert fields_of(spec(allow_cross_provider=True), one_by_region) == [
        "spec.allow_cross_provider"
    ]
    assert fields_of(spec(allow_cross_provider=True), two) == []
    assert fields_of(spec(allow_cross_provider=False), one) == []


def engine_spec(
    job_spec: JobSpec, limits: GrantLimits, fleet_regions: frozenset[str] = frozenset()
) -> es.JobSpec:
    job = Job(job_id="j1", spec=narrow_to_grant(job_spec, limits, CATALOG), owner="alice")
    return job_to_engine(job, PROVIDERS, frozenset(), fleet_regions)


def test_engine_input_narrowed_to_grant() -> None:
    models = GrantLimits("g1", models=("H800", "H100-SXM5-80GB", "not-in-catalog"))
    regions = GrantLimits("g1", regions=("cloud-a/east", "cloud-b/north"))
    provider = GrantLimits("g1", providers=("cloud-a",))

    assert engine_spec(spec(), models).models == {"H800", "H100-SXM5-80GB"}
    assert engine_spec(spec(models=("H800", "T4")), models).models == {"H800"}
    assert engine_spec(spec(), regions).regions == {"cloud-a/east", "cloud-b/north"}
    assert engine_spec(spec(allowed_regions=("jurisdiction:EU",)), provider).regions == {
        "cloud-a/east"
    }
    assert engine_spec(spec(), provider, frozenset({"cloud-a/south", "cloud-b/x"})).regions == {
        "cloud-a/east",
        "cloud-a/west",
        "cloud-a/south",
    }
    assert engine_spec(spec(), GrantLimits("g1")).regions == frozenset()


def test_engine_input_never_widens_to_any() -> None:
    provider = GrantLimits("g1", providers=("cloud-c",))
    regions = GrantLimits("g1", regions=("cloud-a/east",))
    narrowed = engine_spec(spec(), provider)
    disjoint = engine_spec(spec(allowed_regions=("cloud-a/west",)), regions)

    assert narrowed.regions == {NO_ALLOWED_REGION}
    assert disjoint.regions == {NO_ALLOWED_REGION}


def test_cross_provider_judged_on_narrowed_regions() -> None:
    grant = GrantLimits("g1", regions=("cloud-a/east", "cloud-b/north"))
    # cloud-c is unregistered, so it allows no cross-provider gang; the grant drops it.
    job_spec = spec(
        allow_cross_provider=True, allowed_regions=("cloud-a/east", "cloud-b/north", "cloud-c/x")
    )
    narrowed = engine_spec(job_spec, grant)
    unconstrained = engine_spec(job_spec, GrantLimits("g1"))

    assert narrowed.regions == {"cloud-a/east", "cloud-b/north"}
    assert narrowed.allow_cross_provider is True
    assert unconstrained.allow_cross_provider is False


def test_provider_only_grant_follows_fleet() -> None:
    provider = GrantLimits("g1", providers=("cloud-a",))
    job = Job(job_id="j1", spec=narrow_to_grant(spec(), provider, CATALOG), owner="alice")
    listed = Job(
        job_id="j2",
        spec=narrow_to_grant(spec(allowed_regions=("cloud-a/east",)), provider, CATALOG),
        owner="alice",
    )

    assert depends_on_providers(job)
    assert not depends_on_providers(listed)
