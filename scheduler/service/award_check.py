"""Reject at submit a job whose hold is larger than its grant could ever pay.

A hold is ``accelerators x wall time x rate`` of the accelerator model the job is placed on, and
the grant service places it only on a grant or sub-allocation that has that much available.
Nothing raises a pot above all it was ever credited: a grant is credited its award and at most
one supplement, and a sub-allocation only the transfer that created it. So once a grant has had
its supplement, or for any sub-allocation, a hold above the credited budget at the cheapest model
the job accepts can never be placed, and such a job is rejected instead of waiting forever. A
grant without its supplement may still grow by at most half its tier's limit, which the grant
service returns. A job above that sum is rejected too, and a job within it waits with a pending
reason that says so (see :mod:`.budget_text`). The same check runs when the grant service
rejects a hold as larger than its pot was ever credited (:func:`settle_final_hold`), because a
job accepted while the project cache showed an older supplement or limit, or while the grant
service returned no limit, would otherwise wait forever.
A job that names no grant is checked against every grant of its project
(:func:`check_project_hold_fits`), because the grant service picks the one that pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from scheduler.engine.catalog import Catalog
from services.runtime.errors import FailedPrecondition

from .admission import HoldOutcome, RateCard
from .budget_text import display_pf_days, no_budget_message, pot_name
from .grant_limits import narrow_models
from .model import MILLIS_PER_ACCELERATOR, Job
from .validation import model_meets


@dataclass(frozen=True, slots=True)
class AwardCeiling:
    """All a grant or sub-allocation was ever credited, and whether that can still grow."""

    grant_id: str
    sub_allocation_id: str
    credited: Decimal
    """PF-days."""
    final: bool
    """Whether nothing can be credited any more: a supplemented grant, or a sub-allocation."""
    models: tuple[str, ...] = ()
    """The grant's accelerator model constraint; empty allows any model."""
    supplement_limit: Decimal | None = None
    """PF-days the grant's one supplement may still add, or None when unknown."""

    def max_credited(self) -> Decimal | None:
        """Return the most PF-days the pot can ever be credited, or None when unbounded.

        That is the credited total of a pot that cannot grow, or that total plus the most the
        grant's one supplement may add. A grant whose supplement limit is unknown is unbounded.
        """
        if self.final:
            return self.credited
        if self.supplement_limit is None:
            return None
        return self.credited + self.supplement_limit


def rated_models(job: Job, rates: RateCard, catalog: Catalog) -> list[str]:
    """Return the models ``job`` accepts that the rate card prices.

    Models without a rate are left out, because no hold is placed on them.
    """
    spec = job.spec
    accepted = narrow_models(spec)
    if accepted:
        candidates = [name for name in accepted if name in catalog]
    else:
        candidates = [name for name in catalog.names() if model_meets(catalog.get(name), spec)]
    return [name for name in candidates if name in rates.per_second]


def cheapest_hold(job: Job, rates: RateCard, catalog: Catalog) -> tuple[Decimal, str] | None:
    """Return the smallest hold of ``job`` over the models it accepts, and that model.

    Returns None when no accepted model has a rate.
    """
    rated = rated_models(job, rates, catalog)
    return min(((rates.hold_amount(job, name), name) for name in rated), default=None)


def check_hold_fits(
    job: Job, ceiling: AwardCeiling, rates: RateCard, catalog: Catalog, prefix: str
) -> None:
    """Raise FailedPrecondition when ``job``'s cheapest hold exceeds all the pot can ever be
    credited, its one supplement included."""
    maximum = ceiling.max_credited()
    if maximum is None:
        return
    cheapest = cheapest_hold(job, rates, catalog)
    if cheapest is None:
        return
    amount, model = cheapest
    # NOTE: holds are priced with the leader's current rate card, and so is this check. A later
    # card with lower prices could make a rejected job payable.
    if amount <= maximum:
        return
    spec = job.spec
    accelerators = Decimal(spec.total_millis) / MILLIS_PER_ACCELERATOR
    pot = pot_name(ceiling.grant_id, ceiling.sub_allocation_id)
    credited = display_pf_days(ceiling.credited)
    if ceiling.sub_allocation_id:
        bound = f"the {credited} PF-days {pot} was ever credited, and a sub-allocation is never "
        bound += "credited more"
        other = f"{prefix}.sub_allocation_id for a larger sub-allocation"
    elif ceiling.final:
        bound = f"the {credited} PF-days {pot} was ever credited, and the grant has had its one "
        bound += "supplement"
        other = f"{prefix}.grant_id for a grant with a larger award"
    else:
        limit = display_pf_days(ceiling.supplement_limit or Decimal(0))
        ceiling_pf_days = display_pf_days(maximum)
        bound = (
            f"the {ceiling_pf_days} PF-days {pot} can ever be credited: {credited} PF-days "
            f"so far and at most {limit} more from its one supplement"
        )
        other = f"{prefix}.grant_id for a grant with a larger award"
    raise FailedPrecondition(
        f"the job's hold, {accelerators:g} accelerator(s) x {spec.wall_time_s} s on "
        f"{model} (the cheapest model it accepts, {rates.source}), is "
        f"{display_pf_days(amount)} PF-days, more than {bound}, so it could never start; lower "
        f"{prefix}.wall_time_seconds, {prefix}.task_count or "
        f"{prefix}.accelerator_millis_per_task, or set {other}",
        f"{prefix}.wall_time_seconds",
    )


def check_project_hold_fits(
    job: Job,
    project_id: str,
    grants: Sequence[AwardCeiling],
    rates: RateCard,
    catalog: Catalog,
    prefix: str,
) -> None:
    """Raise FailedPrecondition when no grant of the project could ever pay ``job``'s hold.

    ``job`` names no grant, so the grant service picks one of ``grants``, the project's grants
    whose validity has not ended, when it places the hold. A grant could pay the job when it
    may still get its supplement, or when the cheapest hold at a model that both the job and
    the grant accept is within its credited total. A project without such grants is not
    checked, because a new award may still pay the job, and neither is a job that no rated
    model would run.
    """
    rated = rated_models(job, rates, catalog)
    if not rated or not grants:
        return
    reasons: list[str] = []
    shortfall = False
    for ceiling in grants:
        maximum = ceiling.max_credited()
        if maximum is None:
            return
        allowed = [name for name in rated if not ceiling.models or name in ceiling.models]
        if not allowed:
            reasons.append(f"grant {ceiling.grant_id} allows none of the models the job accepts")
            continue
        amount, model = min((rates.hold_amount(job, name), name) for name in allowed)
        if amount <= maximum:
            return
        shortfall = True
        if ceiling.final:
            bound = f"the {display_pf_days(maximum)} PF-days the grant was ever credited with its "
            bound += "one supplement"
        else:
            bound = f"the {display_pf_days(maximum)} PF-days the grant can ever be credited with "
            bound += "its one supplement"
        reasons.append(
            f"on grant {ceiling.grant_id} it is {display_pf_days(amount)} PF-days at {model}, "
            f"more than {bound}"
        )
    raise _unpayable(job, project_id, reasons, shortfall, rates, prefix)


def _unpayable(
    job: Job, project_id: str, reasons: list[str], shortfall: bool, rates: RateCard, prefix: str
) -> FailedPrecondition:
    """Build the rejection of a job that names no grant and that no grant could ever pay."""
    spec = job.spec
    accelerators = Decimal(spec.total_millis) / MILLIS_PER_ACCELERATOR
    if shortfall:
        field = f"{prefix}.wall_time_seconds"
        fix = (
            f"lower {prefix}.wall_time_seconds, {prefix}.task_count or "
            f"{prefix}.accelerator_millis_per_task, or apply for a grant that can pay it"
        )
    else:
        field = f"{prefix}.accelerators.models"
        fix = "accept a model that a grant of the project allows, or apply for a grant that does"
    return FailedPrecondition(
        f"no grant of project {project_id} could ever pay the job's hold of "
        f"{accelerators:g} accelerator(s) x {spec.wall_time_s} s, priced at the cheapest model "
        f"each grant allows ({rates.source}): {'; '.join(reasons)}. So it could never start; "
        f"{fix}",
        field,
    )


def settle_final_hold(
    job: Job,
    outcome: HoldOutcome,
    rates: RateCard,
    catalog: Catalog,
    supplement_limit: Decimal | None = None,
) -> HoldOutcome:
    """Turn a hold beyond all its pot can ever be credited into the job's rejection.

    ``outcome`` is a :attr:`HoldOutcome.beyond_credited` failure. ``supplement_limit`` is the
    most that a grant without its supplement may still gain, and None means the pot can no
    longer grow (a sub-allocation, or a grant that has had its supplement). When even the
    cheapest model the job accepts costs more than that bound, the job could never be paid, and
    the outcome becomes ``rejected`` with the reason a submission would have got. Otherwise a
    job on a pot that cannot grow waits for a cheaper model, and its pending reason states that.
    A job within a supplement limit gets ``outcome`` back unchanged.
    """
    spec = job.spec
    assert outcome.credited is not None and outcome.amount is not None
    final = supplement_limit is None
    ceiling = AwardCeiling(
        spec.grant_id,
        spec.sub_allocation_id,
        outcome.credited,
        final,
        supplement_limit=supplement_limit,
    )
    try:
        check_hold_fits(job, ceiling, rates, catalog, "spec")
    except FailedPrecondition as exc:
        return HoldOutcome("rejected", message=exc.reason)
    if not final:
        return outcome
    available = outcome.available if outcome.available is not None else Decimal(0)
    message = no_budget_message(
        outcome.amount,
        spec.grant_id,
        spec.sub_allocation_id,
        available,
        outcome.credited,
        supplemented=True,
    )
    return replace(outcome, message=message)
