"""The NVML backend driven through a fake at the pynvml function boundary."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest

from acsp.catalog import MODELS
from acsp.v1 import scheduler_pb2
from agents.backends.base import BackendError
from agents.backends.nvml import NvmlBackend, catalog_model
from agents.model import DeviceEventKind, HealthState
from tests.agent.fake_nvml import FakeGpu, FakeMig, FakeNvml
from tests.agent.helpers import ManualClock, make_node, published_health


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml.h100_node(8)
    nvml.install(monkeypatch)
    return nvml


def test_discovery_keys_accelerators_by_uuid_and_pci(fake: FakeNvml) -> None:
    inventory = NvmlBackend().discover()
    assert [a.uuid for a in inventory.accelerators] == [g.uuid for g in fake.gpus]
    assert [a.pci_bus_id for a in inventory.accelerators] == [g.pci_bus_id for g in fake.gpus]
    assert inventory.driver_version == "550.54.15"
    assert inventory.software_version == "12.4"
    assert inventory.accelerators[0].model == "H100-SXM5-80GB"
    assert inventory.accelerators[0].memory_bytes == 81_559 << 20
    assert fake.registered == set(range(8))


def test_discovery_maps_h200_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # 143,771 MiB is what NVML reports for the 141 GB of HBM3e of an H200.
    memory = 143_771 << 20
    names = ["NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB"]
    gpus = [
        FakeGpu(i, f"GPU-{i:08x}-1111-2222-3333-{i:012x}", name=name, memory_total=memory)
        for i, name in enumerate(names)
    ]
    FakeNvml(gpus).install(monkeypatch)
    models = [a.model for a in NvmlBackend().discover().accelerators]
    assert models[0] == "H200-SXM5-141GB"
    # Neither the slower NVL card nor the Grace Hopper part is priced as an H200 SXM.
    assert models[1] == "NVIDIA H200 NVL"
    assert models[2] == "NVIDIA GH200 480GB"


@pytest.mark.parametrize("product", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_mapped_models_are_in_catalog(product: str) -> None:
    catalog = {model.name: model for model in MODELS}
    model = catalog.get(catalog_model(product))
    assert model is not None
    assert model.vendor == "nvidia"


def test_h200_fits_in_reported_memory() -> None:
    catalog = {model.name: model for model in MODELS}
    assert catalog["H200-SXM5-141GB"].memory_gib << 30 <= 143_771 << 20


def test_reading_has_every_metric(fake: FakeNvml) -> None:
    fake.gpus[0].ecc = {(0, 0): 3, (0, 1): 12, (1, 0): 0, (1, 1): 1}
    fake.gpus[0].nvlink_errors_per_counter = 2
    backend = NvmlBackend()
    backend.discover()
    reading = backend.read()[0]
    assert reading.utilization_percent == 87.0
    assert reading.memory_used_bytes == 40_000 << 20
    assert reading.temperature_c == 61
    assert reading.power_mw == 512_345
    assert reading.throttle_reasons == 0
    assert reading.ecc.volatile_single == 3
    assert reading.ecc.aggregate_single == 12
    assert reading.ecc.volatile_double == 0
    assert reading.ecc.aggregate_double == 1
    assert reading.remap_pending is False
    assert reading.remap_failure is False
    assert reading.retired_pages is None
    assert "retired_pages" in reading.unsupported
    # 18 links, 4 counters each, 2 errors per counter.
    assert reading.nvlink_errors == 18 * 4 * 2


async def test_not_supported_ecc_and_power_leave_gpu_ok(fake: FakeNvml, tmp_path: Path) -> None:
    fake.gpus[3].unsupported = {"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetPowerUsage"}
    clock = ManualClock()
    node, _outbox, _spool = make_node(NvmlBackend(clock), tmp_path, clock)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    readings = node.backend.read()
    third = readings[3]
    assert third.ecc.volatile_double is None
    assert third.ecc.aggregate_single is None
    assert third.power_mw is None
    assert {"ecc", "power"} <= third.unsupported
    assert third.utilization_percent == 87.0
    assert third.temperature_c == 61
    assert third.memory_used_bytes == 40_000 << 20
    assert readings[2].power_mw == 512_345
    await node.sample()
    states = {h.uuid: h.state for h in node.accelerator_health()}
    assert states[fake.gpus[3].uuid] is HealthState.OK
    assert set(states.values()) == {HealthState.OK}


async def test_lost_gpu_fails_alone_and_node_keeps_reporting(
    fake: FakeNvml, tmp_path: Path
) -> None:
    clock = ManualClock()
    node, outbox, spool = make_node(NvmlBackend(clock), tmp_path, clock)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    fake.gpus[1].lost = True
    await node.sample()
    health = {h.uuid: h.state for h in node.accelerator_health()}
    assert health[fake.gpus[1].uuid] is HealthState.FAILED
    healthy = [uuid for uuid, state in health.items() if state is HealthState.OK]
    assert len(healthy) == 7
    assert fake.gpus[1].uuid not in healthy
    events = published_health(outbox, spool)
    assert [e.accelerator_id for e in events] == [fake.gpus[1].uuid]
    assert events[0].condition == "fallen_off_bus"
    assert events[0].health == scheduler_pb2.HEALTH_STATE_FAILED
    clock.advance(5)
    await node.sample()
    heartbeat = node.heartbeat_payload()
    assert heartbeat
    assert node.reading_gaps == 0


async def test_reset_invalidating_handles_leaves_one_gap(
    fake: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    node, _outbox, _spool = make_node(NvmlBackend(clock), tmp_path, clock)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    fake.reset_all()
    with caplog.at_level(logging.WARNING):
        await node.sample()
    assert node.reading_gaps == 1
    assert fake.init_count == 2
    gap_logs = [r for r in caplog.records if "reading skipped" in r.getMessage()]
    assert len(gap_logs) == 1
    readings = node.backend.read()
    assert len(readings) == 8
    assert not any(r.lost for r in readings)
    await node.sample()
    assert node.reading_gaps == 1
    assert {h.state for h in node.accelerator_health()} == {HealthState.OK}


def test_backend_raises_once_then_reads_normally(fake: FakeNvml) -> None:
    backend = NvmlBackend()
    backend.discover()
    fake.reset_all()
    with pytest.raises(BackendError):
        backend.read()
    assert [r.uuid for r in backend.read()] == [g.uuid for g in fake.gpus]


async def test_two_xid_31_give_two_events_then_clear(fake: FakeNvml, tmp_path: Path) -> None:
    clock = ManualClock()
    node, outbox, spool = make_node(NvmlBackend(clock), tmp_path, clock, clear_after_s=60)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    fake.xid(2, 31)
    fake.xid(2, 31)
    await node.sample()
    target = fake.gpus[2].uuid
    events = published_health(outbox, spool)
    assert [(e.accelerator_id, e.condition, e.xid, e.cleared) for e in events] == [
        (target, "xid", 31, False),
        (target, "xid", 31, False),
    ]
    assert len({e.event_id for e in events}) == 2
    states = {h.uuid: h.state for h in node.accelerator_health()}
    assert states[target] is HealthState.DEGRADED
    clock.advance(61)
    await node.sample()
    events = published_health(outbox, spool)
    assert events[-1].cleared
    assert events[-1].xid == 31
    states = {h.uuid: h.state for h in node.accelerator_health()}
    assert states[target] is HealthState.OK


async def test_unknown_xid_is_reported(fake: FakeNvml, tmp_path: Path) -> None:
    clock = ManualClock()
    node, outbox, spool = make_node(NvmlBackend(clock), tmp_path, clock)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    fake.xid(5, 4242)
    await node.sample()
    events = published_health(outbox, spool)
    assert len(events) == 1
    assert events[0].xid == 4242
    assert events[0].accelerator_id == fake.gpus[5].uuid
    assert "not in the agent's XID table" in events[0].message


async def test_xid_79_survives_agent_restart(fake: FakeNvml, tmp_path: Path) -> None:
    clock = ManualClock()
    node, _outbox, spool = make_node(NvmlBackend(clock), tmp_path, clock)
    async with asyncio.TaskGroup() as group:
        await node.start(group)
    fake.xid(4, 79)
    await node.sample()
    target = fake.gpus[4].uuid
    assert {h.uuid: h.state for h in node.accelerator_health()}[target] is HealthState.FAILED
    spool.close()
    # A new agent process: new NVML session, new state store read from the same file.
    fake.nvmlShutdown()
    clock.advance(3600)
    restarted, _outbox2, _spool2 = make_node(NvmlBackend(clock), tmp_path, clock, boot_id="b2")
    async with asyncio.TaskGroup() as group:
        await restarted.start(group)
    await restarted.sample()
    health = {h.uuid: h for h in restarted.accelerator_health()}
    assert health[target].state is HealthState.FAILED
    assert any("XID 79" in reason for reason in health[target].reasons)
    others = [h.state for uuid, h in health.items() if uuid != target]
    assert set(others) == {HealthState.OK}


def test_xid_events_name_their_gpu(fake: FakeNvml) -> None:
    backend = NvmlBackend(lambda: 5.0)
    backend.discover()
    fake.xid(7, 48)
    events = backend.poll_events()
    assert len(events) == 1
    assert events[0].kind is DeviceEventKind.XID
    assert events[0].uuid == fake.gpus[7].uuid
    assert events[0].code == 48
    assert events[0].time == 5.0
    assert backend.poll_events() == []


def test_mig_instances_are_fractional_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(0, "GPU-mig-parent")
    gpu.mig_instances = [FakeMig("MIG-aaaa"), FakeMig("MIG-bbbb", slices=3)]
    fake = FakeNvml([gpu])
    fake.install(monkeypatch)
    backend = NvmlBackend()
    inventory = backend.discover()
    by_uuid = {a.uuid: a for a in inventory.accelerators}
    assert set(by_uuid) == {"GPU-mig-parent", "MIG-aaaa", "MIG-bbbb"}
    assert by_uuid["MIG-aaaa"].parent_uuid == "GPU-mig-parent"
    assert by_uuid["MIG-aaaa"].share_milli == 142
    assert by_uuid["MIG-bbbb"].share_milli == 428
    assert by_uuid["MIG-aaaa"].profile == "1g.10gb"
    readings = {r.uuid: r for r in backend.read()}
    assert readings["MIG-aaaa"].utilization_percent is None
    assert "utilization" in readings["MIG-aaaa"].unsupported
    assert readings["MIG-aaaa"].memory_used_bytes == 1_200 << 20
    assert backend.visible_devices_env(["MIG-aaaa"]) == {"CUDA_VISIBLE_DEVICES": "MIG-aaaa"}


def _failing(code: int) -> Callable[..., Any]:
    def call(*_args: Any) -> Any:
        raise pynvml.NVMLError(code)

    return call


def test_unreadable_cuda_version_keeps_gpus(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pynvml, "nvmlSystemGetCudaDriverVersion", _failing(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    )
    inventory = NvmlBackend().discover()
    assert len(inventory.accelerators) == 8
    assert inventory.software_version == ""
    assert inventory.driver_version == "550.54.15"


def test_close_shuts_down_when_free_fails(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = NvmlBackend()
    backend.discover()
    monkeypatch.setattr(pynvml, "nvmlEventSetFree", _failing(pynvml.NVML_ERROR_UNKNOWN))
    backend.close()
    assert not fake.initialised


@pytest.mark.parametrize(
    ("function", "code"),
    [
        ("nvmlDeviceGetNvLinkErrorCounter", pynvml.NVML_ERROR_UNKNOWN),
        ("nvmlDeviceGetNvLinkErrorCounter", pynvml.NVML_ERROR_NO_PERMISSION),
        ("nvmlDeviceGetNvLinkState", pynvml.NVML_ERROR_UNKNOWN),
    ],
)
def test_failed_nvlink_read_is_not_a_drop(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, function: str, code: int
) -> None:
    fake.gpus[0].nvlink_errors_per_counter = 2
    backend = NvmlBackend()
    backend.discover()
    assert backend.read()[0].nvlink_errors == 18 * 4 * 2
    original = getattr(fake, function)

    def fail_on_link_5(handle: Any, link: int, *args: Any) -> Any:
        if link == 5:
            raise pynvml.NVMLError(code)
        return original(handle, link, *args)

    monkeypatch.setattr(pynvml, function, fail_on_link_5)
    reading = backend.read()[0]
    assert reading.nvlink_errors is None
    assert "nvlink_errors" not in reading.unsupported
    assert reading.temperature_c == 61
