"""NVIDIA GPUs through NVML (the ``pynvml`` bindings, package ``nvidia-ml-py``).

Every NVML call goes through the ``pynvml`` module attribute at call time, so tests replace
single functions (``monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", ...)``) and the
recorder in :mod:`agents.backends.nvml_record` wraps them.

Errors, per NVML's return codes:

- ``NOT_SUPPORTED`` on a field makes that field ``None`` and lists it in ``unsupported``.
- ``GPU_IS_LOST`` on a device makes its reading ``lost=True`` (the GPU fell off the bus); the
  other devices read normally.
- ``UNINITIALIZED`` or ``INVALID_ARGUMENT`` on a device call means the handles went stale (a
  GPU reset or driver reload). The backend shuts NVML down, initialises it again, looks every
  device up again by UUID and raises :class:`BackendError` for that one reading.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

from agents.backends.base import Backend, BackendError
from agents.model import (
    WHOLE_MILLI,
    AcceleratorInfo,
    AcceleratorReading,
    DeviceEvent,
    DeviceEventKind,
    EccCounts,
    NodeInventory,
)

logger = logging.getLogger(__name__)

_STALE_HANDLE_CODES = frozenset(
    {pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_INVALID_ARGUMENT}
)
_NVLINK_COUNTERS = (
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
)
_NO_SUCH_LINK_CODES = frozenset(
    {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT}
)
_MAX_EVENTS_PER_POLL = 1024


class _DeviceLost(Exception):
    pass


class _StaleHandle(Exception):
    pass


@dataclass(slots=True)
class _Device:
    info: AcceleratorInfo
    handle: Any
    is_mig: bool = False


@dataclass(slots=True)
class _Reader:
    """Reads fields of one device, turning NVML errors into ``unsupported`` or exceptions."""

    handle: Any
    unsupported: set[str] = field(default_factory=set)

    def get(self, name: str, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(self.handle, *args)
        except pynvml.NVMLError as error:
            code = error.value
            if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
                self.unsupported.add(name)
                return None
            if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _DeviceLost from error
            if code in _STALE_HANDLE_CODES:
                raise _StaleHandle from error
            logger.debug("NVML %s failed: %s", name, error)
            return None


# NVML product names mapped to the catalog names that the scheduler and the rate card use.
# Memory tells the V100 variants apart; an unknown product keeps NVML's name.
_CATALOG_NAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"H100.*80GB"), "H100-SXM5-80GB"),
    # NVML names the SXM part "NVIDIA H200" and the PCIe card "NVIDIA H200 NVL". The NVL is
    # limited to 600 W, below the SXM's 700 W, so it is slower than the SXM figures that the
    # catalog prices and keeps its NVML name. The word boundary leaves the Grace Hopper "GH200"
    # alone.
    (re.compile(r"\bH200\b(?!.*\bNVL\b)"), "H200-SXM5-141GB"),
    (re.compile(r"H800"), "H800"),
    (re.compile(r"A100.*80GB"), "A100-SXM4-80GB"),
    (re.compile(r"A800.*80GB"), "A800-SXM4-80GB"),
    (re.compile(r"\bA10$"), "A10"),
    (re.compile(r"\bT4\b"), "T4"),
    (re.compile(r"P100"), "P100"),
    (re.compile(r"V100.*32GB"), "V100M32"),
    (re.compile(r"V100"), "V100M16"),
)


def catalog_model(product_name: str) -> str:
    """Return the catalog name of an NVML product name, or the product name if unknown."""
    for pattern, name in _CATALOG_NAMES:
        if pattern.search(product_name):
            return name
    return product_name


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cuda_version(encoded: int) -> str:
    # NVML encodes the CUDA driver version as 1000 * major + 10 * minor.
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


class NvmlBackend(Backend):
    """The GPUs of this machine through NVML."""

    vendor = "nvidia"
    visible_devices_variable = "CUDA_VISIBLE_DEVICES"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._devices: dict[str, _Device] = {}
        self._order: list[str] = []
        self._event_set: Any = None
        self._driver_version = ""
        self._cuda_version = ""
        self._initialised = False

    # Discovery -------------------------------------------------------------------------------

    def discover(self) -> NodeInventory:
        self._initialise()
        return NodeInventory(
            accelerators=tuple(self._devices[uuid].info for uuid in self._order),
            driver_version=self._driver_version,
            software_version=self._cuda_version,
        )

    def _initialise(self) -> None:
        try:
            pynvml.nvmlInit()
            self._driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as error:
            raise BackendError(f"NVML initialisation failed: {error}") from error
        try:
            self._cuda_version = _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion())
        except pynvml.NVMLError as error:
            # A driver that cannot report its CUDA version still serves its GPUs.
            logger.warning("CUDA driver version unreadable, reported as empty: %s", error)
            self._cuda_version = ""
        found: dict[str, _Device] = {}
        for index in range(count):
            try:
                for device in self._discover_index(index):
                    found[device.info.uuid] = device
            except pynvml.NVMLError as error:
                # Without a UUID the device cannot be keyed, so it stays out of the inventory.
                logger.error("NVML device at index %d could not be discovered: %s", index, error)
        for uuid, device in found.items():
            if uuid not in self._devices:
                self._order.append(uuid)
            self._devices[uuid] = device
        for uuid in self._order:
            if uuid not in found:
                logger.warning("GPU %s is no longer enumerated by NVML", uuid)
                self._devices[uuid].handle = None
        self._register_events()
        self._initialised = True

    def _discover_index(self, index: int) -> list[_Device]:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        info = AcceleratorInfo(
            uuid=uuid,
            pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
            index=index,
            vendor=self.vendor,
            model=catalog_model(_text(pynvml.nvmlDeviceGetName(handle))),
            memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            driver_version=self._driver_version,
            software_version=self._cuda_version,
        )
        devices = [_Device(info, handle)]
        devices.extend(self._discover_mig(handle, info))
        return devices

    def _discover_mig(self, parent: Any, parent_info: AcceleratorInfo) -> list[_Device]:
        try:
            current_mode, _pending = pynvml.nvmlDeviceGetMigMode(parent)
        except pynvml.NVMLError as error:
            if error.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
                logger.warning("MIG mode of %s unreadable: %s", parent_info.uuid, error)
            return []
        if current_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            return []
        max_count = pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)
        devices = []
        for mig_index in range(max_count):
            try:
                handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, mig_index)
            except pynvml.NVMLError as error:
                if error.value == pynvml.NVML_ERROR_NOT_FOUND:
                    continue
                raise
            name = _text(pynvml.nvmlDeviceGetName(handle))
            slices = pynvml.nvmlDeviceGetAttributes(handle).gpuInstanceSliceCount
            info = AcceleratorInfo(
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                pci_bus_id=parent_info.pci_bus_id,
                index=parent_info.index,
                vendor=self.vendor,
                model=parent_info.model,
                memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                driver_version=self._driver_version,
                software_version=self._cuda_version,
                # A MIG-capable GPU has as many compute slices as it has MIG devices at most.
                share_milli=max(1, slices * WHOLE_MILLI // max(1, max_count)),
                parent_uuid=parent_info.uuid,
                profile=name.rsplit(" ", 1)[-1] if "MIG" in name else None,
            )
            devices.append(_Device(info, handle, is_mig=True))
        return devices

    def _register_events(self) -> None:
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as error:
            logger.warning("NVML event set unavailable, XID events will not be seen: %s", error)
            self._event_set = None
            return
        for device in self._devices.values():
            if device.is_mig or device.handle is None:
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(
                    device.handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except pynvml.NVMLError as error:
                logger.warning("XID events of %s not registered: %s", device.info.uuid, error)

    def _reinitialise(self, reason: str) -> None:
        logger.warning("NVML handles are stale (%s); initialising NVML again", reason)
        self._initialised = False
        try:
            if self._event_set is not None:
                pynvml.nvmlEventSetFree(self._event_set)
        except pynvml.NVMLError as error:
            logger.debug("freeing the stale NVML event set failed: %s", error)
        self._event_set = None
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as error:
            logger.debug("NVML shutdown before re-initialisation failed: %s", error)
        self._initialise()

    # Readings --------------------------------------------------------------------------------

    def read(self) -> list[AcceleratorReading]:
        if not self._initialised:
            self._reinitialise("the previous initialisation failed")
        readings = []
        for uuid in self._order:
            device = self._devices[uuid]
            if device.handle is None:
                readings.append(AcceleratorReading(uuid=uuid, lost=True))
                continue
            try:
                readings.append(self._read_device(device))
            except _DeviceLost:
                readings.append(AcceleratorReading(uuid=uuid, lost=True))
            except _StaleHandle:
                self._reinitialise(f"device {uuid} returned a stale-handle error")
                raise BackendError(
                    "NVML handles were stale and NVML was initialised again; reading skipped"
                ) from None
        return readings

    def _read_device(self, device: _Device) -> AcceleratorReading:
        reader = _Reader(device.handle)
        utilization = reader.get("utilization", pynvml.nvmlDeviceGetUtilizationRates)
        memory = reader.get("memory", pynvml.nvmlDeviceGetMemoryInfo)
        remap = None if device.is_mig else self._read_remap(reader)
        return AcceleratorReading(
            uuid=device.info.uuid,
            utilization_percent=None if utilization is None else float(utilization.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            temperature_c=reader.get(
                "temperature", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU
            ),
            slowdown_temperature_c=reader.get(
                "slowdown_temperature",
                pynvml.nvmlDeviceGetTemperatureThreshold,
                pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
            ),
            power_mw=reader.get("power", pynvml.nvmlDeviceGetPowerUsage),
            throttle_reasons=reader.get(
                "throttle_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons
            ),
            ecc=self._read_ecc(reader),
            retired_pages=None if device.is_mig else self._read_retired_pages(reader),
            retired_pages_pending=None
            if device.is_mig
            else _flag(reader.get("retired_pages", pynvml.nvmlDeviceGetRetiredPagesPendingStatus)),
            remapped_rows_correctable=None if remap is None else remap[0],
            remapped_rows_uncorrectable=None if remap is None else remap[1],
            remap_pending=None if remap is None else bool(remap[2]),
            remap_failure=None if remap is None else bool(remap[3]),
            nvlink_errors=None if device.is_mig else self._read_nvlink(reader),
            unsupported=frozenset(reader.unsupported),
        )

    @staticmethod
    def _read_ecc(reader: _Reader) -> EccCounts:
        counts: list[int | None] = []
        for error_type in (
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        ):
            for counter in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
                if "ecc" in reader.unsupported:
                    counts.append(None)
                    continue
                counts.append(
                    reader.get("ecc", pynvml.nvmlDeviceGetTotalEccErrors, error_type, counter)
                )
        return EccCounts(
            volatile_single=counts[0],
            aggregate_single=counts[1],
            volatile_double=counts[2],
            aggregate_double=counts[3],
        )

    @staticmethod
    def _read_retired_pages(reader: _Reader) -> int | None:
        total = 0
        for cause in (
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
            pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        ):
            pages = reader.get("retired_pages", pynvml.nvmlDeviceGetRetiredPages, cause)
            if pages is None:
                return None
            total += len(pages)
        return total

    @staticmethod
    def _read_remap(reader: _Reader) -> tuple[int, int, int, int] | None:
        result = reader.get("remapped_rows", pynvml.nvmlDeviceGetRemappedRows)
        return None if result is None else tuple(result)  # type: ignore[return-value]

    @staticmethod
    def _read_nvlink(reader: _Reader) -> int | None:
        # A sum that misses a link or a counter would read as a drop, and the next full sum as
        # an increase that the health rules report, so any failed read makes the total None.
        total = 0
        active = 0
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if not pynvml.nvmlDeviceGetNvLinkState(reader.handle, link):
                    continue
            except pynvml.NVMLError as error:
                if error.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise _DeviceLost from error
                # NOT_SUPPORTED or INVALID_ARGUMENT here mean "no such link", not a stale handle.
                if error.value in _NO_SUCH_LINK_CODES:
                    break
                logger.debug("NVML NVLink %d state failed: %s", link, error)
                return None
            active += 1
            for counter in _NVLINK_COUNTERS:
                value = reader.get(
                    "nvlink_errors", pynvml.nvmlDeviceGetNvLinkErrorCounter, link, counter
                )
                if value is None:
                    return None
                total += value
        if active == 0:
            reader.unsupported.add("nvlink_errors")
            return None
        return total

    # Events ----------------------------------------------------------------------------------

    def poll_events(self) -> list[DeviceEvent]:
        if self._event_set is None:
            return []
        events = []
        for _ in range(_MAX_EVENTS_PER_POLL):
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError as error:
                if error.value != pynvml.NVML_ERROR_TIMEOUT:
                    logger.warning("waiting for NVML events failed: %s", error)
                break
            events.append(self._event_from(data))
        return events

    def _event_from(self, data: Any) -> DeviceEvent:
        try:
            uuid = _text(pynvml.nvmlDeviceGetUUID(data.device))
        except pynvml.NVMLError as error:
            # A GPU that fell off the bus cannot name itself; the event is still reported.
            logger.warning(
                "XID %d from a device whose UUID is unreadable: %s", data.eventData, error
            )
            uuid = ""
        return DeviceEvent(
            kind=DeviceEventKind.XID, uuid=uuid, time=self._clock(), code=int(data.eventData)
        )

    def close(self) -> None:
        if not self._initialised:
            return
        try:
            if self._event_set is not None:
                pynvml.nvmlEventSetFree(self._event_set)
        except pynvml.NVMLError as error:
            logger.warning("freeing the NVML event set failed: %s", error)
        self._event_set = None
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as error:
            logger.warning("NVML shutdown failed: %s", error)
        self._initialised = False


def _flag(value: int | None) -> bool | None:
    return None if value is None else bool(value)
