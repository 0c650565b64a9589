"""Accelerator health from readings and events: a pure state machine, no I/O.

Each rule maps one cause (an XID code, a counter, a level, a named fault) to a state, an action
and a way of clearing. ``docs/health.md`` lists the same table with the source of each rule; a
test keeps the two in step.

Every occurrence of a cause produces its own :class:`HealthEvent`. A condition clears, and a
``cleared`` event is produced, when its cause clears: a level reading returns to normal, an
event-type cause does not recur for ``clear_after_s``, or the volatile uncorrected ECC count
reads zero again after a GPU reset. Persistent conditions never clear by themselves: the agent
stores them in its state file and loads them after a restart, and only an operator (or the end
of a simulated fault) clears them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agents.model import (
    AcceleratorHealth,
    AcceleratorReading,
    DeviceEvent,
    DeviceEventKind,
    HealthAction,
    HealthEvent,
    HealthState,
)

NODE = ""
"""Key of conditions that concern the whole node rather than one accelerator."""

THERMAL_THROTTLE_MASK = 0x40 | 0x08
"""NVML ``HwThermalSlowdown`` (0x40) and ``HwSlowdown`` (0x08) clock throttle reasons."""


class Clearing(enum.StrEnum):
    WINDOW = "window"
    """Clears after ``clear_after_s`` without a new occurrence."""
    LEVEL = "level"
    """Clears when the reading (or the fault's end event) no longer shows it."""
    RESET = "reset"
    """Clears when the volatile uncorrected ECC count drops to zero, as a GPU reset makes it."""
    NEVER = "never"
    """Persists across agent restarts until an operator clears it."""


@dataclass(frozen=True, slots=True)
class Rule:
    cause: str
    state: HealthState
    action: HealthAction
    clearing: Clearing
    description: str

    @property
    def persistent(self) -> bool:
        return self.clearing is Clearing.NEVER


_OK, _DEGRADED, _FAILED = HealthState.OK, HealthState.DEGRADED, HealthState.FAILED
_REPORT, _DRAIN, _UNUSABLE = (
    HealthAction.REPORT,
    HealthAction.DRAIN_NODE,
    HealthAction.MARK_UNUSABLE,
)
_W, _L, _R, _N = Clearing.WINDOW, Clearing.LEVEL, Clearing.RESET, Clearing.NEVER


def _xid(
    code: int, state: HealthState, action: HealthAction, clearing: Clearing, text: str
) -> Rule:
    return Rule(f"xid:{code}", state, action, clearing, f"XID {code}: {text}")


# Immediate actions follow NVIDIA's Xid catalog for Ampere and newer GPUs (docs.nvidia.com,
# "Analyzing Xid Errors with the Xid Catalog"). RESTART_APP and IGNORE become a report.
# RESET_GPU drains the node, or marks the GPU unusable when memory contents are corrupt.
# RESTART_BM drains the node and keeps the GPU failed until an operator clears it.
XID_RULES: Mapping[int, Rule] = {
    13: _xid(13, _DEGRADED, _REPORT, _W, "graphics engine exception"),
    31: _xid(31, _DEGRADED, _REPORT, _W, "GPU memory page fault"),
    43: _xid(43, _DEGRADED, _REPORT, _W, "GPU stopped processing"),
    45: _xid(45, _OK, _REPORT, _W, "preemptive cleanup after an earlier error"),
    48: _xid(48, _FAILED, _UNUSABLE, _R, "double-bit ECC error"),
    61: _xid(61, _DEGRADED, _DRAIN, _W, "internal micro-controller breakpoint"),
    62: _xid(62, _DEGRADED, _DRAIN, _W, "internal micro-controller halt"),
    63: _xid(63, _DEGRADED, _REPORT, _W, "page retirement or row remapping recorded"),
    64: _xid(64, _FAILED, _UNUSABLE, _N, "page retirement or row remapping failed"),
    74: _xid(74, _DEGRADED, _DRAIN, _W, "NVLink error"),
    79: _xid(79, _FAILED, _DRAIN, _N, "GPU has fallen off the bus"),
    92: _xid(92, _DEGRADED, _REPORT, _W, "high single-bit ECC error rate"),
    94: _xid(94, _DEGRADED, _REPORT, _W, "contained ECC error"),
    95: _xid(95, _FAILED, _UNUSABLE, _R, "uncontained ECC error"),
    119: _xid(119, _DEGRADED, _DRAIN, _W, "GSP RPC timeout"),
    120: _xid(120, _DEGRADED, _DRAIN, _W, "GSP error"),
    140: _xid(140, _FAILED, _UNUSABLE, _R, "unrecovered ECC error"),
}
"""Known XID codes; any other code follows :func:`unknown_xid_rule`."""


def unknown_xid_rule(code: int) -> Rule:
    """Return the rule for an XID that is not in :data:`XID_RULES`: reported, never dropped."""
    return _xid(code, _DEGRADED, _REPORT, _W, "not in the agent's XID table")


READING_RULES: Mapping[str, Rule] = {
    rule.cause: rule
    for rule in (
        Rule(
            "fallen_off_bus", _FAILED, _DRAIN, _N, "GPU has fallen off the bus (NVML GPU_IS_LOST)"
        ),
        Rule("ecc_dbe", _FAILED, _UNUSABLE, _R, "uncorrected (double-bit) ECC error"),
        Rule(
            "ecc_dbe_over_threshold",
            _FAILED,
            _UNUSABLE,
            _N,
            "lifetime uncorrected ECC errors at or over the threshold",
        ),
        Rule("row_remap_failure", _FAILED, _UNUSABLE, _N, "row remapping failed"),
        Rule("row_remap_pending", _DEGRADED, _DRAIN, _L, "row remapping pending a GPU reset"),
        Rule("retired_pages_pending", _DEGRADED, _DRAIN, _L, "page retirement pending a reset"),
        Rule("thermal", _DEGRADED, _REPORT, _L, "thermal slowdown"),
        Rule("nvlink_errors", _OK, _REPORT, _W, "NVLink error counters increased"),
    )
}
"""Causes read from counters and gauges."""

FAULT_RULES: Mapping[str, Rule] = {
    rule.cause: rule
    for rule in (
        Rule("fault_gpu_dbe_over_threshold", _FAILED, _UNUSABLE, _N, "double-bit ECC > threshold"),
        Rule("fault_gpu_lost", _FAILED, _DRAIN, _N, "GPU lost"),
        Rule("fault_gpu_not_found", _FAILED, _DRAIN, _N, "GPU device not found"),
        Rule("fault_gpu_xid", _DEGRADED, _DRAIN, _L, "GPU XID error"),
        Rule("fault_gpu_unknown_error", _DEGRADED, _DRAIN, _L, "GPU device error"),
        Rule("fault_gpu_pci_link", _DEGRADED, _DRAIN, _L, "GPU PCIe link width low"),
        Rule("fault_gpu_smi_timeout", _DEGRADED, _DRAIN, _L, "GPU management query timed out"),
        Rule("fault_gpu_temperature", _DEGRADED, _REPORT, _L, "GPU temperature high"),
        Rule("fault_gpu_sbe_over_threshold", _DEGRADED, _REPORT, _L, "single-bit ECC > threshold"),
        Rule("fault_gpu_p2p_bandwidth", _DEGRADED, _DRAIN, _L, "GPU peer-to-peer bandwidth low"),
        Rule("fault_gpu_sdc", _FAILED, _UNUSABLE, _N, "silent data corruption"),
        Rule("fault_node_hardware", _DEGRADED, _DRAIN, _L, "node hardware failure"),
        Rule("fault_node_software", _DEGRADED, _DRAIN, _L, "node software failure"),
        Rule("fault_node_other", _DEGRADED, _REPORT, _L, "node failure of unknown cause"),
    )
}
"""Named faults, as the simulated backend replays them from a fault trace."""


def unknown_fault_rule(cause: str) -> Rule:
    return Rule(cause, _DEGRADED, _REPORT, _L, f"fault {cause!r} not in the agent's table")


@dataclass(frozen=True, slots=True)
class HealthSettings:
    clear_after_s: float = 300.0
    """Seconds without recurrence after which an event-type condition clears."""
    double_bit_threshold: int = 10
    """Lifetime uncorrected ECC errors at which a GPU is marked unusable for good.

    NOTE: an operator choice, not a vendor number; NVIDIA retires or remaps memory per error.
    """


@dataclass(slots=True)
class _Condition:
    rule: Rule
    uuid: str
    message: str
    first_time: float
    last_time: float
    code: int = 0


class HealthTracker:
    """Active health conditions of one node's accelerators."""

    def __init__(
        self,
        uuids: Iterable[str],
        settings: HealthSettings = HealthSettings(),
        persistent: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._uuids = list(uuids)
        self._settings = settings
        self._conditions: dict[tuple[str, str], _Condition] = {}
        self._previous: dict[str, AcceleratorReading] = {}
        for uuid, causes in (persistent or {}).items():
            for cause in causes:
                rule = _rule_for_cause(cause)
                self._conditions[(uuid, cause)] = _Condition(
                    rule, uuid, f"{rule.description} (persisted)", 0.0, 0.0
                )

    # Inputs ----------------------------------------------------------------------------------

    def observe(
        self,
        now: float,
        readings: Sequence[AcceleratorReading] = (),
        events: Sequence[DeviceEvent] = (),
    ) -> list[HealthEvent]:
        """Apply one round of readings and events at ``now``; return the resulting events."""
        out: list[HealthEvent] = []
        for event in events:
            out.extend(self._apply_event(event))
        for reading in readings:
            # The same immutable reading as last time (a simulated idle accelerator) can
            # neither raise nor clear a level or counter condition.
            if self._previous.get(reading.uuid) is reading:
                continue
            out.extend(self._apply_reading(now, reading))
            self._previous[reading.uuid] = reading
        out.extend(self._expire(now))
        return out

    def clear(self, now: float, uuid: str, cause: str | None = None) -> list[HealthEvent]:
        """Clear an accelerator's conditions (or one cause) on an operator's request."""
        keys = [k for k in self._conditions if k[0] == uuid and (cause is None or k[1] == cause)]
        return [self._clear(now, key, "cleared by an operator") for key in keys]

    # Outputs ---------------------------------------------------------------------------------

    def health(self) -> list[AcceleratorHealth]:
        """Return every accelerator's state and the reasons for it, in inventory order."""
        result = []
        for uuid in self._uuids:
            active = [c for (u, _), c in self._conditions.items() if u == uuid]
            state = max((c.rule.state for c in active), default=HealthState.OK)
            reasons = tuple(sorted(c.message for c in active if c.rule.state > HealthState.OK))
            result.append(AcceleratorHealth(uuid, state, reasons))
        return result

    def node_conditions(self) -> list[str]:
        return sorted(c.message for (u, _), c in self._conditions.items() if u == NODE)

    def drain_requested(self) -> bool:
        """Return True while any active condition requests draining the node."""
        return any(c.rule.action is HealthAction.DRAIN_NODE for c in self._conditions.values())

    def persistent_conditions(self) -> dict[str, list[str]]:
        """Return the causes to store in the state file, keyed by accelerator UUID."""
        result: dict[str, list[str]] = {}
        for (uuid, cause), condition in sorted(self._conditions.items()):
            if condition.rule.persistent:
                result.setdefault(uuid, []).append(cause)
        return result

    # Internals -------------------------------------------------------------------------------

    def _apply_event(self, event: DeviceEvent) -> list[HealthEvent]:
        if event.kind is DeviceEventKind.XID:
            rule = XID_RULES.get(event.code) or unknown_xid_rule(event.code)
            return [self._occur(event.time, event.uuid, rule, rule.description, event.code)]
        rule = FAULT_RULES.get(event.detail) or unknown_fault_rule(event.detail)
        if event.kind is DeviceEventKind.FAULT_START:
            return [self._occur(event.time, event.uuid, rule, rule.description)]
        key = (event.uuid, rule.cause)
        if key in self._conditions:
            return [self._clear(event.time, key, "fault ended")]
        return []

    def _apply_reading(self, now: float, reading: AcceleratorReading) -> list[HealthEvent]:
        uuid = reading.uuid
        out: list[HealthEvent] = []
        levels = _levels(reading)
        for cause in (
            "fallen_off_bus",
            "row_remap_failure",
            "row_remap_pending",
            "retired_pages_pending",
            "thermal",
        ):
            key = (uuid, cause)
            if levels.get(cause):
                if key not in self._conditions:
                    rule = READING_RULES[cause]
                    out.append(self._occur(now, uuid, rule, rule.description))
            elif key in self._conditions and not READING_RULES[cause].persistent:
                out.append(self._clear(now, key, "reading back to normal"))
        if reading.lost:
            return out
        out.extend(self._apply_counters(now, reading, self._previous.get(uuid)))
        return out

    def _apply_counters(
        self, now: float, reading: AcceleratorReading, previous: AcceleratorReading | None
    ) -> list[HealthEvent]:
        out = self._apply_volatile_ecc(now, reading, previous)
        out.extend(self._apply_lifetime_ecc(now, reading))
        out.extend(self._apply_nvlink(now, reading, previous))
        return out

    def _apply_volatile_ecc(
        self, now: float, reading: AcceleratorReading, previous: AcceleratorReading | None
    ) -> list[HealthEvent]:
        out = []
        double = reading.ecc.volatile_double
        before = previous.ecc.volatile_double if previous else None
        if double is not None and double > (before or 0):
            rule = READING_RULES["ecc_dbe"]
            message = f"{rule.description}: volatile count {double}"
            out.append(self._occur(now, reading.uuid, rule, message))

        # A drop of the volatile count to zero means the GPU was reset or the driver reloaded.
        # Requiring the drop keeps an XID 48 that races ahead of its counter from clearing.
        if double == 0 and before:
            for key, condition in list(self._conditions.items()):
                if key[0] == reading.uuid and condition.rule.clearing is Clearing.RESET:
                    out.append(self._clear(now, key, "volatile ECC count reset"))
        return out

    def _apply_lifetime_ecc(self, now: float, reading: AcceleratorReading) -> list[HealthEvent]:
        lifetime = reading.ecc.aggregate_double
        threshold = self._settings.double_bit_threshold
        if lifetime is None or lifetime < threshold:
            return []
        if (reading.uuid, "ecc_dbe_over_threshold") in self._conditions:
            return []
        rule = READING_RULES["ecc_dbe_over_threshold"]
        message = f"{rule.description} ({lifetime} >= {threshold})"
        return [self._occur(now, reading.uuid, rule, message)]

    def _apply_nvlink(
        self, now: float, reading: AcceleratorReading, previous: AcceleratorReading | None
    ) -> list[HealthEvent]:
        links = reading.nvlink_errors
        links_before = previous.nvlink_errors if previous else None
        if links is None or links_before is None or links <= links_before:
            return []
        rule = READING_RULES["nvlink_errors"]
        message = f"{rule.description} by {links - links_before}"
        return [self._occur(now, reading.uuid, rule, message)]

    def _occur(self, now: float, uuid: str, rule: Rule, message: str, code: int = 0) -> HealthEvent:
        key = (uuid, rule.cause)
        condition = self._conditions.get(key)
        if condition is None:
            self._conditions[key] = _Condition(rule, uuid, message, now, now, code)
        else:
            condition.last_time = now
            condition.message = message
        return HealthEvent(
            uuid=uuid,
            cause=rule.cause,
            state=rule.state,
            action=rule.action,
            message=message,
            time=now,
            persistent=rule.persistent,
            code=code,
        )

    def _clear(self, now: float, key: tuple[str, str], why: str) -> HealthEvent:
        condition = self._conditions.pop(key)
        return HealthEvent(
            uuid=condition.uuid,
            cause=condition.rule.cause,
            state=HealthState.OK,
            action=HealthAction.REPORT,
            message=f"{condition.rule.description}: {why}",
            time=now,
            cleared=True,
            persistent=condition.rule.persistent,
            code=condition.code,
        )

    def _expire(self, now: float) -> list[HealthEvent]:
        limit = self._settings.clear_after_s
        expired = [
            key
            for key, c in self._conditions.items()
            if c.rule.clearing is Clearing.WINDOW and now - c.last_time >= limit
        ]
        return [self._clear(now, key, f"no recurrence for {limit:g} s") for key in expired]


def _levels(reading: AcceleratorReading) -> dict[str, bool]:
    throttled = bool((reading.throttle_reasons or 0) & THERMAL_THROTTLE_MASK)
    hot = (
        reading.temperature_c is not None
        and reading.slowdown_temperature_c is not None
        and reading.temperature_c >= reading.slowdown_temperature_c
    )
    return {
        "fallen_off_bus": reading.lost,
        "row_remap_failure": bool(reading.remap_failure),
        "row_remap_pending": bool(reading.remap_pending),
        "retired_pages_pending": bool(reading.retired_pages_pending),
        "thermal": throttled or hot,
    }


def _rule_for_cause(cause: str) -> Rule:
    if cause.startswith("xid:"):
        code = int(cause.removeprefix("xid:"))
        return XID_RULES.get(code) or unknown_xid_rule(code)
    return READING_RULES.get(cause) or FAULT_RULES.get(cause) or unknown_fault_rule(cause)
