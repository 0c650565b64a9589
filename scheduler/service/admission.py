"""Admission: price a placed job with the rate card and hold that budget on its grant."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_UP, Context, Decimal, InvalidOperation, Overflow, localcontext
from typing import Final, Literal

import grpc
from google.rpc import error_details_pb2

from acsp import decimals
from acsp.v1 import grant_pb2, grant_pb2_grpc, metering_pb2
from scheduler.engine.catalog import DEFAULT_CATALOG
from services.runtime.errors import details_from_error

from .budget_text import no_budget_message
from .model import MILLIS_PER_ACCELERATOR, Job, idempotency_key

logger = logging.getLogger(__name__)

PF_DAY_QUANTUM: Final = Decimal("1e-24")
_HOLD_CONTEXT: Final = Context(prec=60, rounding=ROUND_UP, traps=[InvalidOperation, Overflow])
"""Prices holds exactly. The default context keeps 28 digits, which a hold of 10,000 PF-days
or more at 1e-24 exceeds, and rounds half-even, which could hold less than the price."""
SECONDS_PER_DAY: Final = 86_400


@dataclass(frozen=True, slots=True)
class RateCard:
    """PF-days per accelerator-second of a whole device, per catalog model."""

    version: int
    per_second: Mapping[str, Decimal]
    source: str

    @classmethod
    def from_proto(cls, msg: metering_pb2.RateCard) -> RateCard:
        rates = {
            rate.model.name: Decimal(rate.pf_days_per_accelerator_second.value)
            for rate in msg.rates
        }
        return cls(msg.version, rates, f"rate card v{msg.version}")

    @classmethod
    def from_catalog(cls) -> RateCard:
        """Price at peak dense throughput from the engine's catalog (PF/s divided by a day)."""
        rates = {
            model.name: model.peak_tflops / 1000 / SECONDS_PER_DAY for model in DEFAULT_CATALOG
        }
        return cls(0, rates, "catalog peak throughput")

    def hold_amount(self, job: Job, model: str) -> Decimal:
        """Price the whole wall time of ``job`` on ``model``, rounded up to the ledger quantum.

        Raises ``KeyError`` when the rate card has no price for ``model``.
        """
        # NOTE: the per-second rate is already rounded up to 1e-24, so a long hold can exceed the
        # exact price by up to seconds x 1e-24 PF-days. Metering charges the exact price.
        rate = self.per_second[model]
        with localcontext(_HOLD_CONTEXT):
            accelerators = Decimal(job.spec.total_millis) / MILLIS_PER_ACCELERATOR
            amount = accelerators * job.spec.wall_time_s * rate
            return amount.quantize(PF_DAY_QUANTUM, rounding=ROUND_UP)


HoldStatus = Literal["held", "no_budget", "rejected", "unavailable"]


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """Result of one hold request."""

    status: HoldStatus
    """``held``; ``no_budget`` (the job waits); ``rejected`` (the job fails: unknown grant,
    not allowed); ``unavailable`` (retried later)."""
    hold_id: str = ""
    grant_id: str = ""
    amount: Decimal | None = None
    message: str = ""
    available: Decimal | None = None
    """For ``no_budget`` with amounts from the grant service: the pot's available PF-days."""
    credited: Decimal | None = None
    """For ``no_budget`` with amounts from the grant service: all the pot was ever credited,
    in PF-days, or None when the service sent none."""

    @property
    def beyond_credited(self) -> bool:
        """Whether the hold was rejected for being larger than all its pot was ever credited."""
        return (
            self.status == "no_budget"
            and self.amount is not None
            and self.credited is not None
            and self.amount > self.credited
        )


_NO_BUDGET_CODES: Final = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)
_REJECT_CODES: Final = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
)


class GrantAdmission:
    """Places holds through the grant service, keyed ``<job_id>/<attempt>`` for retries."""

    def __init__(
        self,
        stub: grant_pb2_grpc.GrantServiceStub,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout_s: float = 5.0,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout = timeout_s

    async def place_hold(self, job: Job, amount: Decimal, model: str = "") -> HoldOutcome:
        """Hold ``amount`` for one job placed on accelerator ``model``."""
        try:
            hold = await self._stub.PlaceHold(
                _hold_request(job, amount, model), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            reason = OUTSIDE_CONSTRAINTS if _outside_constraints(exc) else ""
            return _failure(job, exc.code(), exc.details() or "", reason, amount)
        return _held(hold, amount)

    async def place_holds(
        self, items: Sequence[tuple[Job, Decimal]], models: Mapping[str, str] | None = None
    ) -> list[HoldOutcome]:
        """Hold budget for many jobs in one ``PlaceHolds`` call; one outcome per job, in order.

        ``models`` maps a job id to the accelerator model it is placed on, which the grant
        service checks against the grant's constraints with the job's regions. A failure of the
        whole call becomes every job's outcome.
        """
        models = models or {}
        request = grant_pb2.PlaceHoldsRequest(
            holds=[_hold_request(job, amount, models.get(job.job_id, "")) for job, amount in items]
        )
        try:
            response = await self._stub.PlaceHolds(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNIMPLEMENTED:
                # A grant service older than PlaceHolds: one call per hold.
                calls = (self.place_hold(j, a, models.get(j.job_id, "")) for j, a in items)
                return list(await asyncio.gather(*calls))
            return [_failure(job, code, detail) for job, _ in items]
        if len(response.results) != len(items):
            detail = f"{len(response.results)} results for {len(items)} holds"
            return [_failure(job, grpc.StatusCode.INTERNAL, detail) for job, _ in items]
        outcomes = []
        for (job, amount), result in zip(items, response.results, strict=True):
            if result.code == 0:
                outcomes.append(_held(result.hold, amount))
            else:
                code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
                budgets = _budget_of(result)
                outcomes.append(
                    _failure(job, code, result.message, result.reason, amount, *budgets)
                )
        return outcomes


_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}
OUTSIDE_CONSTRAINTS: Final = "OUTSIDE_GRANT_CONSTRAINTS"
"""``PlaceHoldResult.reason`` and precondition type of a hold outside the grant's constraints."""


def _hold_request(job: Job, amount: Decimal, model: str) -> grant_pb2.PlaceHoldRequest:
    regions = sorted({f"{task.provider}/{task.region}" for task in job.placement})
    return grant_pb2.PlaceHoldRequest(
        request_id=idempotency_key(job.job_id, job.attempt),
        grant_id=job.spec.grant_id,
        project_id=job.spec.project_id,
        sub_allocation_id=job.spec.sub_allocation_id,
        job_id=job.job_id,
        amount_pf_days=decimals.to_proto(amount),
        placement_regions=regions,
        accelerator_model=model,
    )


def _outside_constraints(exc: grpc.aio.AioRpcError) -> bool:
    """Return whether a failed PlaceHold carries the grant-constraint precondition type."""
    status = details_from_error(exc)
    if status is None:
        return False
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure) and any(
            v.type == OUTSIDE_CONSTRAINTS for v in failure.violations
        ):
            return True
    return False


def _held(hold: grant_pb2.Hold, amount: Decimal) -> HoldOutcome:
    return HoldOutcome(
        "held", hold.hold_id, hold.grant_id, Decimal(hold.held_pf_days.value or amount)
    )


def _budget_of(result: grant_pb2.PlaceHoldResult) -> tuple[Decimal | None, Decimal | None]:
    """Return the available and credited budgets of a hold refused for lack of budget."""
    budgets: list[Decimal | None] = []
    for name in ("available_pf_days", "credited_pf_days"):
        try:
            value = decimals.from_proto(getattr(result, name)) if result.HasField(name) else None
        except ValueError:
            value = None
        budgets.append(value)
    return budgets[0], budgets[1]


def _failure(
    job: Job,
    code: grpc.StatusCode,
    detail: str,
    reason: str = "",
    amount: Decimal | None = None,
    available: Decimal | None = None,
    credited: Decimal | None = None,
) -> HoldOutcome:
    if reason == OUTSIDE_CONSTRAINTS:
        # Waiting does not help: the job's placement is outside its grant's constraints.
        return HoldOutcome("rejected", message=f"{code.name}: {detail}")
    if code in _NO_BUDGET_CODES:
        if amount is None or available is None:
            # Not a shortfall the grant service measured (an expired grant, say): its words.
            return HoldOutcome("no_budget", message=f"the grant cannot pay the hold: {detail}")
        spec = job.spec
        message = no_budget_message(
            amount, spec.grant_id, spec.sub_allocation_id, available, credited
        )
        return HoldOutcome(
            "no_budget", amount=amount, message=message, available=available, credited=credited
        )
    if code in _REJECT_CODES:
        return HoldOutcome("rejected", message=f"{code.name}: {detail}")
    logger.warning("hold for job %s failed with %s: %s", job.job_id, code.name, detail)
    return HoldOutcome("unavailable", message=f"{code.name}: {detail}")
