"""GrantAdmission's batched holds: per-hold results and the fallback to one call per hold."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import grpc

from acsp.v1 import common_pb2, grant_pb2
from scheduler.service.admission import GrantAdmission, RateCard
from scheduler.service.model import Job, JobSpec, idempotency_key, new_job_id


def make_job(grant: str = "grant-1") -> Job:
    spec = JobSpec(name="j", project_id="proj", command=("true",), grant_id=grant)
    return Job(job_id=new_job_id(), spec=spec, owner="alice")


def held(request: grant_pb2.PlaceHoldRequest) -> grant_pb2.Hold:
    return grant_pb2.Hold(
        hold_id=f"hold-{request.job_id}",
        grant_id=request.grant_id,
        job_id=request.job_id,
        held_pf_days=request.amount_pf_days,
    )


class BatchingGrant:
    """A grant service double: PlaceHolds places holds on grant-1 and reports the rest."""

    def __init__(self) -> None:
        self.requests: list[grant_pb2.PlaceHoldsRequest] = []

    async def PlaceHolds(self, request: grant_pb2.PlaceHoldsRequest, **_: Any) -> Any:
        self.requests.append(request)
        results = []
        for item in request.holds:
            if item.grant_id == "grant-1":
                results.append(
                    grant_pb2.PlaceHoldResult(request_id=item.request_id, hold=held(item))
                )
            elif item.grant_id == "grant-poor":
                code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
                results.append(
                    grant_pb2.PlaceHoldResult(
                        request_id=item.request_id, code=code, message="short"
                    )
                )
            elif item.grant_id == "grant-measured":
                code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
                result = grant_pb2.PlaceHoldResult(
                    request_id=item.request_id, code=code, message="amount_pf_days: short"
                )
                result.available_pf_days.value = "0.500000000000000000000001"
                result.credited_pf_days.value = "2"
                results.append(result)
            else:
                code = grpc.StatusCode.NOT_FOUND.value[0]
                results.append(
                    grant_pb2.PlaceHoldResult(request_id=item.request_id, code=code, message="gone")
                )
        return grant_pb2.PlaceHoldsResponse(results=results)


class OlderGrant:
    """A grant service double without PlaceHolds, as before the RPC existed."""

    def __init__(self) -> None:
        self.single_calls = 0

    async def PlaceHolds(self, request: grant_pb2.PlaceHoldsRequest, **_: Any) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no method"
        )

    async def PlaceHold(self, request: grant_pb2.PlaceHoldRequest, **_: Any) -> Any:
        self.single_calls += 1
        return held(request)


async def test_place_holds_maps_each_result() -> None:
    grant = BatchingGrant()
    admission = GrantAdmission(grant)  # type: ignore[arg-type]
    jobs = [make_job(), make_job("grant-poor"), make_job("grant-gone")]
    outcomes = await admission.place_holds([(job, Decimal("1.5")) for job in jobs])
    assert [o.status for o in outcomes] == ["held", "no_budget", "rejected"]
    assert outcomes[0].hold_id == f"hold-{jobs[0].job_id}"
    assert outcomes[0].amount == Decimal("1.5")
    assert outcomes[1].message == "the grant cannot pay the hold: short"
    assert "NOT_FOUND" in outcomes[2].message
    [request] = grant.requests
    assert request.holds[0].request_id == idempotency_key(jobs[0].job_id, jobs[0].attempt)
    assert request.holds[0].amount_pf_days == common_pb2.Decimal(value="1.5")


async def test_place_holds_falls_back_to_single_calls() -> None:
    grant = OlderGrant()
    admission = GrantAdmission(grant)  # type: ignore[arg-type]
    outcomes = await admission.place_holds([(make_job(), Decimal(2)), (make_job(), Decimal(3))])
    assert [o.status for o in outcomes] == ["held", "held"]
    assert [o.amount for o in outcomes] == [Decimal(2), Decimal(3)]
    assert grant.single_calls == 2


async def test_budget_shortfall_reads_rounded() -> None:
    admission = GrantAdmission(BatchingGrant())  # type: ignore[arg-type]
    jobs = [make_job("grant-measured"), make_job("grant-measured")]
    amounts = [Decimal("1.250000000000000000000001"), Decimal("3")]
    outcomes = await admission.place_holds(list(zip(jobs, amounts, strict=True)))
    assert [o.status for o in outcomes] == ["no_budget", "no_budget"]
    assert outcomes[0].message == (
        "needs 1.25 PF-days for this hold; grant grant-measured has 0.5 PF-days available"
    )
    assert outcomes[1].message.startswith(
        "needs 3 PF-days for this hold, more than the whole 2 PF-days grant grant-measured "
        "was ever credited; it waits until the program office supplements the grant"
    )
    assert not outcomes[0].beyond_credited
    assert outcomes[1].beyond_credited
    assert outcomes[1].credited == Decimal(2)


def test_large_hold_priced_exactly() -> None:
    # 30 days on 1024 accelerators of a model near 1 PF/s: about 30,382 PF-days, which at
    # 24 decimal places has more digits than the default decimal context keeps.
    spec = JobSpec(
        name="j",
        project_id="proj",
        command=("true",),
        task_count=1024,
        wall_time_s=30 * 86_400,
    )
    job = Job(job_id=new_job_id(), spec=spec, owner="alice")
    rates = RateCard(1, {"H100-SXM5-80GB": Decimal("0.000011446759259259259260")}, "test")

    amount = rates.hold_amount(job, "H100-SXM5-80GB")

    assert amount == Decimal(f"{1024 * 30 * 86_400 * 11446759259259259260}e-24")


def test_hold_rounds_up_past_quantum() -> None:
    # Half an accelerator makes the exact price of about 3,041 PF-days three digits longer than
    # the ledger keeps, 31 in all, and rounding it to 28 digits half-even first held less.
    spec = JobSpec(
        name="j",
        project_id="proj",
        command=("true",),
        task_count=205,
        accelerator_millis_per_task=500,
        wall_time_s=30 * 86_400 + 1,
    )
    job = Job(job_id=new_job_id(), spec=spec, owner="alice")
    rate = 11446759259259259261
    rates = RateCard(1, {"H100-SXM5-80GB": Decimal(f"{rate}e-24")}, "test")

    amount = rates.hold_amount(job, "H100-SXM5-80GB")

    exact_thousandths = 205 * 500 * (30 * 86_400 + 1) * rate
    assert amount == Decimal(f"{-(-exact_thousandths // 1000)}e-24")
