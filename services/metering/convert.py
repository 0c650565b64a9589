"""Conversions between metering's values and the protobuf messages at its edges."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from acsp import decimals
from acsp.subjects import TOKEN_PATTERN
from acsp.v1 import common_pb2, metering_pb2
from services.metering.ratecard import (
    AcceleratorModel,
    RateCard,
    Vendor,
)
from services.runtime.errors import InvalidArgument, quoted

DERIVATION: Final = (
    "charge = accelerator-seconds x peak dense TFLOP/s at the reference precision / "
    "86,400,000, rounded half-even once to 1e-24 PF-day; the hourly rate is the peak / 24,000 "
    "rounded half-even to 1e-24, the per-second rate the peak / 86,400,000 rounded up to 1e-24"
)
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
MAX_PEAK_TFLOPS: Final = Decimal(1_000_000)
"""Largest peak of one accelerator model, TFLOP/s: 1 EFLOP/s, over 700 times the MI300X's
1,307.4. It keeps charges far below the ledger's maximum of 10^24 PF-days."""
PEAK_QUANTUM: Final = Decimal("1e-6")
"""Finest step of a published peak, TFLOP/s. The built-in catalog's peaks have at most one
decimal place, and the bound keeps exact pricing fast: a peak such as 1e-10000000 would make the
service compute with integers of millions of digits."""
_PEAK_CONTEXT: Final = Context(prec=20, traps=[Inexact, InvalidOperation])
"""Enough digits for any peak up to MAX_PEAK_TFLOPS on PEAK_QUANTUM, and any rounding raises."""
MAX_RATE_CARD_MODELS: Final = 256
MAX_MODEL_TEXT: Final = 64
"""Characters in a reference precision or software stack name."""
MAX_MODEL_SOURCE: Final = 500
MAX_SOFTWARE_STACKS: Final = 16
"""These limits keep a serialized rate card under an estimated 500 KB (256 models of about 1.8 KB),
within NATS's default maximum payload of 1 MiB, so every stored version fits the rate-card KV
bucket."""
MAX_TOKEN_NUMBER: Final = 2**63 - 1
"""Largest key a numeric page token can name: the maximum of a PostgreSQL ``bigint``."""
MAX_ATTEMPT: Final = 2**31 - 1
"""Largest attempt number: the maximum of a PostgreSQL ``integer``, the type of ``attempt``."""

_VENDOR_OUT: Final = {
    Vendor.NVIDIA: common_pb2.VENDOR_NVIDIA,
    Vendor.AMD: common_pb2.VENDOR_AMD,
    Vendor.HUAWEI: common_pb2.VENDOR_HUAWEI,
    Vendor.CAMBRICON: common_pb2.VENDOR_CAMBRICON,
    Vendor.OTHER: common_pb2.VENDOR_OTHER,
}
_VENDOR_IN: Final = {number: vendor for vendor, number in _VENDOR_OUT.items()}


def decimal_out(value: Decimal) -> common_pb2.Decimal:
    return decimals.to_proto(value)


def decimal_in(field: str, message: common_pb2.Decimal) -> Decimal:
    not_decimal = InvalidArgument(
        field, f"{quoted(message.value)} is not a decimal number", "give digits such as '312.5'"
    )
    # Decimal() also reads digit group underscores, non-ASCII digits and surrounding spaces,
    # so '3_12' would be 312 where the caller mistyped.
    text = message.value
    if not text.isascii() or "_" in text or text != text.strip():
        raise not_decimal
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise not_decimal from None
    if not value.is_finite():
        raise InvalidArgument(field, f"{message.value!r} is not finite", "give a finite number")
    return value


def time_out(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timestamp_in(field: str, stamp: Timestamp) -> datetime:
    """Convert a timestamp, raising InvalidArgument naming ``field`` when it is out of range."""
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except ValueError:
        raise InvalidArgument(
            field,
            f"{stamp.seconds} s, {stamp.nanos} ns since 1970 is not a valid time",
            "give a time from 0001-01-01 to 9999-12-31 (UTC) with 0 to 999,999,999 ns",
        ) from None


def window_in(field: str, window: common_pb2.TimeWindow) -> tuple[datetime, datetime]:
    if not window.HasField("start_time") or not window.HasField("end_time"):
        raise InvalidArgument(field, "is missing its start or end", "give both start and end")
    start = timestamp_in(f"{field}.start_time", window.start_time)
    end = timestamp_in(f"{field}.end_time", window.end_time)
    if end <= start:
        relation = "equals" if end == start else "is before"
        raise InvalidArgument(
            field,
            f"end {end.isoformat()} {relation} start {start.isoformat()}",
            "give an end after the start",
        )
    return start, end


def job_filter_in(field: str, job_id: str) -> str:
    """Return a job id that filters a list, or "" for none.

    Raises InvalidArgument for an id the scheduler never makes. Its ids are ``j`` and 20 hex
    digits, with ``-<index>`` for an element of a job array, so they match TOKEN_PATTERN.
    """
    if job_id and not TOKEN_PATTERN.match(job_id):
        raise InvalidArgument(
            field,
            f"{quoted(job_id)} is not a job id",
            "pass an id as SubmitJob or ListJobs returns it (1 to 64 ASCII letters, digits, "
            "'_' or '-'), or leave it empty for every job",
        )
    return job_id


def page_in(page: common_pb2.PageRequest) -> tuple[int, str]:
    size = page.page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page.page_size", f"{size} is above {MAX_PAGE_SIZE}", f"ask for at most {MAX_PAGE_SIZE}"
        )
    return size, page.page_token


def number_token(token: str) -> int:
    """Return the key after which a numbered list continues, or 0 for an empty token."""
    if not token:
        return 0
    if not (token.isascii() and token.isdigit()) or int(token) > MAX_TOKEN_NUMBER:
        raise InvalidArgument(
            "page.page_token",
            f"{token!r} is not a token this list returned",
            "pass next_page_token of the previous page, or leave it empty for the first page",
        )
    return int(token)


def page_out(last_key: str | None, count: int, limit: int) -> common_pb2.PageResponse:
    """Return the next-page token: the last key of a full page, else empty."""
    token = last_key if last_key is not None and count == limit else ""
    return common_pb2.PageResponse(next_page_token=token)


def rate_card_out(card: RateCard) -> metering_pb2.RateCard:
    return metering_pb2.RateCard(
        version=card.version,
        effective_time=time_out(card.effective_from),
        derivation=DERIVATION,
        rates=[
            metering_pb2.Rate(
                model=common_pb2.AcceleratorModel(
                    name=model.name,
                    vendor=_VENDOR_OUT[model.vendor],
                    memory_gib=model.memory_gib,
                    peak_dense_tflops=decimal_out(model.peak_dense_tflops),
                    reference_precision=model.reference_precision,
                    software_stacks=list(model.software_stacks),
                    source=model.source,
                ),
                pf_days_per_accelerator_second=decimal_out(card.rate_per_second(model.name)),
                pf_days_per_accelerator_hour=decimal_out(card.rate_per_hour(model.name)),
            )
            for model in card.models.values()
        ],
    )


def effective_time_in(message: metering_pb2.RateCard, now: datetime) -> datetime:
    """Return when a rate card to publish takes effect: its effective time, or ``now``.

    The highest version prices all usage from the moment it is published, so a later
    effective time would be shown but not applied.
    """
    if not message.HasField("effective_time"):
        return now
    effective = timestamp_in("rate_card.effective_time", message.effective_time)
    if effective > now:
        raise InvalidArgument(
            "rate_card.effective_time",
            f"{effective.isoformat()} is after the time of publishing, {now.isoformat()}, "
            "but a version takes effect when it is published",
            "leave it unset, and publish the version when its rates should apply",
        )
    return effective


def models_in(message: metering_pb2.RateCard) -> list[AcceleratorModel]:
    """Validate the catalog of a rate card to publish; rates are derived, never taken."""
    if not message.rates:
        raise InvalidArgument("rate_card.rates", "is empty", "give at least one model")
    if len(message.rates) > MAX_RATE_CARD_MODELS:
        raise InvalidArgument(
            "rate_card.rates",
            f"has {len(message.rates)} models, above the maximum of {MAX_RATE_CARD_MODELS}",
            "publish only the models that providers pledge",
        )
    models = []
    seen: set[str] = set()
    for index, rate in enumerate(message.rates):
        field = f"rate_card.rates[{index}].model"
        model = rate.model
        if not model.name or model.name in seen:
            raise InvalidArgument(
                f"{field}.name", f"{model.name!r} is empty or repeated", "name each model once"
            )
        if not TOKEN_PATTERN.match(model.name):
            raise InvalidArgument(
                f"{field}.name",
                f"{quoted(model.name)} is not a model name that agents can report",
                "use 1 to 64 ASCII letters, digits, '_' or '-', as in 'A100-SXM4-80GB'",
            )
        seen.add(model.name)
        _check_model_texts(field, model)
        vendor = _VENDOR_IN.get(model.vendor)
        if vendor is None:
            raise InvalidArgument(f"{field}.vendor", "is not set", "set the model's vendor")
        peak = decimal_in(f"{field}.peak_dense_tflops", model.peak_dense_tflops)
        if peak <= 0:
            raise InvalidArgument(
                f"{field}.peak_dense_tflops", f"{peak} is not positive", "give TFLOP/s above 0"
            )
        if peak > MAX_PEAK_TFLOPS:
            raise InvalidArgument(
                f"{field}.peak_dense_tflops",
                f"{peak} is above the maximum of {MAX_PEAK_TFLOPS} TFLOP/s",
                "give the peak of one accelerator in TFLOP/s, not in FLOP/s or of a node",
            )
        try:
            peak.quantize(PEAK_QUANTUM, context=_PEAK_CONTEXT)
        except Inexact:
            raise InvalidArgument(
                f"{field}.peak_dense_tflops",
                f"{quoted(model.peak_dense_tflops.value)} has more than 6 decimal places",
                "give the peak in TFLOP/s to at most 0.000001, e.g. '989.4'",
            ) from None
        if not model.source:
            raise InvalidArgument(
                f"{field}.source", "is missing", "name the datasheet the peak figure comes from"
            )
        models.append(
            AcceleratorModel(
                name=model.name,
                vendor=vendor,
                memory_gib=model.memory_gib,
                peak_dense_tflops=peak,
                reference_precision=model.reference_precision or "bf16-tensor",
                software_stacks=tuple(model.software_stacks),
                source=model.source,
            )
        )
    return models


def _check_model_texts(field: str, model: common_pb2.AcceleratorModel) -> None:
    """Raise InvalidArgument naming the first text of ``model`` that is over its length limit."""
    if len(model.source) > MAX_MODEL_SOURCE:
        raise InvalidArgument(
            f"{field}.source",
            f"is {len(model.source)} characters long, above the maximum of {MAX_MODEL_SOURCE}",
            "name the datasheet, or link to it, in fewer characters",
        )
    if len(model.software_stacks) > MAX_SOFTWARE_STACKS:
        raise InvalidArgument(
            f"{field}.software_stacks",
            f"has {len(model.software_stacks)} entries, above the maximum of {MAX_SOFTWARE_STACKS}",
            "list only the stacks that jobs ask for",
        )
    texts = [("reference_precision", model.reference_precision)]
    texts += [(f"software_stacks[{i}]", stack) for i, stack in enumerate(model.software_stacks)]
    for name, text in texts:
        if len(text) > MAX_MODEL_TEXT:
            raise InvalidArgument(
                f"{field}.{name}",
                f"is {len(text)} characters long, above the maximum of {MAX_MODEL_TEXT}",
                f"keep it to {MAX_MODEL_TEXT} characters",
            )
