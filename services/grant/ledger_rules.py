"""Pure ledger rules: postings, balance arithmetic and sub-allocation checks, without I/O.

Every grant and every sub-allocation is a *pot* with three ledger accounts: available, held and
consumed (``grant:<id>:available``, ``sub_allocation:<id>:held``, ...). The program has one
account, ``program:pool``, that funds awards and takes back expired budget. Every movement is a
balanced set of postings that sums to zero.

A sub-allocation is funded by a transfer from its parent's available account, so a child can
never spend more than it was given, and it can only be given what its parent has available.
Holds and charges through a sub-allocation move only its own accounts. The parent's rolled-up
balance (:func:`roll_up`) shows them in its held and charged amounts and, apart, as what its
sub-allocations hold and were charged, while its delegated amount stays what it transferred.
Only award, supplement, release and refund raise a pot's available budget, and only a transfer
from its parent raises a sub-allocation's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal, localcontext
from enum import StrEnum
from typing import Final

from services.grant.amounts import EXACT, ZERO, format_amount
from services.grant.errors import FailedPrecondition, InsufficientBudget, InvalidArgument

PROGRAM_POOL: Final = "program:pool"


class EntryKind(StrEnum):
    """Kind of a ledger entry: one budget movement."""

    AWARD = "award"
    SUPPLEMENT = "supplement"
    HOLD = "hold"
    RELEASE = "release"
    CHARGE = "charge"
    REFUND = "refund"
    EXPIRY = "expiry"
    TRANSFER = "transfer"


@dataclass(frozen=True, slots=True)
class Posting:
    """One signed line of an entry: positive adds to the account, negative takes from it."""

    account: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Pot:
    """The own accounts of a grant or of one sub-allocation, in PF-days."""

    name: str
    """``grant:<id>`` or ``sub_allocation:<id>``; account names append ``:available`` etc."""
    credited: Decimal
    """Award and supplements for a grant, transfers in for a sub-allocation."""
    available: Decimal
    held: Decimal
    consumed: Decimal
    """Charges net of refunds."""
    refunded: Decimal

    def account(self, suffix: str) -> str:
        return f"{self.name}:{suffix}"


@dataclass(frozen=True, slots=True)
class GrantState:
    """The validity window and expiry state of a grant."""

    grant_id: str
    starts_at: datetime
    ends_at: datetime
    expired: bool

    def is_open_at(self, now: datetime) -> bool:
        return not self.expired and self.starts_at <= now < self.ends_at


@dataclass(frozen=True, slots=True)
class HoldBalance:
    """Budget reserved for one job, charged in parts and then released."""

    hold_id: str
    amount: Decimal
    """The amount first held."""
    remaining: Decimal
    """Budget still reserved: ``amount`` less what charges took from it and what was released."""
    charged: Decimal
    refunded: Decimal
    released: Decimal
    settled: bool
    """True once released with ``settle``: the hold takes no more charges."""


@dataclass(frozen=True, slots=True)
class Movement:
    """The result of one ledger operation: the postings and the pots and hold after it."""

    kind: EntryKind
    amount: Decimal
    postings: tuple[Posting, ...]
    pots: tuple[Pot, ...]
    """Every pot the movement changed, after the change."""
    hold: HoldBalance | None = None
    from_held: Decimal = ZERO
    """For a charge, the part taken from the hold; the rest came from available budget."""


def check_balanced(postings: Iterable[Posting]) -> None:
    """Raise AssertionError unless the postings sum to zero, as every entry's must."""
    with localcontext(EXACT):
        total = sum((p.amount for p in postings), ZERO)
    if total != ZERO:
        raise AssertionError(f"unbalanced postings: they sum to {format_amount(total)}")


def _entry(*moves: tuple[str, str, Decimal]) -> tuple[Posting, ...]:
    """Build the postings of (source account, target account, amount) moves, skipping zeros."""
    postings: list[Posting] = []
    for source, target, amount in moves:
        if amount != ZERO:
            postings.append(Posting(source, -amount))
            postings.append(Posting(target, amount))
    check_balanced(postings)
    return tuple(postings)


def _require_available(pot: Pot, amount: Decimal) -> None:
    if pot.available < amount:
        raise InsufficientBudget(pot.name, amount, pot.available, credited=pot.credited)


def _require_open(grant: GrantState, now: datetime) -> None:
    if not grant.is_open_at(now):
        state = "expired" if grant.expired else "not open now"
        raise FailedPrecondition(
            f"grant {grant.grant_id} is {state}: its window is "
            f"{grant.starts_at.isoformat()} to {grant.ends_at.isoformat()}",
            field="grant_id",
        )


def award(grant: GrantState, pot: Pot, amount: Decimal, *, supplement: bool = False) -> Movement:
    """Move ``amount`` from the program pool to a grant's available account."""
    kind = EntryKind.SUPPLEMENT if supplement else EntryKind.AWARD
    if grant.expired:
        raise FailedPrecondition(f"grant {grant.grant_id} has expired", field="grant_id")
    with localcontext(EXACT):
        new = replace(pot, credited=pot.credited + amount, available=pot.available + amount)
    postings = _entry((PROGRAM_POOL, pot.account("available"), amount))
    return Movement(kind, amount, postings, (new,))


def transfer(
    grant: GrantState, parent: Pot, child: Pot, amount: Decimal, now: datetime
) -> Movement:
    """Fund a sub-allocation with ``amount`` of its parent's available budget.

    Raises InsufficientBudget naming the shortfall when the parent has less available.
    """
    if grant.expired or now >= grant.ends_at:
        raise FailedPrecondition(f"grant {grant.grant_id} has ended", field="grant_id")
    _require_available(parent, amount)
    with localcontext(EXACT):
        new_parent = replace(parent, available=parent.available - amount)
        new_child = replace(
            child, credited=child.credited + amount, available=child.available + amount
        )
    postings = _entry((parent.account("available"), child.account("available"), amount))
    return Movement(EntryKind.TRANSFER, amount, postings, (new_parent, new_child))


def place_hold(
    grant: GrantState, pot: Pot, hold_id: str, amount: Decimal, now: datetime
) -> Movement:
    """Reserve ``amount`` of a pot for one job.

    Raises FailedPrecondition when the grant is outside its window, and InsufficientBudget
    naming the shortfall when the pot has less than ``amount`` available.
    """
    _require_open(grant, now)
    _require_available(pot, amount)
    with localcontext(EXACT):
        new = replace(pot, available=pot.available - amount, held=pot.held + amount)
    hold = HoldBalance(
        hold_id=hold_id,
        amount=amount,
        remaining=amount,
        charged=ZERO,
        refunded=ZERO,
        released=ZERO,
        settled=False,
    )
    postings = _entry((pot.account("available"), pot.account("held"), amount))
    return Movement(EntryKind.HOLD, amount, postings, (new,), hold)


def charge(pot: Pot, hold: HoldBalance, amount: Decimal) -> Movement:
    """Consume ``amount`` against a hold: first what it still holds, then available budget.

    A charge may exceed the hold (a job that ran longer than admitted) or arrive after the hold
    was released (a late usage sample). The excess must then be available in the pot, or
    InsufficientBudget is raised and nothing changes. A settled hold takes no more charges.
    """
    if hold.settled:
        raise FailedPrecondition(
            f"hold {hold.hold_id} is settled and takes no more charges", field="hold_id"
        )
    with localcontext(EXACT):
        from_held = min(amount, hold.remaining)
        from_available = amount - from_held
        _require_available(pot, from_available)
        new = replace(
            pot,
            held=pot.held - from_held,
            available=pot.available - from_available,
            consumed=pot.consumed + amount,
        )
        new_hold = replace(
            hold, remaining=hold.remaining - from_held, charged=hold.charged + amount
        )
    postings = _entry(
        (pot.account("held"), pot.account("consumed"), from_held),
        (pot.account("available"), pot.account("consumed"), from_available),
    )
    return Movement(EntryKind.CHARGE, amount, postings, (new,), new_hold, from_held)


def release(grant: GrantState, pot: Pot, hold: HoldBalance, *, settle: bool) -> Movement:
    """Return a hold's remaining budget to its pot, or to the program pool if the grant expired.

    With ``settle`` the hold also stops taking charges. Releasing a hold with nothing remaining
    moves nothing and returns an amount of zero.
    """
    amount = hold.remaining
    target = PROGRAM_POOL if grant.expired else pot.account("available")
    with localcontext(EXACT):
        if grant.expired:
            new = replace(pot, held=pot.held - amount)
        else:
            new = replace(pot, held=pot.held - amount, available=pot.available + amount)
        new_hold = replace(
            hold, remaining=ZERO, released=hold.released + amount, settled=hold.settled or settle
        )
    postings = _entry((pot.account("held"), target, amount))
    return Movement(EntryKind.RELEASE, amount, postings, (new,), new_hold)


def refund(grant: GrantState, pot: Pot, hold: HoldBalance, amount: Decimal) -> Movement:
    """Give back ``amount`` of what was charged against a hold, e.g. time lost to a fault.

    The refund goes to the pot's available account, or to the program pool if the grant has
    expired. A hold can be refunded at most what was charged against it.
    """
    with localcontext(EXACT):
        refundable = hold.charged - hold.refunded
        if amount > refundable:
            raise FailedPrecondition(
                f"refund of {format_amount(amount)} PF-days exceeds the "
                f"{format_amount(refundable)} PF-days charged on hold "
                f"{hold.hold_id} and not yet refunded",
                field="amount_pf_days",
            )
        target = PROGRAM_POOL if grant.expired else pot.account("available")
        available = pot.available if grant.expired else pot.available + amount
        new = replace(
            pot, consumed=pot.consumed - amount, available=available, refunded=pot.refunded + amount
        )
        new_hold = replace(hold, refunded=hold.refunded + amount)
    postings = _entry((pot.account("consumed"), target, amount))
    return Movement(EntryKind.REFUND, amount, postings, (new,), new_hold)


def expire(grant: GrantState, pots: Sequence[Pot]) -> Movement:
    """Return the available budget of a grant and all its sub-allocations to the program pool.

    Budget still held by running jobs stays held; releasing it later returns it to the pool.
    """
    with localcontext(EXACT):
        amount = sum((p.available for p in pots), ZERO)
    new_pots = tuple(replace(p, available=ZERO) for p in pots)
    postings = _entry(*((p.account("available"), PROGRAM_POOL, p.available) for p in pots))
    return Movement(EntryKind.EXPIRY, amount, postings, new_pots)


def choose_grant(
    candidates: Sequence[tuple[GrantState, Pot]], amount: Decimal, now: datetime
) -> tuple[GrantState, Pot]:
    """Pick the grant that pays a project-level hold: the open one that expires first and can.

    Raises InsufficientBudget naming the largest available budget when no open grant can pay
    the whole amount, and FailedPrecondition when the project has no open grant.
    """
    open_grants = sorted(
        (c for c in candidates if c[0].is_open_at(now)), key=lambda c: (c[0].ends_at, c[0].grant_id)
    )
    if not open_grants:
        raise FailedPrecondition(
            "the project has no open grant: apply for one or wait for its window to start",
            field="project_id",
        )
    for grant, pot in open_grants:
        if pot.available >= amount:
            return grant, pot
    _, best = max(open_grants, key=lambda c: c[1].available)
    raise InsufficientBudget(
        best.name,
        amount,
        best.available,
        context="no open grant of the project can pay it all; the largest, ",
    )


@dataclass(frozen=True, slots=True)
class RolledBalance:
    """A pot's balance including its sub-allocations, as reported to callers, in PF-days.

    Until the grant expires, ``credited`` is ``available + held + charged +
    sub_allocations_available``, and ``delegated`` is the sum of the three
    ``sub_allocations_*`` amounts.
    """

    credited: Decimal
    held: Decimal
    """Held on the pot and on every sub-allocation below it."""
    charged: Decimal
    """Charged, net of refunds, to the pot and to every sub-allocation below it."""
    refunded: Decimal
    delegated: Decimal
    """Transferred to the sub-allocations directly below: all they were ever credited, which
    their holds and charges do not change."""
    available: Decimal
    """Available to the pot's own jobs, outside its sub-allocations."""
    sub_allocations_available: Decimal = ZERO
    """Available in the sub-allocations below: delegated and not yet held or charged."""
    sub_allocations_held: Decimal = ZERO
    """The part of ``held`` that jobs drawing on the sub-allocations below hold."""
    sub_allocations_charged: Decimal = ZERO
    """The part of ``charged`` that the sub-allocations below were charged."""


def roll_up(pot: Pot, children: Iterable[Pot], deeper: Iterable[Pot]) -> RolledBalance:
    """Sum a pot with every sub-allocation below it, so a child's charge shows on each parent.

    ``children`` are the sub-allocations directly below the pot, and ``deeper`` the ones below
    those. Only transfers to the children count as delegated, since a grandchild is funded
    from its parent's budget, not from the pot's.
    """
    with localcontext(EXACT):
        delegated = held = charged = refunded = available = ZERO
        for child in children:
            delegated += child.credited
            held += child.held
            charged += child.consumed
            refunded += child.refunded
            available += child.available
        for below in deeper:
            held += below.held
            charged += below.consumed
            refunded += below.refunded
            available += below.available
        return RolledBalance(
            credited=pot.credited,
            held=pot.held + held,
            charged=pot.consumed + charged,
            refunded=pot.refunded + refunded,
            delegated=delegated,
            available=pot.available,
            sub_allocations_available=available,
            sub_allocations_held=held,
            sub_allocations_charged=charged,
        )


def subtree(root: str | None, parents: Mapping[str, str | None]) -> list[str]:
    """Return the ids of every sub-allocation below ``root``, or below the grant when None.

    ``parents`` maps each sub-allocation id of one grant to its parent's id, None for the grant.
    """
    children: dict[str | None, list[str]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[str] = []
    stack = list(children.get(root, ()))
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, ()))
    return found


def check_window(starts_at: datetime, ends_at: datetime, field: str = "validity") -> None:
    """Raise InvalidArgument naming ``field`` unless the window ends after it starts."""
    if ends_at <= starts_at:
        raise InvalidArgument(
            f"{field}.end_time",
            f"{ends_at.isoformat()} is not after the start {starts_at.isoformat()}",
            "give an end time later than the start time",
        )


def crossed_low(before: Decimal, after: Decimal, credited: Decimal, fraction: Decimal) -> bool:
    """Return whether available budget just fell below ``fraction`` of what was credited."""
    with localcontext(EXACT):
        threshold = credited * fraction
    return before >= threshold > after


def low_state(
    notified: bool, before: Decimal, after: Decimal, credited: Decimal, fraction: Decimal
) -> tuple[bool, bool]:
    """Return whether to notify a fall below the low threshold now, and the flag to store.

    A pot is notified once per fall: the flag is set when available budget crosses below
    ``fraction`` of credited, and cleared when it rises back to that threshold or above, so
    that the next fall is notified again.
    """
    if not notified:
        crossed = crossed_low(before, after, credited, fraction)
        return crossed, crossed
    with localcontext(EXACT):
        recovered = after >= credited * fraction
    return False, not recovered
