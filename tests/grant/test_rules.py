"""Pure ledger, amount and review rules, without database or network."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from google.protobuf import timestamp_pb2

from services.grant import ledger_rules as rules
from services.grant.amounts import format_amount, parse_amount
from services.grant.convert import amount_out, signed_out, text_in, time_in
from services.grant.errors import FailedPrecondition, InsufficientBudget, InvalidArgument
from services.grant.ledger_rules import EntryKind, GrantState, HoldBalance, Pot
from services.grant.review_rules import (
    Decision,
    Tier,
    check_requested,
    check_reviewer_conflict,
    check_supplement,
    decide_amount,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
GRANT = GrantState("g1", NOW - timedelta(days=1), NOW + timedelta(days=30), expired=False)
ZERO = Decimal(0)


def pot(name: str = "grant:g1", available: str = "0") -> Pot:
    return Pot(name, Decimal(available), Decimal(available), ZERO, ZERO, ZERO)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-1", "negative"),
        ("abc", "not a decimal number"),
        ("NaN", "not a finite number"),
        ("Infinity", "not a finite number"),
        ("1e-25", "more than 24 decimal places"),
        ("0", "is zero"),
        ("", "is missing"),
        ("1e24", "too large"),
        ("1e1000000", "1E+1000000 is too large"),
        ("-1e999999999", "-1E+999999999 is negative"),
        ("1e-999999999", "1E-999999999 has more than 24 decimal places"),
        ("-1e-999999999", "-1E-999999999 is negative"),
        ("0_5", "not a decimal number"),
        ("\u0665", "not a decimal number"),
    ],
)
def test_parse_amount_rejects_bad_text(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_amount("amount_pf_days", text)
    assert caught.value.field == "amount_pf_days"
    assert reason in str(caught.value)


def test_parse_amount_keeps_every_quantum() -> None:
    largest = "999999999999999999999999.999999999999999999999999"
    assert parse_amount("a", largest) == Decimal(largest)
    assert parse_amount("a", "0.000000000000000000000001") == Decimal("1e-24")
    assert parse_amount("a", "1.5000000000000000000000000000") == Decimal("1.5")


def test_sums_never_round() -> None:
    big = pot(available="999999999999999999999998.999999999999999999999999")
    movement = rules.place_hold(GRANT, big, "h", Decimal("1e-24"), NOW)
    assert movement.pots[0].available == Decimal(
        "999999999999999999999998.999999999999999999999998"
    )


def test_hold_postings_balance() -> None:
    movement = rules.place_hold(GRANT, pot(available="10"), "h", Decimal("4"), NOW)
    assert sum(p.amount for p in movement.postings) == 0
    assert {p.account: p.amount for p in movement.postings} == {
        "grant:g1:available": Decimal(-4),
        "grant:g1:held": Decimal(4),
    }


def test_hold_shortfall_named() -> None:
    with pytest.raises(InsufficientBudget) as caught:
        rules.place_hold(GRANT, pot(available="2"), "h", Decimal("3.5"), NOW)
    assert caught.value.shortfall == Decimal("1.5")
    assert str(caught.value) == (
        "amount_pf_days: grant g1 has 2 PF-days available, 3.5 requested; shortfall 1.5 PF-days"
    )


def test_hold_outside_window_rejected() -> None:
    with pytest.raises(FailedPrecondition, match="not open"):
        rules.place_hold(GRANT, pot(available="5"), "h", Decimal(1), NOW + timedelta(days=31))


def test_charge_beyond_hold_draws_available() -> None:
    placed = rules.place_hold(GRANT, pot(available="10"), "h", Decimal(3), NOW)
    assert placed.hold is not None
    charged = rules.charge(placed.pots[0], placed.hold, Decimal(5))
    after = charged.pots[0]
    assert charged.from_held == 3
    assert after.held == 0
    assert after.available == 5
    assert after.consumed == 5
    assert sum(p.amount for p in charged.postings) == 0


def test_settled_hold_takes_no_charge() -> None:
    placed = rules.place_hold(GRANT, pot(available="10"), "h", Decimal(3), NOW)
    assert placed.hold is not None
    released = rules.release(GRANT, placed.pots[0], placed.hold, settle=True)
    assert released.hold is not None
    with pytest.raises(FailedPrecondition, match="settled"):
        rules.charge(released.pots[0], released.hold, Decimal(1))


def test_release_after_expiry_goes_to_pool() -> None:
    placed = rules.place_hold(GRANT, pot(available="10"), "h", Decimal(3), NOW)
    assert placed.hold is not None
    expired = GrantState("g1", GRANT.starts_at, GRANT.ends_at, expired=True)
    released = rules.release(expired, placed.pots[0], placed.hold, settle=True)
    assert {p.account for p in released.postings} == {"grant:g1:held", "program:pool"}
    assert released.pots[0].available == 7


def test_transfer_limited_by_parent() -> None:
    child = Pot("sub_allocation:s1", ZERO, ZERO, ZERO, ZERO, ZERO)
    with pytest.raises(InsufficientBudget):
        rules.transfer(GRANT, pot(available="5"), child, Decimal(6), NOW)
    moved = rules.transfer(GRANT, pot(available="5"), child, Decimal(5), NOW)
    assert moved.kind is EntryKind.TRANSFER
    assert moved.pots[0].available == 0
    assert moved.pots[1].available == 5


def test_roll_up_shows_child_spending_on_parent() -> None:
    parent = Pot("grant:g1", Decimal(100), Decimal(60), ZERO, ZERO, ZERO)
    child = Pot("sub_allocation:a", Decimal(40), Decimal(20), Decimal(6), Decimal(4), ZERO)
    grandchild = Pot("sub_allocation:b", Decimal(10), Decimal(7), Decimal(1), Decimal(2), ZERO)
    rolled = rules.roll_up(parent, [child], [grandchild])
    assert rolled.held == 7
    assert rolled.charged == 6
    assert rolled.delegated == 40
    assert rolled.available == 60
    assert rolled.sub_allocations_available == 27
    assert rolled.sub_allocations_held == 7
    assert rolled.sub_allocations_charged == 6
    assert rolled.credited == (
        rolled.available + rolled.held + rolled.charged + rolled.sub_allocations_available
    )
    assert rolled.delegated == (
        rolled.sub_allocations_available
        + rolled.sub_allocations_held
        + rolled.sub_allocations_charged
    )


def test_subtree_finds_grandchildren() -> None:
    parents = {"a": None, "b": "a", "c": "b", "d": None}
    assert sorted(rules.subtree(None, parents)) == ["a", "b", "c", "d"]
    assert sorted(rules.subtree("a", parents)) == ["b", "c"]
    assert rules.subtree("c", parents) == []


def test_choose_grant_prefers_earliest_end() -> None:
    early = GrantState("early", GRANT.starts_at, NOW + timedelta(days=2), expired=False)
    late = GrantState("late", GRANT.starts_at, NOW + timedelta(days=90), expired=False)
    candidates = [(late, pot("grant:late", "50")), (early, pot("grant:early", "5"))]
    assert rules.choose_grant(candidates, Decimal(5), NOW)[0].grant_id == "early"
    assert rules.choose_grant(candidates, Decimal(6), NOW)[0].grant_id == "late"
    with pytest.raises(InsufficientBudget):
        rules.choose_grant(candidates, Decimal(51), NOW)


def test_budgets_never_grow_back() -> None:
    """Random operation sequences: available rises only by award, release or refund."""
    rng = random.Random(7)
    for _ in range(200):
        current = rules.award(GRANT, pot(), Decimal(rng.randint(1, 50))).pots[0]
        holds: list[HoldBalance] = []
        for step in range(30):
            before = current.available
            choice = rng.choice(["hold", "charge", "release", "refund"])
            amount = Decimal(rng.randint(1, 20)) / 4
            try:
                if choice == "hold":
                    movement = rules.place_hold(GRANT, current, f"h{step}", amount, NOW)
                elif not holds:
                    continue
                else:
                    hold = rng.choice(holds)
                    if choice == "charge":
                        movement = rules.charge(current, hold, amount)
                    elif choice == "release":
                        movement = rules.release(GRANT, current, hold, settle=rng.random() < 0.5)
                    else:
                        movement = rules.refund(GRANT, current, hold, amount)
            except FailedPrecondition:
                continue
            current = movement.pots[0]
            if movement.hold is not None:
                holds = [h for h in holds if h.hold_id != movement.hold.hold_id]
                holds.append(movement.hold)
            assert sum(p.amount for p in movement.postings) == 0
            assert current.available >= 0
            if current.available > before:
                assert movement.kind in {EntryKind.RELEASE, EntryKind.REFUND}
            assert current.credited == current.available + current.held + current.consumed


def test_expiry_returns_every_pot_to_pool() -> None:
    pots = [pot(available="3"), Pot("sub_allocation:a", Decimal(2), Decimal(2), ZERO, ZERO, ZERO)]
    movement = rules.expire(GRANT, pots)
    assert movement.amount == 5
    assert all(p.available == 0 for p in movement.pots)
    assert sum(p.amount for p in movement.postings if p.account == "program:pool") == 5


def test_crossed_low_fires_once_at_threshold() -> None:
    credited = Decimal(100)
    assert rules.crossed_low(Decimal(11), Decimal(9), credited, Decimal("0.1"))
    assert not rules.crossed_low(Decimal(9), Decimal(8), credited, Decimal("0.1"))
    assert not rules.crossed_low(Decimal(50), Decimal(10), credited, Decimal("0.1"))


def test_window_end_before_start_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        rules.check_window(NOW, NOW - timedelta(seconds=1), "application.validity")
    assert caught.value.field == "application.validity.end_time"


LIMITS = {Tier.EXPLORATORY: Decimal(10), Tier.STANDARD: Decimal(500), Tier.FLAGSHIP: Decimal(5000)}


def test_tier_limit_enforced() -> None:
    check_requested(Tier.STANDARD, Decimal(500), LIMITS)
    with pytest.raises(InvalidArgument):
        check_requested(Tier.STANDARD, Decimal("500.000000000000000000000001"), LIMITS)


def test_reviewer_conflicts() -> None:
    with pytest.raises(FailedPrecondition, match="institution"):
        check_reviewer_conflict("r", "uni-a", "uni-a", {"pi"})
    with pytest.raises(FailedPrecondition, match="member"):
        check_reviewer_conflict("pi", "uni-b", "uni-a", {"pi"})
    check_reviewer_conflict("r", "uni-b", "uni-a", {"pi"})


def test_decisions_need_reason_and_smaller_amount() -> None:
    assert decide_amount(Decision.AWARD, Decimal(10), None, "good") == 10
    assert decide_amount(Decision.AWARD_LESS, Decimal(10), Decimal(4), "scope") == 4
    assert decide_amount(Decision.REJECT, Decimal(10), None, "weak") == 0
    with pytest.raises(InvalidArgument):
        decide_amount(Decision.AWARD, Decimal(10), None, " ")
    with pytest.raises(InvalidArgument):
        decide_amount(Decision.AWARD_LESS, Decimal(10), Decimal(10), "same")


@pytest.mark.parametrize("decision", [Decision.AWARD, Decision.REJECT])
def test_decision_rejects_unused_amount(decision: Decision) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decide_amount(decision, Decimal(10), Decimal(4), "scope")
    assert caught.value.field == "decision.awarded_pf_days"
    assert "takes no amount" in str(caught.value)


def test_supplement_rules() -> None:
    check_supplement(Tier.STANDARD, Decimal(250), False, LIMITS)
    with pytest.raises(InvalidArgument):
        check_supplement(Tier.STANDARD, Decimal(251), False, LIMITS)
    with pytest.raises(FailedPrecondition):
        check_supplement(Tier.STANDARD, Decimal(1), True, LIMITS)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1.6E+2"), "160"),
        (Decimal("1E-25"), "0.0000000000000000000000001"),
        (Decimal("0E-12"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("12.500"), "12.5"),
        (Decimal("1E+23"), "100000000000000000000000"),
        (Decimal("-2.50"), "-2.5"),
        # 48 significant digits fill NUMERIC(48,24) and exceed the default context's 28.
        (
            Decimal("123456789012345678901234.123456789012345678901234"),
            "123456789012345678901234.123456789012345678901234",
        ),
    ],
)
def test_amounts_format_without_exponent(value: Decimal, text: str) -> None:
    assert format_amount(value) == text
    assert signed_out(value).value == text
    if value >= 0:
        assert amount_out(value).value == text


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN"])
def test_amounts_format_keeps_non_finite_names(text: str) -> None:
    assert format_amount(Decimal(text)) == text


def test_amount_messages_without_exponent() -> None:
    limits = {Tier.EXPLORATORY: Decimal(10), Tier.STANDARD: Decimal(100), Tier.FLAGSHIP: Decimal(1)}
    cases = [
        lambda: parse_amount("amount_pf_days", "1E-25"),
        lambda: parse_amount("amount_pf_days", "-1.6E+2"),
        lambda: check_requested(Tier.STANDARD, parse_amount("requested", "160"), limits),
        lambda: decide_amount(Decision.AWARD_LESS, Decimal("1E+2"), Decimal("1.6E+2"), "ok"),
        lambda: check_supplement(Tier.STANDARD, Decimal("6E+1"), False, limits),
    ]
    messages = []
    for case in cases:
        with pytest.raises(InvalidArgument) as caught:
            case()
        messages.append(str(caught.value))
    assert "0.0000000000000000000000001 has more" in messages[0]
    assert "-160 is negative" in messages[1]
    assert "160 exceeds the standard limit of 100 PF-days" in messages[2]
    assert "160 is not less than the requested 100" in messages[3]
    assert "60 exceeds half the standard limit, 50 PF-days" in messages[4]
    assert not [m for m in messages if "E+" in m or "E-" in m]


@pytest.mark.parametrize("field", ["comments", "justification", "decision.reason"])
def test_blank_text_fix_names_field(field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        text_in(field, "  ")
    assert caught.value.field == field
    assert caught.value.reason == "is missing"
    assert caught.value.fix == f"set {field} to text that is not blank"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (7_271_164_800, "2200-06-01T00:00:00+00:00 is outside the years 2000..2199"),
        (-62_135_596_800, "0001-01-01T00:00:00+00:00 is outside the years 2000..2199"),
        (2**62, f"{2**62} s, 0 ns since 1970 is outside the years 2000..2199"),
    ],
)
def test_time_out_of_range_shown_as_time(seconds: int, shown: str) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds)
    with pytest.raises(InvalidArgument) as caught:
        time_in("application.validity.end_time", stamp, present=True)
    assert caught.value.field == "application.validity.end_time"
    assert caught.value.reason == shown
