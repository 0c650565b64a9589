"""The provider registry's values and how they shape engine inputs, without servers."""

from __future__ import annotations

from acsp.v1 import scheduler_pb2
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from scheduler.service.engine_adapter import EngineAdapter, job_to_engine
from scheduler.service.fleet import AcceleratorView, NodeView
from scheduler.service.model import Job, JobSpec, new_job_id
from scheduler.service.pledges import PledgeRecord, RecallRecord
from scheduler.service.providers import (
    ProviderDirectory,
    ProviderRecord,
    RegionRecord,
    provider_from_proto,
    provider_to_proto,
)

NOW = 1_800_000_000.0
MODEL = "A100-SXM4-80GB"


def region(region_id: str, jurisdiction: str = "") -> scheduler_pb2.Region:
    return scheduler_pb2.Region(region_id=region_id, jurisdiction=jurisdiction)


def fields_of(msg: scheduler_pb2.Provider) -> set[str]:
    return {v.field for v in provider_from_proto(msg)[1]}


def test_valid_provider_converts_with_defaults() -> None:
    msg = scheduler_pb2.Provider(
        provider_id="alibaba",
        regions=[region("hz-a", "CN"), scheduler_pb2.Region(region_id="hz-b", display_name="B")],
        allow_cross_provider_gangs=True,
    )
    record, violations = provider_from_proto(msg)
    assert violations == []
    assert record.display_name == "alibaba"
    assert record.regions == (RegionRecord("hz-a", "hz-a", "CN"), RegionRecord("hz-b", "B", ""))
    assert record.allow_cross_provider_gangs
    assert provider_to_proto(record).regions[0].jurisdiction == "CN"


def test_each_invalid_provider_field_is_named() -> None:
    cases = {
        "provider.provider_id": scheduler_pb2.Provider(provider_id="a.b"),
        "provider.display_name": scheduler_pb2.Provider(provider_id="p", display_name="x" * 129),
        "provider.regions[0].region_id": scheduler_pb2.Provider(
            provider_id="p", regions=[region("")]
        ),
        "provider.regions[1].region_id": scheduler_pb2.Provider(
            provider_id="p", regions=[region("r"), region("r")]
        ),
        "provider.regions[0].jurisdiction": scheduler_pb2.Provider(
            provider_id="p", regions=[region("r", "eu")]
        ),
        "provider.regions[0].display_name": scheduler_pb2.Provider(
            provider_id="p", regions=[scheduler_pb2.Region(region_id="r", display_name="a\tb")]
        ),
    }
    for field, msg in cases.items():
        assert fields_of(msg) == {field}, field


def test_provider_id_with_trailing_newline_is_rejected() -> None:
    violations = provider_from_proto(scheduler_pb2.Provider(provider_id="p\n"))[1]
    assert [v.field for v in violations] == ["provider.provider_id"]
    assert "letters, digits" in violations[0].reason


def test_empty_provider_id_names_the_fix() -> None:
    violations = provider_from_proto(scheduler_pb2.Provider())[1]
    assert [v.field for v in violations] == ["provider.provider_id"]
    assert "letters, digits" in violations[0].reason


def test_digest_differs_when_registration_differs() -> None:
    first = ProviderRecord("p", "P", (RegionRecord("r", "r", "EU"),))
    assert first.digest() == ProviderRecord("p", "P", (RegionRecord("r", "r", "EU"),)).digest()
    assert first.digest() != ProviderRecord("p", "P", (RegionRecord("r", "r", "CN"),)).digest()


def directory() -> ProviderDirectory:
    return ProviderDirectory(
        [
            ProviderRecord("eu", "EU cloud", (RegionRecord("fra", "", "EU"),), revision=1),
            ProviderRecord(
                "cn", "CN cloud", (RegionRecord("hz", "", "CN"), RegionRecord("sh", "", "CN"))
            ),
        ]
    )


def test_jurisdiction_resolves_to_its_regions() -> None:
    registry = directory()
    assert registry.jurisdictions == {"EU", "CN"}
    resolved = registry.resolve_regions(["jurisdiction:CN", "eu/fra"])
    assert resolved == {"cn/hz", "cn/sh", "eu/fra"}


def test_unknown_jurisdiction_resolves_to_nothing_it_matches() -> None:
    resolved = directory().resolve_regions(["jurisdiction:US"])
    assert resolved == {"jurisdiction:US"}


def test_older_revision_does_not_replace_newer() -> None:
    registry = directory()
    stale = ProviderRecord("eu", "EU cloud", (RegionRecord("fra", "", "CN"),), revision=0)
    assert registry.with_provider(stale).regions_in("EU") == {"eu/fra"}
    newer = ProviderRecord("eu", "EU cloud", (RegionRecord("fra", "", "CH"),), revision=2)
    updated = registry.with_provider(newer)
    assert updated.regions_in("EU") == frozenset()
    assert updated.regions_in("CH") == {"eu/fra"}


def make_job(**changes: object) -> Job:
    values: dict[str, object] = {
        "name": "train",
        "project_id": "proj",
        "command": ("true",),
        "task_count": 1,
        "accelerator_millis_per_task": 1000,
        "wall_time_s": 3600,
    }
    values.update(changes)
    spec = JobSpec(**values)  # type: ignore[arg-type]
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=NOW)


def make_adapter(registry: ProviderDirectory, *regions: tuple[str, str]) -> EngineAdapter:
    adapter = EngineAdapter(Engine(EngineConfig(half_life_s=3600.0)), registry)
    for provider, region_id in regions:
        accelerators = tuple(AcceleratorView(f"{provider}-GPU-{i}", MODEL) for i in range(8))
        assert adapter.add_node(NodeView(provider, region_id, "n1", accelerators))
    return adapter


def placed_regions(adapter: EngineAdapter, job: Job) -> set[str]:
    result = adapter.schedule(NOW + 1)
    tasks = dict(result.places).get(job.job_id, ())
    return {f"{t.provider}/{t.region}" for t in tasks}


def test_jurisdiction_job_runs_only_in_that_jurisdiction() -> None:
    adapter = make_adapter(directory(), ("eu", "fra"), ("cn", "hz"))
    job = make_job(allowed_regions=("jurisdiction:CN",), task_count=2)
    adapter.add_job(job)
    assert placed_regions(adapter, job) == {"cn/hz"}


def test_job_waits_until_its_jurisdiction_is_registered() -> None:
    adapter = make_adapter(directory(), ("eu", "fra"), ("no", "osl"))
    job = make_job(allowed_regions=("jurisdiction:NO",))
    adapter.add_job(job)
    assert placed_regions(adapter, job) == set()
    registered = ProviderRecord("no", "Norway", (RegionRecord("osl", "", "NO"),), revision=1)
    adapter.set_providers(adapter.providers.with_provider(registered))
    assert placed_regions(adapter, job) == {"no/osl"}


def gang_job() -> Job:
    # Two tasks of eight accelerators: more than either provider's one node holds.
    return make_job(
        task_count=2, accelerator_millis_per_task=8000, gang=True, allow_cross_provider=True
    )


def crossing(eu: bool, cn: bool) -> ProviderDirectory:
    return ProviderDirectory(
        [
            ProviderRecord("eu", "", (RegionRecord("fra"),), allow_cross_provider_gangs=eu),
            ProviderRecord("cn", "", (RegionRecord("hz"),), allow_cross_provider_gangs=cn),
        ]
    )


def test_gang_spans_providers_that_both_allow_it() -> None:
    adapter = make_adapter(crossing(True, True), ("eu", "fra"), ("cn", "hz"))
    job = gang_job()
    adapter.add_job(job)
    assert placed_regions(adapter, job) == {"eu/fra", "cn/hz"}


def test_gang_stays_within_provider_when_one_refuses() -> None:
    adapter = make_adapter(crossing(True, False), ("eu", "fra"), ("cn", "hz"))
    job = gang_job()
    adapter.add_job(job)
    assert placed_regions(adapter, job) == set()
    adapter.set_providers(crossing(True, True))
    assert placed_regions(adapter, job) == {"eu/fra", "cn/hz"}


def test_denied_gang_reason_names_provider() -> None:
    adapter = make_adapter(crossing(True, False), ("eu", "fra"), ("cn", "hz"))
    job = gang_job()
    adapter.add_job(job)

    assert adapter.engine.jobs[job.job_id].spec.cross_provider_denied_by == {"cn"}
    waiting = {job_id: message for job_id, _, message in adapter.schedule(NOW + 1).waiting}
    message = waiting[job.job_id]
    assert "the job allows cross-provider placement, but provider(s) cn do not allow" in message
    assert message.endswith("or those providers allow cross-provider gangs")


def test_allowed_gang_has_no_denial() -> None:
    adapter = make_adapter(crossing(True, True), ("eu", "fra"), ("cn", "hz"))
    job = gang_job()
    adapter.add_job(job)

    assert adapter.engine.jobs[job.job_id].spec.cross_provider_denied_by == frozenset()


def test_unregistered_provider_does_not_allow_spanning() -> None:
    registry = ProviderDirectory(
        [ProviderRecord("eu", "", (RegionRecord("fra"),), allow_cross_provider_gangs=True)]
    )
    spec = job_to_engine(gang_job(), registry, frozenset({"eu", "auto"}))
    assert not spec.allow_cross_provider
    assert spec.cross_provider_denied_by == {"auto"}
    only_eu = job_to_engine(gang_job(), registry, frozenset({"eu"}))
    assert only_eu.allow_cross_provider


def test_new_provider_node_withdraws_spanning_of_pending_gang() -> None:
    adapter = make_adapter(crossing(True, True), ("eu", "fra"))
    job = gang_job()
    adapter.add_job(job)
    assert adapter.engine.jobs[job.job_id].spec.allow_cross_provider
    accelerators = tuple(AcceleratorView(f"x-GPU-{i}", MODEL) for i in range(8))
    adapter.add_node(NodeView("unregistered", "r", "n1", accelerators))
    assert not adapter.engine.jobs[job.job_id].spec.allow_cross_provider


def test_job_without_registry_passes_constraints_through() -> None:
    job = make_job(allowed_regions=("jurisdiction:EU",), allow_cross_provider=True)
    spec = job_to_engine(job)
    assert spec.regions == {"jurisdiction:EU"}
    assert spec.allow_cross_provider


def test_known_regions_include_registered_and_fleet() -> None:
    # "cn/sh" has no node, as when every node of a region is down for maintenance.
    adapter = make_adapter(directory(), ("eu", "fra"), ("auto", "west"))
    assert adapter.known_regions == {"eu/fra", "cn/hz", "cn/sh", "auto/west"}
    registered = ProviderRecord("no", "Norway", (RegionRecord("osl", "", "NO"),), revision=1)
    adapter.set_providers(adapter.providers.with_provider(registered))
    assert "no/osl" in adapter.known_regions
    assert "auto/west" in adapter.known_regions


def test_recall_counts_pledge_not_yet_applied() -> None:
    adapter = make_adapter(directory(), ("eu", "fra"))
    pledge = PledgeRecord("pl-1", "eu", "fra", MODEL, 4, 4, NOW - 60, NOW + 86_400)
    recall = RecallRecord("rc-1", "pl-1", 4, NOW + 3600, NOW + 7200, "peak")

    # The loop has not applied the pledge yet: the engine learns it from the recall check.
    assert adapter.recall_frees(pledge, recall) == 4
