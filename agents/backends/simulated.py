"""A simulated node: accelerators from a fleet file, faults and utilization from traces.

One process runs thousands of these (see ``agents.fleet_agent``), each behind the same
:class:`Backend` interface and the same NATS protocol as an NVML node.

Time: readings and reports carry real wall-clock time, so that metering charges what really
elapsed. The speed factor compresses only what is replayed: a played task's run time
(``runner``), the fault trace and the utilization trace advance ``speed`` times faster.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence

from agents.backends.base import Backend
from agents.backends.fleet import FaultInterval, FleetNode, UtilizationTrace
from agents.model import (
    AcceleratorInfo,
    AcceleratorReading,
    DeviceEvent,
    DeviceEventKind,
    EccCounts,
    NodeInventory,
)

SIMULATED_DRIVER = "550.54.15"
SIMULATED_CUDA = "12.4"
_NAMESPACE = uuid_module.UUID("5f0c6c1e-2d7b-4a8e-9d3f-1c4b7a2e9f60")
_IDLE_POWER_MW = 60_000
_BUSY_POWER_MW = 350_000
_NO_ECC_ERRORS = EccCounts(0, 0, 0, 0)
_UNSUPPORTED = frozenset({"retired_pages"})


class SimulatedBackend(Backend):
    """The accelerators of one simulated node."""

    vendor = "simulated"
    visible_devices_variable = "CUDA_VISIBLE_DEVICES"

    def __init__(
        self,
        spec: FleetNode,
        clock: Callable[[], float] = time.time,
        speed: float = 1.0,
        faults: Sequence[FaultInterval] = (),
        utilization: UtilizationTrace | None = None,
        busy: Callable[[], Mapping[str, tuple[str, float]]] | None = None,
    ) -> None:
        """``busy`` returns, per accelerator UUID, the task on it and that task's start time."""
        self._spec = spec
        self._clock = clock
        self._speed = speed
        self._epoch = clock()
        self._faults = sorted(faults, key=lambda f: f.start_s)
        self._next_start = 0
        self._open: list[tuple[FaultInterval, str]] = []
        self._utilization = utilization
        self._busy = busy or dict
        self._infos = tuple(self._info(index) for index in range(spec.accelerators))
        self._uuids = tuple(info.uuid for info in self._infos)
        # Readings are immutable, so an idle accelerator's reading is built once.
        self._idle = tuple(_reading(info, 0.0, busy=False) for info in self._infos)

    @property
    def spec(self) -> FleetNode:
        return self._spec

    def set_busy(self, busy: Callable[[], Mapping[str, tuple[str, float]]]) -> None:
        self._busy = busy

    def _info(self, index: int) -> AcceleratorInfo:
        name = f"{self._spec.provider}/{self._spec.region}/{self._spec.node}/{index}"
        return AcceleratorInfo(
            uuid=f"GPU-{uuid_module.uuid5(_NAMESPACE, name)}",
            pci_bus_id=f"00000000:{0x18 + index * 0x10:02X}:00.0",
            index=index,
            vendor=self.vendor,
            model=self._spec.model,
            memory_bytes=self._spec.memory_bytes,
            driver_version=SIMULATED_DRIVER,
            software_version=SIMULATED_CUDA,
        )

    def discover(self) -> NodeInventory:
        return NodeInventory(
            accelerators=self._infos,
            driver_version=SIMULATED_DRIVER,
            software_version=SIMULATED_CUDA,
            hostname=self._spec.node,
        )

    def read(self) -> list[AcceleratorReading]:
        now = self._clock()
        busy = self._busy()
        if not busy:
            return list(self._idle)
        readings = []
        for info, idle in zip(self._infos, self._idle, strict=True):
            task = busy.get(info.uuid)
            if task is None:
                readings.append(idle)
                continue
            if self._utilization is None:
                percent = 50.0
            else:
                task_id, started_at = task
                percent = self._utilization.utilization(task_id, (now - started_at) * self._speed)
            readings.append(_reading(info, percent, busy=True))
        return readings

    def poll_events(self) -> list[DeviceEvent]:
        now = self._clock()
        trace_s = (now - self._epoch) * self._speed
        events = []
        while (
            self._next_start < len(self._faults)
            and self._faults[self._next_start].start_s <= trace_s
        ):
            fault = self._faults[self._next_start]
            self._next_start += 1
            target = self._target(fault)
            self._open.append((fault, target))
            events.append(DeviceEvent(DeviceEventKind.FAULT_START, target, now, detail=fault.cause))
        still_open = []
        for fault, target in self._open:
            if fault.end_s <= trace_s:
                events.append(
                    DeviceEvent(DeviceEventKind.FAULT_END, target, now, detail=fault.cause)
                )
            else:
                still_open.append((fault, target))
        self._open = still_open
        return events

    def _target(self, fault: FaultInterval) -> str:
        if fault.accelerator_slot is None or not self._uuids:
            return ""
        return self._uuids[fault.accelerator_slot % len(self._uuids)]


def _reading(info: AcceleratorInfo, percent: float, busy: bool) -> AcceleratorReading:
    share = percent / 100.0
    # Memory, temperature and power are modelled from utilization: the traces have none.
    memory = int(info.memory_bytes * (0.2 + 0.7 * share)) if busy else 0
    return AcceleratorReading(
        uuid=info.uuid,
        utilization_percent=percent,
        memory_used_bytes=memory,
        temperature_c=int(35 + 45 * share),
        slowdown_temperature_c=90,
        power_mw=int(_IDLE_POWER_MW + (_BUSY_POWER_MW - _IDLE_POWER_MW) * share),
        throttle_reasons=0,
        ecc=_NO_ECC_ERRORS,
        remapped_rows_correctable=0,
        remapped_rows_uncorrectable=0,
        remap_pending=False,
        remap_failure=False,
        nvlink_errors=0,
        unsupported=_UNSUPPORTED,
    )
