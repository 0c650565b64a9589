"""A minimal accelerator model catalog for the engine and the simulator.

The authoritative rate card lives in the metering service. This catalog carries only what
placement needs (vendor, memory, software stack) and the peak dense tensor throughput that
the simulator uses to count PF-days delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final

SECONDS_PER_DAY: Final = 86_400
TFLOPS_PER_PFLOPS: Final = Decimal(1000)


@dataclass(frozen=True, slots=True)
class AcceleratorModel:
    """One catalog entry."""

    name: str
    """Model name as nodes report it, e.g. ``V100M32``."""
    vendor: str
    """Lower-case vendor: ``nvidia``, ``amd``."""
    memory_gib: int
    software_stack: str
    """Stack jobs build against, e.g. ``cuda-12``; a job's constraint matches by prefix."""
    peak_tflops: Decimal
    """Peak dense FP16/BF16 tensor TFLOP/s (FP16 without tensor cores where a model has none)."""
    source: str
    """Source of the figures."""

    def pf_days(self, accelerator_seconds: Decimal) -> Decimal:
        """Convert accelerator-seconds at peak into PF-days (1e15 FLOP/s for 86,400 s)."""
        return accelerator_seconds * self.peak_tflops / TFLOPS_PER_PFLOPS / SECONDS_PER_DAY


def _entry(
    name: str, vendor: str, memory_gib: int, stack: str, tflops: str, source: str
) -> AcceleratorModel:
    return AcceleratorModel(name, vendor, memory_gib, stack, Decimal(tflops), source)


_DATASHEET = "vendor datasheet"
# NOTE: G2 and G3 are anonymised in the Alibaba openb trace, so their figures are estimates
# (G2 as a V100-class 8-GPU part, G3 as an A100-class part) with no vendor source.
DEFAULT_CATALOG: Final[tuple[AcceleratorModel, ...]] = (
    _entry("T4", "nvidia", 16, "cuda-12", "65", f"NVIDIA T4 {_DATASHEET}, FP16 tensor"),
    _entry("P100", "nvidia", 16, "cuda-12", "18.7", f"NVIDIA P100 PCIe {_DATASHEET}, FP16"),
    _entry("V100M16", "nvidia", 16, "cuda-12", "125", f"NVIDIA V100 SXM2 {_DATASHEET}"),
    _entry("V100M32", "nvidia", 32, "cuda-12", "125", f"NVIDIA V100 SXM2 {_DATASHEET}"),
    _entry("A10", "nvidia", 24, "cuda-12", "125", f"NVIDIA A10 {_DATASHEET}, dense FP16"),
    _entry("G2", "nvidia", 32, "cuda-12", "125", "estimate: anonymised model in openb"),
    _entry("G3", "nvidia", 80, "cuda-12", "312", "estimate: anonymised model in openb"),
    _entry("A100-SXM4-80GB", "nvidia", 80, "cuda-12", "312", f"NVIDIA A100 {_DATASHEET}"),
    _entry("A800-SXM4-80GB", "nvidia", 80, "cuda-12", "312", f"NVIDIA A800 {_DATASHEET}"),
    _entry("H100-SXM5-80GB", "nvidia", 80, "cuda-12", "989", f"NVIDIA H100 SXM {_DATASHEET}"),
    _entry("H800", "nvidia", 80, "cuda-12", "989", f"NVIDIA H800 SXM {_DATASHEET}"),
    # The 2026 spot trace anonymises two series that sit beside A100 and H800 fleets; they
    # are taken as A100-class parts, as the metering rate card prices them.
    _entry("GPU-series-1", "nvidia", 80, "cuda-12", "312", "estimate: anonymised model in spot"),
    _entry("GPU-series-2", "nvidia", 80, "cuda-12", "312", "estimate: anonymised model in spot"),
    _entry("MI300X", "amd", 192, "rocm-6", "1307.4", f"AMD Instinct MI300X {_DATASHEET}"),
)


class Catalog:
    """Lookup of accelerator models by name."""

    def __init__(self, models: tuple[AcceleratorModel, ...] = DEFAULT_CATALOG) -> None:
        self._models = {model.name: model for model in models}

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str) -> AcceleratorModel:
        """Return the entry for ``name``; raise ``KeyError`` naming the known models."""
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models))
            raise KeyError(f"accelerator model {name!r} is not in the catalog ({known})") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._models))
