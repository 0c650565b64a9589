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
    def __init__(self, supplemented: bool) -> None:
        self.supplemented = supplemented

    async def grant(self, grant_id: str) -> SimpleNamespace:
        return SimpleNamespace(supplemented=self.supplemented)


def settle_in_loop(supplemented: bool) -> HoldOutcome:
    loop = SimpleNamespace(
        projects=FakeProjects(supplemented),
        rates=RateCard(1, {A100: Decimal("0.002")}, "test"),
        book=SimpleNamespace(engine=SimpleNamespace(engine=SimpleNamespace(catalog=Catalog()))),
    )
    settle = SchedulingLoop._settle_beyond_credited(loop, make_job(), refused("2", "1"))  # type: ignore[arg-type]
    return asyncio.run(settle)


def test_loop_fails_job_of_supplemented_grant() -> None:
    assert settle_in_loop(supplemented=True).status == "rejected"


def test_loop_keeps_job_of_growable_grant() -> None:
    assert settle_in_loop(supplemented=False).status == "no_budget"
