"""A fake NVML at the pynvml function boundary, with realistic values and NVML's error codes.

Each fake GPU answers the pynvml calls the backend makes. Handles carry a generation: after
:meth:`FakeNvml.reset_all` every old handle fails with ``INVALID_ARGUMENT`` until the backend
initialises NVML again and fetches new handles, as after a GPU reset or driver reload.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from agents.backends.nvml_record import RECORDED_FUNCTIONS

# The fake patches exactly the pynvml functions the recorder captures, so the two agree.
FUNCTIONS = RECORDED_FUNCTIONS


@dataclass
class FakeGpu:
    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 81_559 << 20
    memory_used: int = 40_000 << 20
    utilization: int = 87
    temperature: int = 61
    slowdown_temperature: int = 92
    power_mw: int = 512_345
    throttle_reasons: int = 0
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    nvlink_links: int = 18
    nvlink_errors_per_counter: int = 0
    unsupported: set[str] = field(default_factory=set)
    """pynvml function names that return NOT_SUPPORTED on this GPU."""
    lost: bool = False
    mig_instances: list[FakeMig] = field(default_factory=list)

    @property
    def pci_bus_id(self) -> str:
        return f"00000000:{0x18 + self.index * 0x10:02X}:00.0"


@dataclass
class FakeMig:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    slices: int = 1
    memory_total: int = 9_984 << 20
    memory_used: int = 1_200 << 20


@dataclass(frozen=True)
class _Handle:
    generation: int
    index: int
    mig: int = -1


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], driver: str = "550.54.15", cuda: int = 12040) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.generation = 0
        self.initialised = False
        self.init_count = 0
        self.events: deque[tuple[int, int]] = deque()
        self.registered: set[int] = set()

    @classmethod
    def h100_node(cls, count: int = 8) -> FakeNvml:
        return cls([FakeGpu(i, f"GPU-{i:08x}-1111-2222-3333-{i:012x}") for i in range(count)])

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in FUNCTIONS:
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    # Scenario controls ---------------------------------------------------------------------

    def reset_all(self) -> None:
        """Invalidate every handle, as a GPU reset or driver reload does."""
        self.generation += 1

    def xid(self, index: int, code: int) -> None:
        self.events.append((index, code))

    # Helpers -------------------------------------------------------------------------------

    def _gpu(self, handle: _Handle, function: str) -> FakeGpu:
        if not self.initialised:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, _Handle) or handle.generation != self.generation:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if function in gpu.unsupported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _mig(self, handle: _Handle) -> FakeMig | None:
        if handle.mig < 0:
            return None
        return self.gpus[handle.index].mig_instances[handle.mig]

    # pynvml functions ----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.initialised = True
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialised:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        handle = _Handle(self.generation, index)
        self._gpu(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        gpu = self._gpu(handle, "nvmlDeviceGetUUID")
        mig = self._mig(handle)
        return mig.uuid if mig else gpu.uuid

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(handle, "nvmlDeviceGetPciInfo").pci_bus_id)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        gpu = self._gpu(handle, "nvmlDeviceGetName")
        mig = self._mig(handle)
        return mig.name if mig else gpu.name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        mig = self._mig(handle)
        if mig is not None:
            total, used = mig.memory_total, mig.memory_used
        else:
            total, used = gpu.memory_total, gpu.memory_used
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> tuple[int, int]:
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_instances else 0
        return mode, mode

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._gpu(handle, "nvmlDeviceGetMaxMigDeviceCount")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        gpu = self._gpu(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if index >= len(gpu.mig_instances):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return _Handle(handle.generation, handle.index, index)

    def nvmlDeviceGetAttributes(self, handle: _Handle) -> SimpleNamespace:
        self._gpu(handle, "nvmlDeviceGetAttributes")
        mig = self._mig(handle)
        return SimpleNamespace(gpuInstanceSliceCount=mig.slices if mig else 7)

    def nvmlEventSetCreate(self) -> str:
        return f"event-set-{self.generation}"

    def nvmlEventSetFree(self, event_set: str) -> None:
        return None

    def nvmlDeviceRegisterEvents(self, handle: _Handle, types: int, event_set: str) -> None:
        self._gpu(handle, "nvmlDeviceRegisterEvents")
        self.registered.add(handle.index)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        if not self.events:
            raise _error(pynvml.NVML_ERROR_TIMEOUT)
        index, code = self.events.popleft()
        return SimpleNamespace(
            device=_Handle(self.generation, index),
            eventType=pynvml.nvmlEventTypeXidCriticalError,
            eventData=code,
            gpuInstanceId=0xFFFFFFFF,
            computeInstanceId=0xFFFFFFFF,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        if handle.mig >= 0:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=gpu.utilization, memory=gpu.utilization // 2)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetTemperatureThreshold(self, handle: _Handle, kind: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperatureThreshold").slowdown_temperature

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").throttle_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, error_type: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        return gpu.ecc.get((error_type, counter), 0)

    def nvmlDeviceGetRetiredPages(self, handle: _Handle, cause: int) -> list[int]:
        self._gpu(handle, "nvmlDeviceGetRetiredPages")
        # Hopper replaced page retirement with row remapping.
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: _Handle) -> int:
        self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus")
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetRemappedRows(self, handle: _Handle) -> tuple[int, int, int, int]:
        return self._gpu(handle, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlDeviceGetNvLinkState(self, handle: _Handle, link: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetNvLinkState")
        if link >= gpu.nvlink_links:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 1

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: _Handle, link: int, counter: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetNvLinkErrorCounter").nvlink_errors_per_counter

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"FakeNvml has no {name}")
