"""Pure metering rules, without network: rate card, sample validation, pricing, refunds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, Inexact
from fractions import Fraction

import pytest

from acsp.v1 import agent_pb2, common_pb2
from scheduler.engine.catalog import Catalog
from services.metering.charging import AttemptTerms, UsageDelta, charge_request_id, plan_charges
from services.metering.convert import window_in
from services.metering.efficiency import UtilizationPoint, longest_low_run
from services.metering.ratecard import (
    AMOUNT_QUANTUM,
    RateCard,
    RateCardHistory,
    RatePolicy,
    Vendor,
    charge,
    charge_units_per_microsecond,
    default_rate_card,
    rate_per_hour,
    rate_per_second,
)
from services.metering.refunds import (
    EndedAttempt,
    HealthFact,
    PeriodCharge,
    decide_refund,
    find_cause,
)
from services.metering.refunds import SampleSlice as Slice
from services.metering.samples import (
    Rejection,
    UsageSample,
    decode_report,
    parse_subject,
)
from services.runtime.errors import InvalidArgument
from tests.metering.helpers import T0, report, sample

CARD = default_rate_card()
NOW = datetime(2026, 12, 4, tzinfo=UTC)


def test_hourly_rate_is_peak_over_24000() -> None:
    # 312 TFLOP/s for one hour is 312 / 24,000 PF-days, exactly.
    assert CARD.rate_per_hour("A100-SXM4-80GB") == Decimal("0.013")
    assert rate_per_hour(Decimal("312")) == Decimal("0.013")
    # 18.7 / 24,000 does not terminate, so it is rounded half-even to the ledger quantum.
    assert CARD.rate_per_hour("P100") == Decimal("0.000779166666666666666667")


def test_second_rate_is_rounded_up() -> None:
    exact = Fraction(312, 86_400_000)
    published = rate_per_second(Decimal("312"))
    assert Fraction(published) >= exact
    assert Fraction(published) - exact < Fraction(AMOUNT_QUANTUM)
    assert CARD.rate_per_second("A100-SXM4-80GB") == published


def test_charge_rounds_once_at_the_end() -> None:
    # A full hour of every model costs its hourly rate, and a charge is within half a
    # ledger quantum of the exact product, for small and large amounts.
    for name, model in CARD.models.items():
        assert CARD.charge(name, Decimal(3600)) == CARD.rate_per_hour(name)
        for seconds in (Decimal("0.000001"), Decimal("1234.567891"), Decimal("31536000000")):
            exact = Fraction(seconds) * Fraction(model.peak_dense_tflops) / 86_400_000
            error = abs(Fraction(CARD.charge(name, seconds)) - exact)
            assert error <= Fraction(AMOUNT_QUANTUM) / 2, (name, seconds)


def test_engine_catalog_matches_rate_card() -> None:
    catalog = Catalog()
    assert set(catalog.names()) == set(CARD.models)
    for name, model in CARD.models.items():
        entry = catalog.get(name)
        assert entry.peak_tflops == model.peak_dense_tflops, name
        assert entry.memory_gib == model.memory_gib, name
        assert entry.vendor == model.vendor.value, name
        assert entry.software_stack == model.software_stacks[0], name
        assert entry.source == model.source, name
    assert catalog.get("G3").memory_gib == 80
    assert CARD.models["G3"].peak_dense_tflops == Decimal(312)


def test_catalog_covers_traces_and_other_vendors() -> None:
    openb = {"G2", "T4", "P100", "V100M16", "V100M32", "G3", "A10"}
    spot = {"A10", "A100-SXM4-80GB", "A800-SXM4-80GB", "H800", "GPU-series-1", "GPU-series-2"}
    assert openb | spot <= set(CARD.models)
    vendors = {model.vendor for model in CARD.models.values()}
    assert {Vendor.AMD, Vendor.HUAWEI, Vendor.CAMBRICON} <= vendors
    assert all(model.source for model in CARD.models.values())


def test_charge_rejects_time_below_a_microsecond() -> None:
    with pytest.raises(Inexact):
        charge(Decimal("1.0000001"), Decimal("989.5"))


def test_rate_card_json_round_trip() -> None:
    assert RateCard.from_json(CARD.to_json()).rates == CARD.rates


def test_fixed_at_award_keeps_its_version() -> None:
    cheaper = [m for m in CARD.models.values()]
    history = RateCardHistory((CARD,)).with_version(cheaper, NOW)
    assert history.for_grant(RatePolicy.FIXED_AT_AWARD, 1).version == 1
    assert history.for_grant(RatePolicy.CURRENT, 1).version == 2


def _decode(
    *items: agent_pb2.UsageSample, provider: str = "prov-a", owner: str | None = None
) -> tuple[list[UsageSample], list[Rejection]]:
    origin = parse_subject("acsp.usage.prov-a.r1.node-1", 7)
    return decode_report(
        report(items, provider=provider),
        origin,
        known_models=CARD.rates,
        node_owner=lambda node: owner,
        now=NOW,
    )


def test_valid_sample_converts_to_integers() -> None:
    accepted, rejected = _decode(sample("s1", "job-1", T0, 60, share_millis=250))
    assert rejected == []
    assert accepted[0].accelerator_micros == 15_000_000
    assert accepted[0].accelerator_seconds == Decimal("15.000000")
    assert accepted[0].start_time == T0
    assert accepted[0].share == Decimal("0.250")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("model", "TPU-v9", "not in the rate card"),
        ("share_millis", 1001, "outside 1..1000"),
        ("task_id", "job-1", "not <job_id>/<attempt>/<task_index>"),
        # Unicode calls these digits, but int() does not take them.
        ("task_id", "job-1/\u00b9/0", "not <job_id>/<attempt>/<task_index>"),
        ("sample_id", "", "sample_id '' is missing"),
    ],
)
def test_invalid_sample_rejected_with_reason(field: str, value: object, reason: str) -> None:
    item = sample("s1", "job-1", T0)
    setattr(item, field, value)
    accepted, rejected = _decode(item, sample("s2", "job-1", T0))
    assert [s.sample_id for s in accepted] == ["s2"]
    assert reason in rejected[0].reason


@pytest.mark.parametrize(
    ("seconds", "reason"),
    [
        ("9" * 5000, "more than 12 integer digits"),
        ("9" * 5000 + ".5", "more than 12 integer digits"),
        ("1e5000", "more than 12 integer digits"),
        ("-1e5000", "more than 12 integer digits"),
        ("1e-5000", "more than 6 decimal places"),
        ("6_0", "not a decimal number"),
        ("\u0666\u0660", "not a decimal number"),
        (" 60", "not a decimal number"),
    ],
)
def test_bad_seconds_reject_only_their_sample(seconds: str, reason: str) -> None:
    item = sample("s1", "job-1", T0)
    item.accelerator_seconds.value = seconds
    accepted, rejected = _decode(item, sample("s2", "job-1", T0))
    assert [s.sample_id for s in accepted] == ["s2"]
    assert len(rejected) == 1
    assert rejected[0].sample_id == "s1"
    assert "accelerator_seconds" in rejected[0].reason
    assert reason in rejected[0].reason


@pytest.mark.parametrize(
    ("start_offset_s", "end_offset_s", "end_nanos", "reason"),
    [
        # Before PostgreSQL's earliest timestamptz: storing it failed the whole batch.
        (-300_000_000_000, -300_000_000_000 + 60, 0, "start_time is -29"),
        (-T0.timestamp(), -T0.timestamp() + 60, 0, "start_time is 0 s since 1970, before 2000"),
        (0, 10**12, 0, "end_time is 1"),
        (0, 60, -5, "end_time has -5 nanoseconds, outside 0..999999999"),
    ],
)
def test_bad_sample_time_rejects_only_its_sample(
    start_offset_s: float, end_offset_s: float, end_nanos: int, reason: str
) -> None:
    """A time that cannot be formatted or stored rejects its sample, not its whole report."""
    item = sample("s1", "job-1", T0)
    item.start_time.seconds = int(T0.timestamp() + start_offset_s)
    item.end_time.seconds = int(T0.timestamp() + end_offset_s)
    item.end_time.nanos = end_nanos
    accepted, rejected = _decode(item, sample("s2", "job-1", T0))
    assert [s.sample_id for s in accepted] == ["s2"]
    assert len(rejected) == 1
    assert reason in rejected[0].reason


@pytest.mark.parametrize("field", ["sample_id", "accelerator_id", "task_id"])
def test_nul_in_sample_rejects_only_it(field: str) -> None:
    """PostgreSQL cannot store U+0000, so such a sample would fail its whole batch's insert."""
    item = sample("s1", "job-1", T0)
    item.job_id = ""  # Left out, so the job id comes from the task id alone.
    value = getattr(item, field)
    setattr(item, field, value[:1] + "\x00" + value[1:])
    accepted, rejected = _decode(item, sample("s2", "job-1", T0))
    assert [s.sample_id for s in accepted] == ["s2"]
    assert len(rejected) == 1
    assert f"{field} " in rejected[0].reason
    assert "contains a NUL character" in rejected[0].reason
    assert "\x00" not in rejected[0].dedupe_key
    assert rejected[0].sample_id is None or "\x00" not in rejected[0].sample_id


def test_invalid_sample_key_names_provider() -> None:
    """Sample ids are unique per provider, so two providers' dead letters must not share a key."""
    keys = []
    for provider in ("prov-a", "prov-b"):
        item = sample("shared/1", "job-1", T0)
        item.share_millis = 0
        accepted, rejected = decode_report(
            report([item], provider=provider),
            parse_subject(f"acsp.usage.{provider}.r1.node-1", 7),
            known_models=CARD.rates,
            node_owner=lambda node: None,
            now=NOW,
        )
        assert accepted == []
        assert len(rejected) == 1
        keys.append(rejected[0].dedupe_key)
    assert keys == ["sample:prov-a/shared/1", "sample:prov-b/shared/1"]


def test_superscript_seconds_rejected() -> None:
    item = sample("s1", "job-1", T0)
    item.accelerator_seconds.value = "\u00b2"
    accepted, rejected = _decode(item)
    assert accepted == []
    assert "not a decimal number" in rejected[0].reason


def test_future_sample_rejected() -> None:
    _, rejected = _decode(sample("s1", "job-1", NOW + timedelta(hours=1)))
    assert "in the future" in rejected[0].reason


def test_report_for_another_providers_node_rejected() -> None:
    accepted, rejected = _decode(sample("s1", "job-1", T0), owner="prov-b")
    assert accepted == []
    assert "belongs to provider 'prov-b'" in rejected[0].reason


def test_report_naming_another_provider_rejected() -> None:
    accepted, rejected = _decode(sample("s1", "job-1", T0), provider="prov-z")
    assert accepted == []
    assert "does not match provider" in rejected[0].reason


def test_garbage_payload_is_one_dead_letter() -> None:
    origin = parse_subject("acsp.usage.prov-a.r1.node-1", 9)
    accepted, rejected = decode_report(
        b"\xff\x00garbage", origin, known_models=CARD.rates, node_owner=lambda n: None, now=NOW
    )
    assert accepted == []
    assert rejected[0].dedupe_key == "seq:9"


def test_plan_groups_by_attempt_and_period() -> None:
    terms = {("job-1", 0): AttemptTerms("hold-1", RatePolicy.CURRENT, None)}
    deltas = [
        UsageDelta("job-1", 0, T0, "p", "r", "T4", Decimal("10")),
        UsageDelta("job-1", 0, T0, "p", "r", "H800", Decimal("5")),
        UsageDelta("job-1", 0, T0 + timedelta(seconds=300), "p", "r", "T4", Decimal("1")),
        UsageDelta("job-2", 0, T0, "p", "r", "T4", Decimal("1")),
    ]
    planned = plan_charges(deltas, terms, {("job-1", 0, T0): 2}, RateCardHistory((CARD,)))
    assert [p.request_id for p in planned] == [
        charge_request_id("job-1", 0, T0, 2),
        charge_request_id("job-1", 0, T0 + timedelta(seconds=300), 0),
    ]
    expected = CARD.charge("T4", Decimal(10)) + CARD.charge("H800", Decimal(5))
    assert planned[0].amount == expected
    assert planned[0].request_id.endswith("/2")


@pytest.mark.parametrize("model", ["A100-SXM4-80GB", "T4", "MI300X", "G2"])
def test_units_per_microsecond_match_charge(model: str) -> None:
    factor = charge_units_per_microsecond(CARD.models[model].peak_dense_tflops)
    for micros in (1, 7, 999_999, 300_000_000, 3_600_000_001, 123_456_789_012):
        seconds = Decimal(micros).scaleb(-6)
        units = round(factor * micros)
        assert CARD.charge(model, seconds) == Decimal(units) * AMOUNT_QUANTUM, micros


def _attempt(**changes: object) -> EndedAttempt:
    values: dict[str, object] = {
        "job_id": "job-1",
        "attempt": 0,
        "hold_id": "hold-1",
        "started_at": T0,
        "ended_at": T0 + timedelta(hours=2),
        "end_reason": "failed",
        "end_trigger": "",
        "last_checkpoint_at": T0 + timedelta(hours=1),
    }
    values.update(changes)
    return EndedAttempt(**values)  # type: ignore[arg-type]


def _fault(xid: int, accelerator: str = "GPU-0", minutes: int = 119) -> HealthFact:
    return HealthFact(
        "e1", accelerator, "node-1", "xid", xid, True, T0 + timedelta(minutes=minutes)
    )


def test_fatal_xid_on_used_accelerator_is_the_cause() -> None:
    cause = find_cause(_attempt(), [_fault(79)], frozenset({"GPU-0"}), frozenset(), timedelta(0))
    assert cause is not None
    assert cause[0] == "xid 79 on GPU-0"


def test_application_xid_or_other_accelerator_is_not() -> None:
    used = frozenset({"GPU-0"})
    assert find_cause(_attempt(), [_fault(13)], used, frozenset(), timedelta(0)) is None
    assert find_cause(_attempt(), [_fault(79, "GPU-9")], used, frozenset(), timedelta(0)) is None
    completed = _attempt(end_reason="completed")
    assert find_cause(completed, [_fault(79)], used, frozenset(), timedelta(0)) is None


def test_named_fault_elsewhere_is_not() -> None:
    """A fault that an agent named counts only on the attempt's own accelerators or nodes."""
    used = frozenset({"GPU-0"})
    named = _attempt(end_reason="completed", end_trigger="health:e1")
    on_ours = find_cause(named, [_fault(79)], used, frozenset({"node-1"}), timedelta(0))
    assert on_ours is not None
    elsewhere = find_cause(named, [_fault(79, "GPU-9")], used, frozenset(), timedelta(0))
    assert elsewhere is None
    node_wide = _fault(79, "")
    other_node = find_cause(named, [node_wide], used, frozenset({"node-2"}), timedelta(0))
    assert other_node is None


def _minute_slices(minutes: range, model: str = "T4") -> list[Slice]:
    """One 60-second slice a minute from T0, in five-minute charging periods."""
    return [
        Slice(
            T0 + timedelta(minutes=m),
            T0 + timedelta(minutes=m - m % 5),
            "p",
            "r",
            model,
            "GPU-0",
            "n",
            Decimal(60),
        )
        for m in minutes
    ]


def _period_charges(
    minutes: range, card: RateCard, model: str = "T4"
) -> dict[datetime, PeriodCharge]:
    """Charges of every five-minute period starting in ``minutes``, each priced with ``card``."""
    return {
        T0 + timedelta(minutes=m): PeriodCharge(card.charge(model, Decimal(300)), (card,))
        for m in minutes[::5]
    }


def test_refund_bounded_and_capped_by_charges() -> None:
    slices = _minute_slices(range(120))
    attempt = _attempt(last_checkpoint_at=None)
    cause = ("xid 79 on GPU-0", T0 + timedelta(hours=2))
    charges = _period_charges(range(120), CARD)
    decision = decide_refund(attempt, cause, slices, charges, timedelta(minutes=10))
    assert decision is not None
    assert decision.amount == 2 * CARD.charge("T4", Decimal(300))
    tiny_charges = {start: PeriodCharge(Decimal("1e-9"), (CARD,)) for start in charges}
    tiny = decide_refund(attempt, cause, slices, tiny_charges, timedelta(minutes=10))
    assert tiny is not None
    assert tiny.amount == Decimal("2e-9")
    assert sum(line.amount for line in tiny.lines) == Decimal("2e-9")


def test_refund_after_rate_rise_keeps_old_rate() -> None:
    # Version 2 doubles the T4's price from 1:00. The job ran two hours with a checkpoint at
    # 0:30, so 30 lost minutes were charged at the old rate and 60 at the new one.
    doubled = [
        replace(m, peak_dense_tflops=m.peak_dense_tflops * 2) if m.name == "T4" else m
        for m in CARD.models.values()
    ]
    new_card = RateCardHistory((CARD,)).with_version(doubled, T0 + timedelta(hours=1)).current
    charges = _period_charges(range(60), CARD) | _period_charges(range(60, 120), new_card)
    attempt = _attempt(last_checkpoint_at=T0 + timedelta(minutes=30))
    cause = ("xid 79 on GPU-0", T0 + timedelta(hours=2))
    decision = decide_refund(
        attempt, cause, _minute_slices(range(120)), charges, timedelta(hours=6)
    )
    assert decision is not None
    old_time = 6 * CARD.charge("T4", Decimal(300))
    new_time = 12 * new_card.charge("T4", Decimal(300))
    assert decision.amount == old_time + new_time
    assert decision.seconds == 90 * 60


def test_refund_takes_cheapest_charged_version() -> None:
    # Late usage of the first period was charged at a dearer version 2. The second period has
    # no committed charge, so it refunds nothing.
    doubled = [replace(m, peak_dense_tflops=m.peak_dense_tflops * 2) for m in CARD.models.values()]
    new_card = RateCardHistory((CARD,)).with_version(doubled, T0).current
    charged = CARD.charge("T4", Decimal(240)) + new_card.charge("T4", Decimal(60))
    charges = {T0: PeriodCharge(charged, (new_card, CARD))}
    attempt = _attempt(last_checkpoint_at=None, ended_at=T0 + timedelta(minutes=10))
    cause = ("xid 79 on GPU-0", T0 + timedelta(minutes=10))
    decision = decide_refund(attempt, cause, _minute_slices(range(10)), charges, timedelta(hours=6))
    assert decision is not None
    assert decision.amount == CARD.charge("T4", Decimal(300))
    assert decision.seconds == 300


@pytest.mark.parametrize(
    ("checkpoint_minute", "max_lost_minutes", "expected"),
    [
        (90, 360, "xid 79 on GPU-0, 1,800 s since the last checkpoint"),
        (None, 360, "xid 79 on GPU-0, 7,200 s since the attempt started"),
        (
            None,
            10,
            "xid 79 on GPU-0, the last 600 s (the maximum refunded) of 7,200 s"
            " since the attempt started",
        ),
        (
            30,
            10,
            "xid 79 on GPU-0, the last 600 s (the maximum refunded) of 5,400 s"
            " since the last checkpoint",
        ),
    ],
)
def test_refund_reason_names_checkpoint_or_start(
    checkpoint_minute: int | None, max_lost_minutes: int, expected: str
) -> None:
    checkpoint = None if checkpoint_minute is None else T0 + timedelta(minutes=checkpoint_minute)
    attempt = _attempt(last_checkpoint_at=checkpoint)
    cause = ("xid 79 on GPU-0", T0 + timedelta(hours=2))
    charges = _period_charges(range(120), CARD)
    max_lost = timedelta(minutes=max_lost_minutes)
    decision = decide_refund(attempt, cause, _minute_slices(range(120)), charges, max_lost)
    assert decision is not None
    assert decision.reason == expected


def test_refund_counts_sample_before_recorded_start() -> None:
    # The agent's only sample starts 0.3 s before the scheduler recorded the start.
    started = T0 + timedelta(seconds=10)
    slices = [Slice(started - timedelta(seconds=0.3), T0, "p", "r", "T4", "GPU-0", "n", Decimal(4))]
    attempt = _attempt(started_at=started, last_checkpoint_at=None, end_reason="preempted")
    cause = ("provider recall rc-1", started + timedelta(seconds=4))
    charges = {T0: PeriodCharge(Decimal(1), (CARD,))}
    decision = decide_refund(attempt, cause, slices, charges, timedelta(hours=6))
    assert decision is not None
    assert decision.amount == CARD.charge("T4", Decimal(4))


def test_low_run_breaks_on_gaps() -> None:
    def point(minute: int, utilization: float) -> UtilizationPoint:
        start = T0 + timedelta(minutes=minute)
        return UtilizationPoint(start, start + timedelta(minutes=1), utilization)

    points = [point(m, 0.01) for m in range(10)]
    points += [point(10, 0.9)]
    points += [point(m, 0.0) for m in range(11, 31)]
    points += [point(m, 0.0) for m in range(40, 70)]  # after a 9-minute silence
    run = longest_low_run(points, 0.1)
    assert run.seconds == 30 * 60
    assert run.start == T0 + timedelta(minutes=40)


@pytest.mark.parametrize(
    ("end_offset_s", "relation"), [(0, "equals start"), (-3600, "is before start")]
)
def test_window_rejects_end_not_after_start(end_offset_s: int, relation: str) -> None:
    window = common_pb2.TimeWindow()
    window.start_time.FromDatetime(NOW)
    window.end_time.FromDatetime(NOW + timedelta(seconds=end_offset_s))
    with pytest.raises(InvalidArgument) as caught:
        window_in("period", window)
    assert caught.value.field == "period"
    assert relation in caught.value.reason
    assert "2026-12-04T00:00:00+00:00" in caught.value.reason
