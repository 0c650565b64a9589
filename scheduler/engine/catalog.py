"""The engine's view of the accelerator catalog, for placement and the simulator.

It carries what placement needs (vendor, memory, software stack) and the peak dense tensor
throughput that the simulator uses to count PF-days delivered. The figures come from
:data:`acsp.catalog.MODELS`, the table that metering's rate card is built from too.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

from acsp.catalog import MODELS, ModelFigures

SECONDS_PER_DAY: Final = 86_400
TFLOPS_PER_PFLOPS: Final = Decimal(1000)
PF_DAY_PLACES: Final = 24
"""Decimal places of a PF-day amount, the ledger's quantum of 1e-24 PF-day."""


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
        """Convert accelerator-seconds at peak into PF-days (1e15 FLOP/s for 86,400 s).

        The product is exact and rounded once, half-even, to the ledger's 24 places, as
        metering rounds a charge.
        """
        exact = (
            Fraction(accelerator_seconds)
            * Fraction(self.peak_tflops)
            / int(TFLOPS_PER_PFLOPS * SECONDS_PER_DAY)
        )
        # round() of a Fraction rounds half to even. Decimal() reads the text exactly, where
        # scaleb() would round to the context's 28 digits.
        units = round(exact * 10**PF_DAY_PLACES)
        return Decimal(f"{units}E-{PF_DAY_PLACES}")


def _from_figures(figures: ModelFigures) -> AcceleratorModel:
    return AcceleratorModel(
        figures.name,
        figures.vendor,
        figures.memory_gib,
        figures.software_stacks[0],
        figures.peak_dense_tflops,
        figures.source,
    )


DEFAULT_CATALOG: Final[tuple[AcceleratorModel, ...]] = tuple(_from_figures(m) for m in MODELS)
"""Every model of :data:`acsp.catalog.MODELS`, which metering's rate card prices too."""


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
