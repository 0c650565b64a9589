"""Refund rules: which ended attempts lost work to a hardware fault or a recall, and how much.

Pure, no I/O. An attempt is refunded when it ended because of its accelerators (a fatal XID,
an uncorrectable ECC error, a GPU fallen off the bus) or because its provider recalled the
capacity. The time lost runs from the attempt's last checkpoint (or its start) to the fault,
bounded by the program's maximum. The refund prices that time period by period, with the rates
of the charges that covered it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final

from services.metering.ratecard import EXACT, RateCard

FATAL_XIDS: Final = frozenset({48, 63, 64, 74, 79, 94, 95, 119, 120})
"""XID codes that mean the GPU, not the job, failed, after NVIDIA's XID error catalog: 48
double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 94/95 contained and
uncontained ECC, 119/120 GSP errors."""
FATAL_CONDITIONS: Final = frozenset({"ecc_dbe", "fallen_off_bus", "row_remap_failure"})
_RECALL_IN_REASON: Final = re.compile(r"\bprovider_recall ([A-Za-z0-9_.:-]+)")
"""Pattern of a recall in the scheduler's preemption reason: ``preempted: provider_recall <id>``."""


@dataclass(frozen=True, slots=True)
class HealthFact:
    event_id: str
    accelerator_id: str
    node: str
    condition: str
    xid: int
    fatal_severity: bool
    time: datetime
    provider: str = ""
    """The provider whose subject the event came on; only its attempts' hardware can match."""


@dataclass(frozen=True, slots=True)
class EndedAttempt:
    job_id: str
    attempt: int
    hold_id: str
    started_at: datetime | None
    ended_at: datetime
    end_reason: str
    end_trigger: str
    """Cause of its end: ``recall:<id>``, ``health:<event_id>`` or empty."""
    last_checkpoint_at: datetime | None


@dataclass(frozen=True, slots=True)
class SampleSlice:
    """A sample of the attempt, reduced to what pricing a refund needs."""

    start_time: datetime
    period_start: datetime
    """Start of the charging period whose charges covered the sample."""
    provider: str
    region: str
    accelerator_model: str
    accelerator_id: str
    node: str
    seconds: Decimal


@dataclass(frozen=True, slots=True)
class PeriodCharge:
    """The committed charges of an attempt for one charging period."""

    amount: Decimal
    cards: tuple[RateCard, ...]
    """The rate-card versions that priced them: more than one when late usage was charged
    after a new version took effect."""


@dataclass(frozen=True, slots=True)
class RefundLine:
    provider: str
    region: str
    accelerator_model: str
    seconds: Decimal
    amount: Decimal


@dataclass(frozen=True, slots=True)
class RefundDecision:
    request_id: str
    lost_from: datetime
    lost_until: datetime
    seconds: Decimal
    amount: Decimal
    reason: str
    lines: tuple[RefundLine, ...]


def is_fatal(condition: str, xid: int, fatal_severity: bool) -> bool:
    """Return whether a health event means the accelerator failed under the job."""
    if condition == "xid":
        return xid in FATAL_XIDS
    return condition in FATAL_CONDITIONS or (fatal_severity and condition != "thermal")


def recall_trigger(trigger: str, reason: str) -> str:
    """Return ``recall:<id>`` when a job event reports that a recall ended the attempt, else "".

    The trigger may name the recall itself (``recall:<id>``). The scheduler gives the task event
    that completed the stop as the trigger and names the recall only in the reason, so the
    reason is read too.
    """
    if trigger.startswith("recall:"):
        return trigger
    match = _RECALL_IN_REASON.search(reason)
    return f"recall:{match.group(1)}" if match else ""


def task_attempt(task_id: str) -> tuple[str, int] | None:
    """Return (job id, attempt) of a task id ``<job_id>/<attempt>/<task_index>``, or None."""
    parts = task_id.rsplit("/", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    if not (parts[1].isdigit() and parts[2].isdigit() and (parts[1] + parts[2]).isascii()):
        return None
    return parts[0], int(parts[1])


def find_cause(
    attempt: EndedAttempt,
    events: Iterable[HealthFact],
    used_accelerators: frozenset[str],
    used_nodes: frozenset[str],
    tie_window: timedelta,
) -> tuple[str, datetime] | None:
    """Return (reason, time of the loss) when the attempt's end is the provider's fault.

    A fatal event ties the end to the hardware only when it hit an accelerator the attempt used
    (or its node, for node-wide events), and then when the agent named it as the cause or it
    came between the attempt's start and ``tie_window`` after its end. An event elsewhere is
    never the cause, even when an agent named it: a provider could otherwise have any attempt
    refunded, at the cost of the provider whose hardware ran it.
    """
    if attempt.end_trigger.startswith("recall:"):
        return f"provider recall {attempt.end_trigger.removeprefix('recall:')}", attempt.ended_at
    named_by_agent = attempt.end_trigger.startswith("health:")
    if not named_by_agent and attempt.end_reason not in {"failed", "lost"}:
        return None
    named = attempt.end_trigger.removeprefix("health:") if attempt.end_trigger else ""
    start = attempt.started_at or datetime.min.replace(tzinfo=attempt.ended_at.tzinfo)
    latest = attempt.ended_at + tie_window
    for event in sorted(events, key=lambda e: e.time):
        if not is_fatal(event.condition, event.xid, event.fatal_severity):
            continue
        on_ours = (
            event.accelerator_id in used_accelerators
            if event.accelerator_id
            else event.node in used_nodes
        )
        if on_ours and (event.event_id == named or start <= event.time <= latest):
            condition = f"xid {event.xid}" if event.condition == "xid" else event.condition
            target = event.accelerator_id or f"node {event.node}"
            return f"{condition} on {target}", min(event.time, attempt.ended_at)
    return None


def decide_refund(
    attempt: EndedAttempt,
    cause: tuple[str, datetime],
    samples: Sequence[SampleSlice],
    charges: Mapping[datetime, PeriodCharge],
    max_lost: timedelta,
) -> RefundDecision | None:
    """Price the work lost since the last checkpoint, bounded by ``max_lost``.

    The refund covers the samples that started at or after the last checkpoint (or the bound)
    and before the loss. Without a checkpoint the lost time starts with the attempt or its
    first sample, whichever is earlier. ``charges`` contains the attempt's committed charges by
    period start, and each period's lost time is priced at that period's rates, so a rate
    change during the job never refunds old time at the new rate.
    """
    reason, lost_until = cause
    start = attempt.started_at
    first_sample = min((sample.start_time for sample in samples), default=None)
    if first_sample is not None and (start is None or first_sample < start):
        # The agent's first sample begins when it started the task, a little before the
        # scheduler records the start from the agent's report.
        start = first_sample
    since = attempt.last_checkpoint_at or start or lost_until - max_lost
    lost_from = max(since, lost_until - max_lost)
    seconds: dict[_PeriodLineKey, Decimal] = {}
    for sample in samples:
        if lost_from <= sample.start_time < lost_until:
            key = (
                sample.period_start,
                sample.provider,
                sample.region,
                sample.accelerator_model,
            )
            seconds[key] = EXACT.add(seconds.get(key, Decimal(0)), sample.seconds)
    lines = _price_lost_time(seconds, charges)
    amount = _sum(line.amount for line in lines)
    if amount <= 0:
        return None
    return RefundDecision(
        request_id=f"refund/{attempt.job_id}/{attempt.attempt}",
        lost_from=lost_from,
        lost_until=lost_until,
        seconds=_sum(line.seconds for line in lines),
        amount=amount,
        reason=_refund_reason(reason, attempt, since, lost_from, lost_until),
        lines=lines,
    )


def _refund_reason(
    cause: str, attempt: EndedAttempt, since: datetime, lost_from: datetime, lost_until: datetime
) -> str:
    """Return the cause and the lost time, counted from the checkpoint or else from the start."""
    anchor = "the last checkpoint" if attempt.last_checkpoint_at else "the attempt started"
    lost = f"{(lost_until - lost_from).total_seconds():,.0f} s"
    if lost_from > since:
        total = f"{(lost_until - since).total_seconds():,.0f} s"
        return f"{cause}, the last {lost} (the maximum refunded) of {total} since {anchor}"
    return f"{cause}, {lost} since {anchor}"


_PeriodLineKey = tuple[datetime, str, str, str]
"""(period_start, provider, region, accelerator_model)."""


def _price_lost_time(
    seconds: Mapping[_PeriodLineKey, Decimal], charges: Mapping[datetime, PeriodCharge]
) -> tuple[RefundLine, ...]:
    """Price lost time period by period, then add the lines up by provider, region and model.

    A period's time is priced with the version its charges used, or the cheapest for the model
    where late usage was charged at another version. A period's refund never exceeds what it
    was charged, and a period without a committed charge refunds nothing.
    """
    by_period: dict[datetime, list[RefundLine]] = {}
    for (period, provider, region, model), total in sorted(seconds.items()):
        charge = charges.get(period)
        if charge is None:
            continue
        prices = [card.charge(model, total) for card in charge.cards if model in card.models]
        price = min(prices, default=Decimal(0))
        by_period.setdefault(period, []).append(RefundLine(provider, region, model, total, price))
    totals: dict[tuple[str, str, str], tuple[Decimal, Decimal]] = {}
    for period, period_lines in by_period.items():
        priced = tuple(period_lines)
        charged = charges[period].amount
        if _sum(line.amount for line in priced) > charged:
            priced = _scale_down(priced, charged)
        for line in priced:
            key = (line.provider, line.region, line.accelerator_model)
            seconds_before, amount_before = totals.get(key, (Decimal(0), Decimal(0)))
            totals[key] = (
                EXACT.add(seconds_before, line.seconds),
                EXACT.add(amount_before, line.amount),
            )
    return tuple(RefundLine(*key, *totals[key]) for key in sorted(totals))


def _sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total


def _scale_down(lines: tuple[RefundLine, ...], cap: Decimal) -> tuple[RefundLine, ...]:
    """Assign the capped amount to the lines in order, so their amounts still add up exactly."""
    left = cap
    scaled = []
    for line in lines:
        amount = min(line.amount, left)
        left = EXACT.subtract(left, amount)
        scaled.append(
            RefundLine(line.provider, line.region, line.accelerator_model, line.seconds, amount)
        )
    return tuple(scaled)
