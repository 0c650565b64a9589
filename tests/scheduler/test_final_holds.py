"""Holds larger than all a grant was ever credited, once the grant can no longer grow."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from types import SimpleNamespace

from scheduler.engine.catalog import Catalog
from scheduler.service.admission import HoldOutcome, RateCard
from scheduler.service.award_check import settle_final_hold
from scheduler.service.budget_text import no_budget_message
from scheduler.service.loop import SchedulingLoop
from scheduler.service.model import Job, JobSpec, new_job_id
from services.runtime.errors import Unavailable

A100 = "A100-SXM4-80GB"
H100 = "H100-SXM5-80GB"


def make_job() -> Job:
    spec = JobSpec(
        name="train",
        project_id="proj",
        command=("true",),
        grant_id="g1",
        task_count=1,
        accelerator_millis_per_task=1000,
        wall_time_s=1000,
    )
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=0.0)


def refused(amount: str, credited: str) -> HoldOutcome:
    return HoldOutcome(
        "no_budget",
        amount=Decimal(amount),
        message="needs more than the grant was ever credited",
        available=Decimal("0.5"),
        credited=Decimal(credited),
    )


def test_never_payable_hold_rejects_job() -> None:
    rates = RateCard(1, {A100: Decimal("0.002")}, "test")

    outcome = settle_final_hold(make_job(), refused("2", "1"), rates, Catalog())

    assert outcome.status == "rejected"
    assert "PF-days grant g1 was ever credited" in outcome.message
    assert "the grant has had its one supplement, so it could never start" in outcome.message


def test_cheaper_model_keeps_job_waiting() -> None:
    # Placed on the H100 at 2 PF-days; the A100 costs 0.5, within the credited 1.
    rates = RateCard(1, {A100: Decimal("0.0005"), H100: Decimal("0.002")}, "test")

    outcome = settle_final_hold(make_job(), refused("2", "1"), rates, Catalog())

    assert outcome.status == "no_budget"
    assert "supplements the grant" not in outcome.message
    assert "only on a cheaper model" in outcome.message


def test_supplemented_grant_message_waits_for_no_supplement() -> None:
    message = no_budget_message(Decimal(2), "g1", "", Decimal("0.5"), Decimal(1), supplemented=True)

    assert "supplements the grant" not in message
    assert "has had its one supplement" in message
    assert message.startswith("needs 2 PF-days for this hold")


class FakeProjects:
    """A project cache whose grant ``g1`` was credited ``credited`` PF-days when read again."""

    def __init__(
        self,
        supplemented: bool,
        credited: str = "1",
        reachable: bool = True,
        supplement_limit: str | None = None,
    ) -> None:
        self.supplemented = supplemented
        self.credited = Decimal(credited)
        self.reachable = reachable
        self.supplement_limit = None if supplement_limit is None else Decimal(supplement_limit)
        self.reloads = 0

    async def grant(self, grant_id: str) -> SimpleNamespace:
        return SimpleNamespace(
            supplemented=self.supplemented, supplement_limit=self.supplement_limit
        )

    async def reload_grant(self, grant_id: str) -> SimpleNamespace:
        self.reloads += 1
        if not self.reachable:
            raise Unavailable("the grant service could not confirm grant 'g1'; retry shortly")
        return SimpleNamespace(
            supplemented=self.supplemented,
            credited=self.credited,
            supplement_limit=self.supplement_limit,
        )


def settle_in_loop(projects: FakeProjects, jobs: int = 1) -> list[HoldOutcome]:
    """Settle the rejected holds of ``jobs`` jobs on grant ``g1`` as one batch of the loop."""
    loop = SimpleNamespace(
        projects=projects,
        rates=RateCard(1, {A100: Decimal("0.002")}, "test"),
        book=SimpleNamespace(engine=SimpleNamespace(engine=SimpleNamespace(catalog=Catalog()))),
        _reload_grant=SchedulingLoop._reload_grant,
    )
    settle = SchedulingLoop._settle_beyond_credited
    reread: dict[str, object] = {}

    async def settle_batch() -> list[HoldOutcome]:
        outcomes = []
        for _ in range(jobs):
            rejected = refused("2", "1")
            outcomes.append(await settle(loop, make_job(), rejected, reread))  # type: ignore[arg-type]
        return outcomes

    return asyncio.run(settle_batch())


def test_loop_fails_job_of_supplemented_grant() -> None:
    projects = FakeProjects(supplemented=True)

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "rejected"
    assert projects.reloads == 1


def test_loop_keeps_job_of_growable_grant() -> None:
    # An older grant service returns no supplement limit, so the grant may grow by any amount.
    projects = FakeProjects(supplemented=False)

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "no_budget"
    assert projects.reloads == 0


def test_loop_fails_job_beyond_supplement_limit() -> None:
    # Credited 1 PF-day, and its supplement may add 0.5: the 2 PF-day hold never fits.
    projects = FakeProjects(supplemented=False, supplement_limit="0.5")

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "rejected"
    assert "is 2 PF-days, more than the 1.5 PF-days grant g1 can ever be credited" in (
        outcome.message
    )
    assert "1 PF-days so far and at most 0.5 more from its one supplement" in outcome.message
    assert "lower spec.wall_time_seconds" in outcome.message
    assert projects.reloads == 1


def test_loop_keeps_job_within_supplement_limit() -> None:
    projects = FakeProjects(supplemented=False, supplement_limit="1")

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "no_budget"
    assert outcome.message == "needs more than the grant was ever credited"
    assert projects.reloads == 0


def test_raised_supplement_limit_keeps_job_waiting() -> None:
    # The cache shows a limit of 0.5, but the grant read again may grow by 2.
    projects = FakeProjects(supplemented=False, supplement_limit="0.5")
    reread_limits = iter([Decimal(2)])
    reload = projects.reload_grant

    async def reload_raised(grant_id: str) -> SimpleNamespace:
        fresh = await reload(grant_id)
        fresh.supplement_limit = next(reread_limits)
        return fresh

    projects.reload_grant = reload_raised  # type: ignore[method-assign]

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "no_budget"
    assert outcome.message == "needs more than the grant was ever credited"
    assert projects.reloads == 1


def test_late_supplement_keeps_job_waiting() -> None:
    # The hold was rejected against 1 PF-day; the supplement that the cache shows brought 3.
    projects = FakeProjects(supplemented=True, credited="3")

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "no_budget"
    assert outcome.credited == Decimal(3)
    assert outcome.message == "needs 2 PF-days for this hold; grant g1 has 0.5 PF-days available"


def test_failed_reread_keeps_job_waiting() -> None:
    projects = FakeProjects(supplemented=True, reachable=False)

    [outcome] = settle_in_loop(projects)

    assert outcome.status == "no_budget"
    assert outcome.message == "needs more than the grant was ever credited"


def test_batch_rereads_grant_once() -> None:
    projects = FakeProjects(supplemented=True, reachable=False)

    outcomes = settle_in_loop(projects, jobs=3)

    assert [o.status for o in outcomes] == ["no_budget"] * 3
    assert projects.reloads == 1
