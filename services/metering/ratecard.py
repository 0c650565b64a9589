"""The rate card: a versioned catalog of accelerator models and the PF-days each one charges.

The canonical price is the model's peak dense throughput at the reference precision (dense
FP16/BF16 tensor, no sparsity), kept exact as given. One PF-day is 1e15 FLOP/s for 86,400 s,
so an accelerator-second at peak P TFLOP/s is ``P / 86,400,000`` PF-days and an
accelerator-hour is ``P / 24,000``. A charge is computed exactly from the peak::

    charge = accelerator_seconds x peak_dense_tflops / 86_400_000

and rounded half-even once, at the end, to the ledger quantum :data:`AMOUNT_QUANTUM` (1e-24
PF-day). Metered time is kept in :data:`SECONDS_QUANTUM` (1e-6 accelerator-second). So a charge
is off by at most 0.5e-24 PF-day, whatever its size.

The published rates are derived figures for readers: the hourly rate is rounded half-even to
1e-24 (the A100's 312 TFLOP/s give exactly 0.013), and the per-second rate is rounded up to
1e-24, so that a hold priced from it never falls short of the charges for the same time.

Fractional and MIG use is metered as ``wall seconds x share``, so a quarter of a GPU for an hour
is 900 accelerator-seconds and costs a quarter of the hourly rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import (
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
)
from enum import StrEnum
from fractions import Fraction
from typing import Any, Final

from acsp.catalog import MODELS
from acsp.decimals import format_decimal

SECONDS_QUANTUM: Final = Decimal("1e-6")
"""Resolution of metered time, in accelerator-seconds."""
AMOUNT_QUANTUM: Final = Decimal("1e-24")
"""The ledger quantum in PF-days, to which charges and published rates are rounded."""
TFLOPS_PER_PF_DAY_SECOND: Final = Decimal(86_400_000)
"""TFLOP/s sustained for one second that make one PF-day: 1e3 TFLOP/s x 86,400 s."""
TFLOPS_PER_PF_DAY_HOUR: Final = Decimal(24_000)
"""TFLOP/s sustained for one hour that make one PF-day: 1e3 TFLOP/s x 86,400 s / 3600 s."""

EXACT: Final = Context(prec=80, traps=[InvalidOperation, Inexact, Overflow])
"""Context for money arithmetic: any rounding raises instead of losing a quantum."""
_UNITS_PER_PF_DAY: Final = 10**24
"""Ledger quanta in one PF-day."""


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


class UnknownVersionError(LookupError):
    """A rate-card history has no such version, e.g. one that another replica just published."""

    def __init__(self, version: int) -> None:
        super().__init__(f"rate card version {version} does not exist")
        self.version = version


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
    """Return PF-days per accelerator-second for a peak in TFLOP/s, rounded up to 1e-24."""
    exact = _peak_fraction(peak_dense_tflops) / int(TFLOPS_PER_PF_DAY_SECOND)
    units = -((-exact.numerator * _UNITS_PER_PF_DAY) // exact.denominator)
    return _from_units(units)


def rate_per_hour(peak_dense_tflops: Decimal) -> Decimal:
    """Return PF-days per accelerator-hour for a peak in TFLOP/s, rounded half-even to 1e-24."""
    exact = _peak_fraction(peak_dense_tflops) / int(TFLOPS_PER_PF_DAY_HOUR)
    return _from_units(round(exact * _UNITS_PER_PF_DAY))


def exact_seconds(value: Decimal) -> Decimal:
    """Return ``value`` on SECONDS_QUANTUM, raising ``Inexact`` if that would round it."""
    return value.quantize(SECONDS_QUANTUM, context=EXACT)


def charge(accelerator_seconds: Decimal, peak_dense_tflops: Decimal) -> Decimal:
    """Return the charge in PF-days for metered time at a peak in TFLOP/s.

    The product is exact, and the one rounding (half-even, to AMOUNT_QUANTUM) happens last.
    Raises ``Inexact`` if the time has a digit below SECONDS_QUANTUM.
    """
    seconds = Fraction(exact_seconds(accelerator_seconds))
    exact = seconds * _peak_fraction(peak_dense_tflops) / int(TFLOPS_PER_PF_DAY_SECOND)
    # round() of a Fraction rounds half to even, like ROUND_HALF_EVEN.
    return _from_units(round(exact * _UNITS_PER_PF_DAY))


def charge_units_per_microsecond(peak_dense_tflops: Decimal) -> Fraction:
    """Return the exact charge of one accelerator-microsecond, in ledger quanta.

    :func:`charge` of ``micros`` microseconds is this times ``micros``, rounded half-even to
    a whole number of quanta.
    """
    microseconds_per_second = 10**6
    return (
        _peak_fraction(peak_dense_tflops)
        * _UNITS_PER_PF_DAY
        / (int(TFLOPS_PER_PF_DAY_SECOND) * microseconds_per_second)
    )


def _peak_fraction(peak_dense_tflops: Decimal) -> Fraction:
    if not peak_dense_tflops.is_finite() or peak_dense_tflops <= 0:
        raise ValueError(f"peak_dense_tflops {peak_dense_tflops} must be a positive number")
    return Fraction(peak_dense_tflops)


def _from_units(units: int) -> Decimal:
    return EXACT.multiply(Decimal(units), AMOUNT_QUANTUM)


@dataclass(frozen=True, slots=True)
class RateCard:
    """One immutable version of the catalog and its rates."""

    version: int
    effective_from: datetime
    """When this version became the current one (UTC)."""
    models: Mapping[str, AcceleratorModel]
    rates: Mapping[str, Decimal] = field(init=False)
    """Published PF-days per accelerator-second by model name, rounded up to 1e-24."""

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
        """Return PF-days per accelerator-hour, rounded half-even to 1e-24."""
        return rate_per_hour(self._model(model).peak_dense_tflops)

    def charge(self, model: str, accelerator_seconds: Decimal) -> Decimal:
        """Price metered time on ``model`` with one rounding, as :func:`charge` does."""
        return charge(accelerator_seconds, self._model(model).peak_dense_tflops)

    def _model(self, name: str) -> AcceleratorModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, self.version) from None

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
        "pf_days_per_accelerator_second": format_decimal(rate),
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
            raise UnknownVersionError(version)
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


DEFAULT_MODELS: Final[tuple[AcceleratorModel, ...]] = tuple(
    AcceleratorModel(
        m.name,
        Vendor(m.vendor),
        m.memory_gib,
        m.peak_dense_tflops,
        m.reference_precision,
        m.software_stacks,
        m.source,
    )
    for m in MODELS
)
"""Every model of :data:`acsp.catalog.MODELS`, which the scheduler's engine places on too."""

DEFAULT_EFFECTIVE_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)


def default_rate_card() -> RateCard:
    """Return version 1: the built-in catalog, covering every model in the reference traces."""
    return RateCard(
        version=1,
        effective_from=DEFAULT_EFFECTIVE_FROM,
        models={m.name: m for m in DEFAULT_MODELS},
    )
