"""Pricing metered usage into charges: pure, no I/O.

Input is the uncharged accelerator-seconds of each attempt, period, location and model; output
is one charge per attempt and period, priced with the rate card the attempt's grant uses, split
into lines by provider, region and model for settlements. The ledger idempotency key of a
period's first charge is ``<job_id>/<attempt>/<period_start_unix>``; usage that arrives after
its period was charged gets a further charge with ``/<seq>`` appended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.metering.ratecard import EXACT, RateCard, RateCardHistory, RatePolicy

AttemptKey = tuple[str, int]
"""(job_id, attempt)."""
PeriodKey = tuple[str, int, datetime]
"""(job_id, attempt, period_start)."""


@dataclass(frozen=True, slots=True)
class AttemptTerms:
    """Facts about one attempt of a job that charging needs."""

    hold_id: str
    rate_policy: RatePolicy
    award_rate_card_version: int | None


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Accelerator-seconds metered but not yet charged for one period aggregate row."""

    job_id: str
    attempt: int
    period_start: datetime
    provider: str
    region: str
    accelerator_model: str
    seconds: Decimal


@dataclass(frozen=True, slots=True)
class ChargeLine:
    provider: str
    region: str
    accelerator_model: str
    seconds: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class PlannedCharge:
    """A charge ready to be recorded and then committed to the ledger."""

    request_id: str
    job_id: str
    attempt: int
    period_start: datetime
    seq: int
    hold_id: str
    seconds: Decimal
    amount: Decimal
    rate_card_version: int
    lines: tuple[ChargeLine, ...]
    final: bool


def charge_request_id(job_id: str, attempt: int, period_start: datetime, seq: int) -> str:
    base = f"{job_id}/{attempt}/{int(period_start.timestamp())}"
    return base if seq == 0 else f"{base}/{seq}"


def pricing_card(history: RateCardHistory, terms: AttemptTerms, models: Iterable[str]) -> RateCard:
    """Return the card that prices an attempt's usage.

    A grant fixed at award uses its award version, unless that version lacks one of the models
    used (a model added to the catalog later): then the current card prices the whole charge,
    and the charge records that version.
    """
    card = history.for_grant(terms.rate_policy, terms.award_rate_card_version)
    if all(model in card.rates for model in models):
        return card
    return history.current


def plan_charges(
    deltas: Iterable[UsageDelta],
    terms: Mapping[AttemptKey, AttemptTerms],
    next_seq: Mapping[PeriodKey, int],
    history: RateCardHistory,
    final_attempts: frozenset[AttemptKey] = frozenset(),
) -> list[PlannedCharge]:
    """Group deltas by attempt and period and price each group as one charge.

    Deltas of attempts missing from ``terms`` are skipped; the caller leaves them uncharged
    until the attempt's hold is known.
    """
    groups: dict[PeriodKey, list[UsageDelta]] = {}
    for delta in deltas:
        if delta.seconds <= 0 or (delta.job_id, delta.attempt) not in terms:
            continue
        groups.setdefault((delta.job_id, delta.attempt, delta.period_start), []).append(delta)

    planned: list[PlannedCharge] = []
    for key, items in sorted(groups.items()):
        job_id, attempt, start = key
        attempt_terms = terms[(job_id, attempt)]
        card = pricing_card(history, attempt_terms, (d.accelerator_model for d in items))
        lines = _price_lines(items, card)
        seq = next_seq.get(key, 0)
        planned.append(
            PlannedCharge(
                request_id=charge_request_id(job_id, attempt, start, seq),
                job_id=job_id,
                attempt=attempt,
                period_start=start,
                seq=seq,
                hold_id=attempt_terms.hold_id,
                seconds=_sum(line.seconds for line in lines),
                amount=_sum(line.amount for line in lines),
                rate_card_version=card.version,
                lines=lines,
                final=(job_id, attempt) in final_attempts,
            )
        )
    return planned


def _price_lines(items: Iterable[UsageDelta], card: RateCard) -> tuple[ChargeLine, ...]:
    seconds: dict[tuple[str, str, str], Decimal] = {}
    for item in items:
        key = (item.provider, item.region, item.accelerator_model)
        seconds[key] = EXACT.add(seconds.get(key, Decimal(0)), item.seconds)
    return tuple(
        ChargeLine(provider, region, model, total, card.charge(model, total))
        for (provider, region, model), total in sorted(seconds.items())
    )


def _sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total
