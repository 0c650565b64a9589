"""Jobs that name no grant, checked at submission against every grant of their project."""

from __future__ import annotations

from decimal import Decimal

import pytest

from scheduler.engine.catalog import Catalog
from scheduler.service.admission import RateCard
from scheduler.service.award_check import AwardCeiling, check_project_hold_fits
from scheduler.service.model import Job, JobSpec, new_job_id
from services.runtime.errors import FailedPrecondition

A100 = "A100-SXM4-80GB"
H100 = "H100-SXM5-80GB"
RATES = RateCard(1, {A100: Decimal("0.0005"), H100: Decimal("0.002")}, "rate card v1")


def make_job(models: tuple[str, ...] = (A100, H100)) -> Job:
    """One accelerator for 1000 s: 0.5 PF-days on an A100 and 2 on an H100."""
    spec = JobSpec(
        name="train",
        project_id="proj",
        command=("true",),
        models=models,
        task_count=1,
        accelerator_millis_per_task=1000,
        wall_time_s=1000,
    )
    return Job(job_id=new_job_id(), spec=spec, owner="alice", submitted_at=0.0)


def grant(grant_id: str, credited: str, final: bool = True, *models: str) -> AwardCeiling:
    return AwardCeiling(grant_id, "", Decimal(credited), final, tuple(models))


def check(job: Job, *grants: AwardCeiling) -> None:
    check_project_hold_fits(job, "proj", grants, RATES, Catalog(), "jobs[1].spec")


def test_every_grant_too_small_rejects() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check(make_job(), grant("g1", "0.25"), grant("g2", "0.4", True, H100))

    error = caught.value
    assert error.field == "jobs[1].spec.wall_time_seconds"
    assert error.reason.startswith("no grant of project proj could ever pay the job's hold")
    assert "1 accelerator(s) x 1000 s" in error.reason
    assert "(rate card v1)" in error.reason
    assert "on grant g1 it is 0.5 PF-days at A100-SXM4-80GB" in error.reason
    assert "more than the 0.25 PF-days the grant was ever credited" in error.reason
    assert "on grant g2 it is 2 PF-days at H100-SXM5-80GB" in error.reason
    assert "lower jobs[1].spec.wall_time_seconds, jobs[1].spec.task_count" in error.reason
    assert "apply for a grant that can pay it" in error.reason


def test_one_grant_large_enough_accepts() -> None:
    check(make_job(), grant("g1", "0.25"), grant("g2", "0.5"))


def test_grant_that_may_grow_accepts() -> None:
    check(make_job(), grant("g1", "0.25"), grant("g2", "0.1", False))


def test_price_follows_grant_models() -> None:
    # g1 allows only the H100, at 2 PF-days, although the A100 would fit its 1 PF-day.
    with pytest.raises(FailedPrecondition) as caught:
        check(make_job(), grant("g1", "1", True, H100))

    assert "on grant g1 it is 2 PF-days at H100-SXM5-80GB" in caught.value.reason


def test_grant_excluding_job_models_rejects() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check(make_job(models=(A100,)), grant("g1", "100", True, H100))

    error = caught.value
    assert error.field == "jobs[1].spec.accelerators.models"
    assert "grant g1 allows none of the models the job accepts" in error.reason
    assert "accept a model that a grant of the project allows" in error.reason


def test_no_grants_accepts() -> None:
    check(make_job())


def test_unrated_models_accept() -> None:
    check(make_job(models=("T4",)), grant("g1", "0"))
