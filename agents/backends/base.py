"""The interface every accelerator backend implements.

A backend wraps one vendor library (NVML for NVIDIA GPUs, a simulation, later an NPU or MLU
library). The rest of the agent sees only this interface, so adding a vendor means adding one
module here and one entry in :func:`agents.backends.create_backend`.

Contract:

- Accelerators are keyed by UUID (``AcceleratorInfo.uuid``), never by index alone.
- :meth:`Backend.read` never raises because one accelerator fails: a field the device does
  not support is ``None`` and named in ``AcceleratorReading.unsupported``, a device that is gone
  reads ``lost=True``. It raises :class:`BackendError` only when the whole library is unusable.
- The methods block (vendor libraries are C calls); the agent runs them in a worker thread.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from agents.model import AcceleratorReading, DeviceEvent, NodeInventory


class BackendError(Exception):
    """The vendor library as a whole failed; the agent logs it and retries later."""


class Backend(abc.ABC):
    """One node's accelerators as seen through one vendor library."""

    vendor: str = ""
    """Lower-case vendor name, stored in each ``AcceleratorInfo.vendor``."""
    visible_devices_variable: str = ""
    """Environment variable that restricts a process to some accelerators."""

    @abc.abstractmethod
    def discover(self) -> NodeInventory:
        """Return the accelerators of the node and the driver versions."""

    @abc.abstractmethod
    def read(self) -> list[AcceleratorReading]:
        """Return one reading per discovered accelerator, in inventory order."""

    @abc.abstractmethod
    def poll_events(self) -> list[DeviceEvent]:
        """Return the events (XIDs, faults) seen since the last call, without waiting."""

    def visible_devices_env(self, uuids: Sequence[str]) -> dict[str, str]:
        """Return the environment that makes only ``uuids`` visible to a task's process."""
        return {self.visible_devices_variable: ",".join(uuids)}

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release the vendor library."""
