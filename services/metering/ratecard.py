"""The rate card: a versioned catalog of accelerator models and the PF-days each one charges.

The canonical price is PF-days per accelerator-second, an exact :class:`~decimal.Decimal`
derived from the model's peak dense throughput at the reference precision (dense FP16/BF16
tensor, no sparsity)::

    rate_per_second = peak_dense_tflops / 86_400_000      (1 PF-day = 1e15 FLOP/s x 86,400 s)

rounded half-even to :data:`RATE_QUANTUM` (1e-18 PF-day per accelerator-second). Metered time is
kept in :data:`SECONDS_QUANTUM` (1e-6 accelerator-second), so every charge
``accelerator_seconds x rate_per_second`` is an exact product on the ledger quantum of 1e-24
PF-day, and the per-hour figure is exactly ``rate_per_second x 3600``. The rounding of the rate
changes a charge by less than 1e-13 of its value; it happens once, when a version is built.

Fractional and MIG use is metered as ``wall seconds x share``, so a quarter of a GPU for an hour
is 900 accelerator-seconds and costs a quarter of the hourly rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation, Overflow
from enum import StrEnum
from typing import Any, Final

RATE_QUANTUM: Final = Decimal("1e-18")
"""Resolution of a rate, in PF-days per accelerator-second."""
SECONDS_QUANTUM: Final = Decimal("1e-6")
"""Resolution of metered time, in accelerator-seconds."""
AMOUNT_QUANTUM: Final = Decimal("1e-24")
"""The ledger quantum in PF-days; RATE_QUANTUM x SECONDS_QUANTUM equals it."""
TFLOPS_PER_PF_DAY_SECOND: Final = Decimal(86_400_000)
"""TFLOP/s sustained for one second that make one PF-day: 1e3 TFLOP/s x 86,400 s."""
SECONDS_PER_HOUR: Final = 3600

EXACT: Final = Context(prec=80, traps=[InvalidOperation, Inexact, Overflow])
"""Context for money arithmetic: any rounding raises instead of losing a quantum."""
_ROUNDING: Final = Context(prec=80, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Overflow])


class Vendor(StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"
    HUAWEI = "huawei"
    CAMBRICON = "cambricon"
    OTHER = "other"


class RatePolicy(StrEnum):
    """Pricing policy of a grant: the current card, or the card current at its award."""

    CURRENT = "current"
    FIXED_AT_AWARD = "fixed_at_award"


class UnknownModelError(LookupError):
    """The rate card has no entry for an accelerator model."""

    def __init__(self, model: str, version: int) -> None:
        super().__init__(f"accelerator model {model!r} is not in rate card version {version}")
        self.model = model
        self.version = version


@dataclass(frozen=True, slots=True)
class AcceleratorModel:
    """One catalog entry."""

    name: str
    """Catalog key as agents report it, e.g. ``A100-SXM4-80GB``."""
    vendor: Vendor
    memory_gib: int
    """Device memory in GiB."""
    peak_dense_tflops: Decimal
    """Peak dense throughput at :attr:`reference_precision`, TFLOP/s."""
    reference_precision: str
    """Precision of the peak figure, e.g. ``bf16-tensor``."""
    software_stacks: tuple[str, ...]
    source: str
    """Source of the peak figure, or the assumption behind it."""


def rate_per_second(peak_dense_tflops: Decimal) -> Decimal:
    """Return PF-days per accelerator-second for a peak in TFLOP/s, rounded to RATE_QUANTUM."""
    if not peak_dense_tflops.is_finite() or peak_dense_tflops <= 0:
        raise ValueError(f"peak_dense_tflops {peak_dense_tflops} must be a positive number")
    return _ROUNDING.divide(peak_dense_tflops, TFLOPS_PER_PF_DAY_SECOND).quantize(
        RATE_QUANTUM, context=_ROUNDING
    )


def exact_seconds(value: Decimal) -> Decimal:
    """Return ``value`` on SECONDS_QUANTUM, raising ``Inexact`` if that would round it."""
    return value.quantize(SECONDS_QUANTUM, context=EXACT)


def charge(accelerator_seconds: Decimal, rate: Decimal) -> Decimal:
    """Return the exact charge in PF-days for metered time at a per-second rate."""
    return EXACT.multiply(exact_seconds(accelerator_seconds), rate).quantize(
        AMOUNT_QUANTUM, context=EXACT
    )


@dataclass(frozen=True, slots=True)
class RateCard:
    """One immutable version of the catalog and its rates."""

    version: int
    effective_from: datetime
    """When this version became the current one (UTC)."""
    models: Mapping[str, AcceleratorModel]
    rates: Mapping[str, Decimal] = field(init=False)
    """PF-days per accelerator-second by model name."""

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"rate card version {self.version} must be 1 or more")
        if self.effective_from.tzinfo is None:
            raise ValueError("effective_from must carry a time zone")
        rates = {name: rate_per_second(m.peak_dense_tflops) for name, m in self.models.items()}
        object.__setattr__(self, "rates", rates)

    def rate_per_second(self, model: str) -> Decimal:
        try:
            return self.rates[model]
        except KeyError:
            raise UnknownModelError(model, self.version) from None

    def rate_per_hour(self, model: str) -> Decimal:
        """Return PF-days per accelerator-hour: exactly the per-second rate x 3600."""
        return EXACT.multiply(self.rate_per_second(model), Decimal(SECONDS_PER_HOUR))

    def charge(self, model: str, accelerator_seconds: Decimal) -> Decimal:
        return charge(accelerator_seconds, self.rate_per_second(model))

    def to_json(self) -> str:
        """Serialize to the JSON stored in PostgreSQL and in the rate-card KV bucket."""
        return json.dumps(
            {
                "version": self.version,
                "effective_from": self.effective_from.isoformat(),
                "models": [_model_to_dict(m, self.rates[m.name]) for m in self.models.values()],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RateCard:
        data = json.loads(text)
        models = [_model_from_dict(item) for item in data["models"]]
        return cls(
            version=int(data["version"]),
            effective_from=datetime.fromisoformat(data["effective_from"]),
            models={m.name: m for m in models},
        )


def _model_to_dict(model: AcceleratorModel, rate: Decimal) -> dict[str, Any]:
    return {
        "name": model.name,
        "vendor": model.vendor.value,
        "memory_gib": model.memory_gib,
        "peak_dense_tflops": str(model.peak_dense_tflops),
        "reference_precision": model.reference_precision,
        "software_stacks": list(model.software_stacks),
        "source": model.source,
        # Derived, published for readers such as the scheduler; ignored when parsing.
        "pf_days_per_accelerator_second": str(rate),
    }


def _model_from_dict(item: Mapping[str, Any]) -> AcceleratorModel:
    return AcceleratorModel(
        name=str(item["name"]),
        vendor=Vendor(item["vendor"]),
        memory_gib=int(item["memory_gib"]),
        peak_dense_tflops=Decimal(str(item["peak_dense_tflops"])),
        reference_precision=str(item["reference_precision"]),
        software_stacks=tuple(str(s) for s in item["software_stacks"]),
        source=str(item["source"]),
    )


@dataclass(frozen=True, slots=True)
class RateCardHistory:
    """Every version of the rate card, oldest first."""

    versions: tuple[RateCard, ...]

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError("a rate card history needs at least one version")
        numbers = [card.version for card in self.versions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"rate card versions {numbers} must run 1, 2, 3, ... without gaps")

    @property
    def current(self) -> RateCard:
        return self.versions[-1]

    def get(self, version: int) -> RateCard:
        if not 1 <= version <= len(self.versions):
            raise LookupError(f"rate card version {version} does not exist")
        return self.versions[version - 1]

    def for_grant(self, policy: RatePolicy, award_version: int | None) -> RateCard:
        """Return the card that prices a grant's usage under its rate policy."""
        if policy is RatePolicy.FIXED_AT_AWARD and award_version is not None:
            return self.get(award_version)
        return self.current

    def with_version(
        self, models: Iterable[AcceleratorModel], effective_from: datetime
    ) -> RateCardHistory:
        """Return a new history with one more version built from ``models``."""
        card = RateCard(
            version=self.current.version + 1,
            effective_from=effective_from,
            models={m.name: m for m in models},
        )
        return RateCardHistory((*self.versions, card))


_NVIDIA_CUDA = ("cuda-12",)

DEFAULT_MODELS: Final[tuple[AcceleratorModel, ...]] = (
    AcceleratorModel(
        "T4",
        Vendor.NVIDIA,
        16,
        Decimal("65"),
        "fp16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA T4 Tensor Core GPU datasheet: 65 TFLOPS mixed precision (FP16/FP32)",
    ),
    AcceleratorModel(
        "P100",
        Vendor.NVIDIA,
        16,
        Decimal("18.7"),
        "fp16",
        _NVIDIA_CUDA,
        "NVIDIA Tesla P100 datasheet, PCIe 16 GB: 18.7 TFLOPS half precision (no tensor cores)",
    ),
    AcceleratorModel(
        "V100M16",
        Vendor.NVIDIA,
        16,
        Decimal("125"),
        "fp16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA Tesla V100 datasheet, SXM2: 125 TFLOPS tensor performance",
    ),
    AcceleratorModel(
        "V100M32",
        Vendor.NVIDIA,
        32,
        Decimal("125"),
        "fp16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA Tesla V100 datasheet, SXM2 32 GB: 125 TFLOPS tensor performance",
    ),
    AcceleratorModel(
        "A10",
        Vendor.NVIDIA,
        24,
        Decimal("125"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA A10 Tensor Core GPU datasheet: 125 TFLOPS BF16 dense (250 with sparsity)",
    ),
    AcceleratorModel(
        "A100-SXM4-80GB",
        Vendor.NVIDIA,
        80,
        Decimal("312"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense (624 with sparsity)",
    ),
    AcceleratorModel(
        "A800-SXM4-80GB",
        Vendor.NVIDIA,
        80,
        Decimal("312"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA A800 datasheet: same tensor throughput as the A100 SXM4 (312 TFLOPS BF16 dense)",
    ),
    AcceleratorModel(
        "H800",
        Vendor.NVIDIA,
        80,
        Decimal("989.5"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "NVIDIA H800 SXM5 datasheet: 1,979 TFLOPS BF16 with sparsity, halved for dense",
    ),
    # The openb trace anonymises G2 and G3. Both sit on training-class nodes (G2 with 8 GPUs
    # a node), so they are priced like a V100 SXM2 until the provider discloses the model.
    AcceleratorModel(
        "G2",
        Vendor.NVIDIA,
        32,
        Decimal("125"),
        "fp16-tensor",
        _NVIDIA_CUDA,
        "assumption: anonymised model in the Alibaba openb trace, priced as a V100 SXM2",
    ),
    AcceleratorModel(
        "G3",
        Vendor.NVIDIA,
        32,
        Decimal("125"),
        "fp16-tensor",
        _NVIDIA_CUDA,
        "assumption: anonymised model in the Alibaba openb trace, priced as a V100 SXM2",
    ),
    # The 2026 spot trace anonymises two series next to A100/H800 fleets; priced as an A100
    # SXM4 until the provider discloses the model.
    AcceleratorModel(
        "GPU-series-1",
        Vendor.NVIDIA,
        80,
        Decimal("312"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "assumption: anonymised model in the Alibaba 2026 spot trace, priced as an A100 SXM4",
    ),
    AcceleratorModel(
        "GPU-series-2",
        Vendor.NVIDIA,
        80,
        Decimal("312"),
        "bf16-tensor",
        _NVIDIA_CUDA,
        "assumption: anonymised model in the Alibaba 2026 spot trace, priced as an A100 SXM4",
    ),
    AcceleratorModel(
        "MI300X",
        Vendor.AMD,
        192,
        Decimal("1307.4"),
        "bf16-tensor",
        ("rocm-6",),
        "AMD Instinct MI300X accelerator data sheet: 1,307.4 TFLOPS FP16/BF16 dense",
    ),
    # NOTE: Huawei publishes no datasheet figure for the 910B itself; 320 TFLOPS FP16 and
    # 64 GB HBM2e are the widely reported figures for the mass-production part.
    AcceleratorModel(
        "Ascend-910B",
        Vendor.HUAWEI,
        64,
        Decimal("320"),
        "fp16-cube",
        ("cann-8",),
        "Huawei Ascend 910B, reported figure: about 320 TFLOPS FP16",
    ),
    AcceleratorModel(
        "MLU370-X8",
        Vendor.CAMBRICON,
        48,
        Decimal("96"),
        "fp16",
        ("neuware-1",),
        "Cambricon MLU370-X8 launch specification: 96 TFLOPS FP16 and BF16, 48 GB LPDDR5",
    ),
)

DEFAULT_EFFECTIVE_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)


def default_rate_card() -> RateCard:
    """Return version 1: the built-in catalog, covering every model in the reference traces."""
    return RateCard(
        version=1,
        effective_from=DEFAULT_EFFECTIVE_FROM,
        models={m.name: m for m in DEFAULT_MODELS},
    )
