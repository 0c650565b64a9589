"""Health rules as a pure state machine, and the documented table that matches them."""

from __future__ import annotations

import re
from pathlib import Path

from agents.health import FAULT_RULES, READING_RULES, XID_RULES, HealthSettings, HealthTracker
from agents.model import (
    AcceleratorReading,
    DeviceEvent,
    DeviceEventKind,
    EccCounts,
    HealthAction,
    HealthState,
)

GPU = "GPU-0"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "health.md"


def tracker(**settings: float) -> HealthTracker:
    return HealthTracker([GPU, "GPU-1"], HealthSettings(**settings))  # type: ignore[arg-type]


def state_of(health: HealthTracker, uuid: str = GPU) -> HealthState:
    return {h.uuid: h.state for h in health.health()}[uuid]


def xid(code: int, time: float) -> DeviceEvent:
    return DeviceEvent(DeviceEventKind.XID, GPU, time, code=code)


def test_each_xid_occurrence_is_its_own_event() -> None:
    health = tracker(clear_after_s=100)
    events = health.observe(10.0, events=[xid(31, 10.0), xid(31, 11.0)])
    assert len(events) == 2
    assert [e.cause for e in events] == ["xid:31", "xid:31"]
    assert state_of(health) is HealthState.DEGRADED
    assert health.observe(105.0) == []
    cleared = health.observe(111.0)
    assert [(e.cause, e.cleared) for e in cleared] == [("xid:31", True)]
    assert state_of(health) is HealthState.OK


def test_thermal_clears_when_reading_recovers() -> None:
    health = tracker()
    hot = AcceleratorReading(GPU, temperature_c=93, slowdown_temperature_c=92)
    assert [e.cause for e in health.observe(1.0, [hot])] == ["thermal"]
    assert health.observe(2.0, [hot]) == []
    cool = AcceleratorReading(GPU, temperature_c=70, slowdown_temperature_c=92)
    cleared = health.observe(3.0, [cool])
    assert [(e.cause, e.cleared) for e in cleared] == [("thermal", True)]
    assert state_of(health) is HealthState.OK


def test_throttle_bit_means_thermal() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, throttle_reasons=0x40)])
    assert state_of(health) is HealthState.DEGRADED


def test_double_bit_ecc_fails_until_reset() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 0))])
    events = health.observe(2.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 1, 0, 1))])
    assert [e.cause for e in events] == ["ecc_dbe"]
    assert events[0].action is HealthAction.MARK_UNUSABLE
    assert state_of(health) is HealthState.FAILED
    assert health.observe(3.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 1, 0, 1))]) == []
    cleared = health.observe(4.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 1))])
    assert [e.cleared for e in cleared] == [True]
    assert state_of(health) is HealthState.OK


def test_lifetime_double_bit_over_threshold_persists() -> None:
    health = tracker(double_bit_threshold=3)
    reading = AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 3))
    events = health.observe(1.0, [reading])
    assert [e.cause for e in events] == ["ecc_dbe_over_threshold"]
    assert events[0].persistent
    assert health.persistent_conditions() == {GPU: ["ecc_dbe_over_threshold"]}


def test_row_remap_failure_and_pending() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, remap_pending=True)])
    assert state_of(health) is HealthState.DEGRADED
    assert health.drain_requested()
    health.observe(2.0, [AcceleratorReading(GPU, remap_pending=False, remap_failure=True)])
    assert state_of(health) is HealthState.FAILED
    assert health.persistent_conditions() == {GPU: ["row_remap_failure"]}


def test_persistent_condition_reloads_and_operator_clears() -> None:
    first = tracker()
    first.observe(1.0, events=[xid(79, 1.0)])
    stored = first.persistent_conditions()
    assert stored == {GPU: ["xid:79"]}
    second = HealthTracker([GPU, "GPU-1"], persistent=stored)
    assert state_of(second) is HealthState.FAILED
    assert second.observe(10_000.0) == []
    assert state_of(second) is HealthState.FAILED
    cleared = second.clear(10_001.0, GPU)
    assert [e.cleared for e in cleared] == [True]
    assert state_of(second) is HealthState.OK


def test_fallen_off_bus_does_not_clear_when_reading_returns() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, lost=True)])
    assert health.observe(2.0, [AcceleratorReading(GPU)]) == []
    assert state_of(health) is HealthState.FAILED


def test_unknown_xid_and_unknown_fault_are_reported() -> None:
    health = tracker()
    events = health.observe(
        1.0,
        events=[
            xid(1234, 1.0),
            DeviceEvent(DeviceEventKind.FAULT_START, "", 1.0, detail="fault_mystery"),
        ],
    )
    assert [e.cause for e in events] == ["xid:1234", "fault_mystery"]
    assert health.node_conditions()


def test_fault_start_and_end_from_trace() -> None:
    health = tracker()
    start = DeviceEvent(DeviceEventKind.FAULT_START, GPU, 1.0, detail="fault_gpu_lost")
    end = DeviceEvent(DeviceEventKind.FAULT_END, GPU, 9.0, detail="fault_gpu_lost")
    health.observe(1.0, events=[start])
    assert state_of(health) is HealthState.FAILED
    health.observe(9.0, events=[end])
    assert state_of(health) is HealthState.OK


def test_nvlink_error_increase_is_reported_without_degrading() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, nvlink_errors=5)])
    events = health.observe(2.0, [AcceleratorReading(GPU, nvlink_errors=9)])
    assert [e.cause for e in events] == ["nvlink_errors"]
    assert state_of(health) is HealthState.OK


def test_documented_table_lists_every_rule() -> None:
    text = DOCS.read_text(encoding="utf-8")
    documented_xids = {int(code) for code in re.findall(r"^\| XID (\d+) \|", text, re.MULTILINE)}
    assert documented_xids == set(XID_RULES)
    for cause in [*READING_RULES, *FAULT_RULES]:
        assert f"`{cause}`" in text, cause


def test_xid_48_not_cleared_by_stale_zero_count() -> None:
    health = tracker()
    health.observe(1.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 0))])
    health.observe(2.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 0))], [xid(48, 2.0)])
    assert state_of(health) is HealthState.FAILED
    health.observe(3.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 1, 0, 1))])
    health.observe(4.0, [AcceleratorReading(GPU, ecc=EccCounts(0, 0, 0, 1))])
    assert state_of(health) is HealthState.OK
