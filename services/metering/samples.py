"""Usage samples: decoding a UsageReport from the wire and validating each sample.

Protobuf stops here. :func:`decode_report` turns one NATS message into :class:`UsageSample`
values and :class:`Rejection` values (one per invalid sample, or one for the whole message when
it cannot be parsed), so one bad sample never holds back the rest of its report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, Inexact, InvalidOperation
from typing import Final, NamedTuple

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.subjects import TOKEN_PATTERN
from acsp.v1 import agent_pb2
from services.metering.ratecard import EXACT, SECONDS_QUANTUM

MAX_ID_LENGTH: Final = 256
MAX_SECONDS_DIGITS: Final = 12
"""Integer digits of accelerator-seconds that ingest parses. A 24 h interval covers at most 86,400
accelerator-seconds, and the bound keeps ``int()`` below the 4,300-digit default limit on
converting a string that CPython has applied since 3.11."""
MAX_INTERVAL_NS: Final = 24 * 3600 * 1_000_000_000
"""Maximum interval one sample may cover (24 h); agents report every few seconds."""
MAX_CLOCK_SKEW: Final = timedelta(minutes=10)
"""How far in the future a sample may end, to allow for agent clock skew."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
EARLIEST_SAMPLE_TIME: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""Samples that start or end before this come from a node whose clock is wrong."""
EARLIEST_SAMPLE_SECONDS: Final = int(EARLIEST_SAMPLE_TIME.timestamp())
LATEST_TIMESTAMP_SECONDS: Final = 253_402_300_799
"""9999-12-31T23:59:59Z, the last second a protobuf Timestamp may hold."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Source of a message: its subject tokens and its JetStream sequence."""

    subject: str
    provider: str
    region: str
    node: str
    stream_sequence: int


class UsageSample(NamedTuple):
    """One validated sample: an attempt's use of one accelerator over one interval.

    Times and amounts are integers (microseconds, thousandths), exact and cheap: ingest builds
    tens of thousands a second. The properties give the usual Decimal and datetime views. A
    NamedTuple is immutable like a frozen dataclass and several times cheaper to create.
    """

    sample_id: str
    job_id: str
    attempt: int
    task_id: str
    provider: str
    region: str
    node: str
    accelerator_id: str
    accelerator_model: str
    share_millis: int
    """Thousandths of the accelerator, 1..1000."""
    start_us: int
    """Interval start, microseconds since the Unix epoch."""
    end_us: int
    accelerator_micros: int
    """Interval x share in accelerator-microseconds (the metering quantum)."""
    utilization: float | None
    """Mean utilization over the interval, 0..1, or None where the device cannot report it."""
    stream_sequence: int

    @property
    def share(self) -> Decimal:
        return Decimal(self.share_millis).scaleb(-3)

    @property
    def start_time(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.start_us)

    @property
    def end_time(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.end_us)

    @property
    def accelerator_seconds(self) -> Decimal:
        return micros_to_seconds(self.accelerator_micros)


def micros_to_seconds(micros: int) -> Decimal:
    """Return accelerator-microseconds as exact accelerator-seconds with six decimal places."""
    return Decimal(micros).scaleb(-6)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A sample or message that failed validation, bound for the dead-letter table."""

    dedupe_key: str
    subject: str
    stream_sequence: int
    sample_id: str | None
    reason: str
    payload: bytes | None
    late_sample: UsageSample | None = None
    """The sample when its age is its only fault. A replay of a stored sample is then a
    duplicate, not a dead letter, because the first delivery charged it."""


class InvalidSample(ValueError):
    """A sample field is invalid; the message names the field and the reason."""


class SampleTooOld(InvalidSample):
    """A sample is valid but starts before the maximum sample age."""

    def __init__(self, message: str, sample: UsageSample) -> None:
        super().__init__(message)
        self.sample = sample


def parse_subject(subject: str, stream_sequence: int) -> Origin:
    """Parse ``acsp.usage.<provider>.<region>.<node>``; raise InvalidSample otherwise."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != "acsp" or parts[1] != "usage":
        raise InvalidSample(f"subject {subject!r} is not acsp.usage.<provider>.<region>.<node>")
    for token in parts[2:]:
        if not TOKEN_PATTERN.match(token):
            raise InvalidSample(f"subject {subject!r} has an invalid token {token!r}")
    return Origin(subject, parts[2], parts[3], parts[4], stream_sequence)


def decode_report(
    data: bytes,
    origin: Origin,
    *,
    known_models: Mapping[str, object],
    node_owner: Callable[[str], str | None],
    now: datetime,
    max_age_s: float | None = None,
) -> tuple[list[UsageSample], list[Rejection]]:
    """Decode one UsageReport and validate its samples.

    ``node_owner`` returns the provider a node is registered to, or None when it is unknown.
    A report for a node registered to another provider than the subject's is a forgery, so
    every sample of it is rejected. A sample that starts more than ``max_age_s`` seconds before
    ``now``, the time metering received it, is rejected too. None accepts samples of any age.
    """
    report = agent_pb2.UsageReport()
    try:
        report.ParseFromString(data)
    except DecodeError as error:
        return [], [_message_rejection(origin, f"not a UsageReport: {error}", data)]
    try:
        _check_report_node(report, origin, node_owner)
    except InvalidSample as error:
        return [], [_message_rejection(origin, str(error), data)]

    accepted: list[UsageSample] = []
    rejected: list[Rejection] = []
    latest_end_ns = _to_ns(now + MAX_CLOCK_SKEW)
    limits = _TimeLimits(latest_end_ns, 0, 0.0)
    if max_age_s is not None:
        limits = _TimeLimits(latest_end_ns, _to_ns(now - timedelta(seconds=max_age_s)), max_age_s)
    tasks: dict[str, tuple[str, int]] = {}
    for index, item in enumerate(report.samples):
        try:
            accepted.append(_convert(item, origin, known_models, limits, tasks))
        except SampleTooOld as error:
            key = sample_dead_letter_key(origin.provider, error.sample.sample_id)
            payload = item.SerializeToString()
            rejected.append(
                Rejection(
                    key,
                    origin.subject,
                    origin.stream_sequence,
                    error.sample.sample_id,
                    str(error),
                    payload,
                    error.sample,
                )
            )
        except InvalidSample as error:
            # PostgreSQL text cannot store U+0000, so such an id is left out of the dead letter.
            sample_id = item.sample_id if item.sample_id and "\x00" not in item.sample_id else None
            key = _sample_key(origin, sample_id, index)
            payload = item.SerializeToString()
            reason = str(error)
            rejected.append(
                Rejection(key, origin.subject, origin.stream_sequence, sample_id, reason, payload)
            )
    return accepted, rejected


def _check_report_node(
    report: agent_pb2.UsageReport, origin: Origin, node_owner: Callable[[str], str | None]
) -> None:
    node = report.node
    if node.node_id and node.node_id != origin.node:
        raise InvalidSample(
            f"node.node_id {node.node_id!r} does not match node {origin.node!r} of the subject"
        )
    if node.provider_id and node.provider_id != origin.provider:
        raise InvalidSample(
            f"node.provider_id {node.provider_id!r} does not match provider "
            f"{origin.provider!r} of the subject"
        )
    owner = node_owner(origin.node)
    if owner is not None and owner != origin.provider:
        raise InvalidSample(
            f"node {origin.node!r} belongs to provider {owner!r}, not {origin.provider!r}: "
            "a provider may report usage only for its own nodes"
        )


class _TimeLimits(NamedTuple):
    """The times a batch accepts, in nanoseconds since the epoch."""

    latest_end_ns: int
    earliest_start_ns: int
    """0 when samples of any age are accepted."""
    max_age_s: float
    """The maximum age that gives ``earliest_start_ns``, for the rejection's reason."""


def _convert(
    item: agent_pb2.UsageSample,
    origin: Origin,
    known_models: Mapping[str, object],
    limits: _TimeLimits,
    tasks: dict[str, tuple[str, int]],
) -> UsageSample:
    # Each protobuf field is read once: ingest converts tens of thousands of samples a second.
    sample_id = item.sample_id
    task_id = item.task_id
    accelerator_id = item.accelerator_id
    model = item.model
    share_millis = item.share_millis

    if not sample_id or len(sample_id) > MAX_ID_LENGTH:
        raise InvalidSample(f"sample_id {sample_id!r} is missing or too long")
    if not accelerator_id or len(accelerator_id) > MAX_ID_LENGTH:
        raise InvalidSample(f"accelerator_id {accelerator_id!r} is missing or too long")
    if "\x00" in sample_id or "\x00" in accelerator_id or "\x00" in task_id:
        # PostgreSQL text cannot store U+0000: the sample would fail its whole batch's insert.
        texts = {"sample_id": sample_id, "accelerator_id": accelerator_id, "task_id": task_id}
        field = next(name for name, text in texts.items() if "\x00" in text)
        raise InvalidSample(f"{field} {texts[field]!r} contains a NUL character (U+0000)")
    parsed = tasks.get(task_id)
    if parsed is None:
        parsed = tasks[task_id] = _parse_task_id(task_id)
    job_id, attempt = parsed

    reported_job = item.job_id
    if reported_job and reported_job != job_id:
        raise InvalidSample(f"job_id {reported_job!r} does not match task_id {task_id!r}")
    if model not in known_models:
        raise InvalidSample(f"model {model!r} is not in the rate card")
    if not 1 <= share_millis <= 1000:
        raise InvalidSample(f"share_millis {share_millis} is outside 1..1000")
    if not item.HasField("start_time") or not item.HasField("end_time"):
        raise InvalidSample("start_time and end_time are required")

    start = item.start_time
    end = item.end_time
    _check_time("start_time", start)
    _check_time("end_time", end)
    start_ns = start.seconds * 1_000_000_000 + start.nanos
    end_ns = end.seconds * 1_000_000_000 + end.nanos
    interval_ns = end_ns - start_ns
    if interval_ns <= 0:
        raise InvalidSample("end_time is not after start_time")
    if interval_ns > MAX_INTERVAL_NS:
        raise InvalidSample(f"interval of {interval_ns / 1e9} s is longer than 24 h")
    if end_ns > limits.latest_end_ns:
        raise InvalidSample(f"end_time {end.ToJsonString()} is in the future")
    micros = _check_accelerator_seconds(item.accelerator_seconds.value, interval_ns, share_millis)

    utilization: float | None = None
    if item.HasField("utilization"):
        metric = item.utilization
        if not metric.unsupported:
            utilization = metric.value
            if not 0.0 <= utilization <= 1.0:
                raise InvalidSample(f"utilization {utilization} is outside 0..1")

    sample = UsageSample(
        sample_id,
        job_id,
        attempt,
        task_id,
        origin.provider,
        origin.region,
        origin.node,
        accelerator_id,
        model,
        share_millis,
        start_ns // 1000,
        end_ns // 1000,
        micros,
        utilization,
        origin.stream_sequence,
    )
    if start_ns < limits.earliest_start_ns:
        # The coverage sweep deletes what the overlap check of such a sample would read. The
        # check comes last, so that the rejection carries a sample valid in every other field.
        raise SampleTooOld(
            f"start_time {start.ToJsonString()} is more than {limits.max_age_s:g} s before "
            "metering received the sample, the maximum age that ACSP_METERING_MAX_SAMPLE_AGE_S "
            "sets, so the sample is not charged",
            sample,
        )
    return sample


def _check_time(field: str, stamp: Timestamp) -> None:
    """Raise InvalidSample unless ``stamp`` is a valid time from EARLIEST_SAMPLE_TIME on.

    Every later step can then format the time and store it in a PostgreSQL ``timestamptz``.
    """
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidSample(f"{field} has {stamp.nanos} nanoseconds, outside 0..999999999")
    if stamp.seconds < EARLIEST_SAMPLE_SECONDS:
        raise InvalidSample(
            f"{field} is {stamp.seconds} s since 1970, before {EARLIEST_SAMPLE_TIME.isoformat()}"
        )
    if stamp.seconds > LATEST_TIMESTAMP_SECONDS:
        raise InvalidSample(f"{field} is {stamp.seconds} s since 1970, after the year 9999")


def _check_accelerator_seconds(text: str, interval_ns: int, share_millis: int) -> int:
    """Parse accelerator-seconds into accelerator-microseconds, checked against the interval."""
    whole, dot, fraction = text.partition(".")
    fast = len(whole) <= MAX_SECONDS_DIGITS and _digits(whole)
    if fast and (not dot or (_digits(fraction) and len(fraction) <= 6)):
        micros = int(whole) * 1_000_000 + (int(fraction.ljust(6, "0")) if dot else 0)
    else:
        micros = _parse_unusual_seconds(text)
    if micros <= 0:
        raise InvalidSample(f"accelerator_seconds {text!r} is not positive")
    # interval_ns x share_millis / 1e6 is the product in microseconds; the agent may round it
    # up by one quantum (1 microsecond).
    if micros * 1_000_000 > interval_ns * share_millis + 1_000_000:
        limit = Decimal(interval_ns * share_millis).scaleb(-12)
        raise InvalidSample(
            f"accelerator_seconds {text} exceeds the interval times the share ({limit})"
        )
    return micros


def _parse_unusual_seconds(text: str) -> int:
    """Parse forms the fast path skips (exponent, sign, trailing zeros past 6 places)."""
    not_decimal = InvalidSample(f"accelerator_seconds {text[:40]!r} is not a decimal number")
    # Decimal() also reads digit group underscores, non-ASCII digits and surrounding spaces.
    if not text.isascii() or "_" in text or text != text.strip():
        raise not_decimal
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise not_decimal from None
    if not value.is_finite():
        raise InvalidSample(f"accelerator_seconds {text!r} is not a finite number")
    if value.adjusted() >= MAX_SECONDS_DIGITS:
        # Checked before quantize, which fails on a value with more digits than EXACT keeps.
        raise InvalidSample(
            f"accelerator_seconds {text[:40]!r} has more than {MAX_SECONDS_DIGITS} integer "
            "digits, far more than any 24 h interval"
        )
    try:
        exact = value.quantize(SECONDS_QUANTUM, context=EXACT)
    except Inexact:
        raise InvalidSample(
            f"accelerator_seconds {text!r} has more than 6 decimal places"
        ) from None
    return int(exact.scaleb(6))


def _parse_task_id(task_id: str) -> tuple[str, int]:
    """Split ``<job_id>/<attempt>/<task_index>`` into the job id and the attempt."""
    if len(task_id) > MAX_ID_LENGTH:
        raise InvalidSample(f"task_id is longer than {MAX_ID_LENGTH} characters")
    parts = task_id.rsplit("/", 2)
    if len(parts) != 3 or not parts[0] or not _digits(parts[1]) or not _digits(parts[2]):
        raise InvalidSample(f"task_id {task_id!r} is not <job_id>/<attempt>/<task_index>")
    return parts[0], int(parts[1])


def _digits(text: str) -> bool:
    """Return True if ``text`` is ASCII digits only, which ``int`` accepts (``'²'`` is not)."""
    return text.isascii() and text.isdigit()


def sample_dead_letter_key(provider: str, sample_id: str) -> str:
    """Return the dead-letter key of an invalid sample.

    It names the provider because sample ids are unique only per provider, so one provider's
    dead letter never hides another's for the same id.
    """
    return f"sample:{provider}/{sample_id}"


def _sample_key(origin: Origin, sample_id: str | None, index: int) -> str:
    if sample_id:
        return sample_dead_letter_key(origin.provider, sample_id)
    return f"seq:{origin.stream_sequence}:{index}"


def _message_rejection(origin: Origin, reason: str, data: bytes) -> Rejection:
    return Rejection(
        f"seq:{origin.stream_sequence}", origin.subject, origin.stream_sequence, None, reason, data
    )


def _to_ns(time: datetime) -> int:
    offset = time - _EPOCH
    return (offset.days * 86_400 + offset.seconds) * 1_000_000_000 + offset.microseconds * 1000
