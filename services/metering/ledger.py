"""The grant ledger as metering uses it: charges, hold settlement and refunds.

:class:`Ledger` is what charging and refunds call; :class:`GrpcLedger` implements it over the
grant service's RPCs. Every call carries an idempotency key, so a retry after a crash or a lost
response changes nothing in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal, Protocol

import grpc

from acsp import decimals
from acsp.v1 import grant_pb2, grant_pb2_grpc
from services.metering.ratecard import RatePolicy


@dataclass(frozen=True, slots=True)
class LedgerCharge:
    """One charge to commit against a hold."""

    request_id: str
    hold_id: str
    amount: Decimal
    rate_card_version: int
    usage_reference: str


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    request_id: str
    entry_id: int
    applied: bool
    """False when an earlier call had already applied the same request id."""


MAX_RELEASES_PER_CALL: Final = 1000
"""Releases one ReleaseHolds call may carry; the grant service rejects a larger call."""


@dataclass(frozen=True, slots=True)
class HoldRelease:
    """One hold to release, or to settle."""

    request_id: str
    hold_id: str
    settle: bool
    """Also close the hold to further charges."""


ReleaseStatus = Literal["done", "rejected", "unavailable"]
"""Outcome of one release: ``done`` when applied now or earlier under the same request id,
``rejected`` when it would fail again unchanged, ``unavailable`` when it may succeed later."""


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    request_id: str
    status: ReleaseStatus
    message: str = ""
    """The status code name and the reason the release was not applied; empty when done."""


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """Pricing policy of a grant."""

    rate_policy: RatePolicy
    award_rate_card_version: int | None


class LedgerRejected(Exception):
    """The ledger refused a request that will fail again unchanged (e.g. a settled hold)."""


class LedgerUnavailable(Exception):
    """The ledger could not be reached or timed out; retry later with the same key."""


class Ledger(Protocol):
    async def commit_charges(
        self, charges: Sequence[LedgerCharge], timeout_s: float
    ) -> list[ChargeOutcome]: ...

    async def release_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None: ...

    async def settle_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None: ...

    async def close_holds(
        self, items: Sequence[HoldRelease], timeout_s: float
    ) -> list[ReleaseOutcome]: ...

    async def refund(
        self, request_id: str, hold_id: str, amount: Decimal, reason: str, timeout_s: float
    ) -> int: ...

    async def grant_terms(self, grant_id: str, timeout_s: float) -> GrantTerms: ...


_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def _translate(error: grpc.aio.AioRpcError) -> Exception:
    message = f"{error.code().name}: {error.details()}"
    if error.code() in _RETRYABLE:
        return LedgerUnavailable(message)
    return LedgerRejected(message)


_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


def _release_outcome(result: grant_pb2.ReleaseHoldResult) -> ReleaseOutcome:
    if result.code == 0:
        return ReleaseOutcome(result.request_id, "done")
    code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
    status: ReleaseStatus = "unavailable" if code in _RETRYABLE else "rejected"
    return ReleaseOutcome(result.request_id, status, f"{code.name}: {result.message}")


class GrpcLedger:
    """The ledger over the grant service's gRPC API."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = grant_pb2_grpc.GrantServiceStub(channel)

    async def commit_charges(
        self, charges: Sequence[LedgerCharge], timeout_s: float
    ) -> list[ChargeOutcome]:
        request = grant_pb2.CommitChargesRequest(
            charges=[
                grant_pb2.ChargeItem(
                    request_id=c.request_id,
                    hold_id=c.hold_id,
                    amount_pf_days=decimals.to_proto(c.amount),
                    rate_card_version=c.rate_card_version,
                    usage_reference=c.usage_reference,
                )
                for c in charges
            ]
        )
        try:
            response = await self._stub.CommitCharges(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from error
        return [ChargeOutcome(r.request_id, r.entry_id, r.applied) for r in response.results]

    async def release_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        """Return what is left of a hold to its grant. The hold still takes late charges."""
        await self._release(request_id, hold_id, settle=False, timeout_s=timeout_s)

    async def settle_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        """Release what is left of a hold and close it to further charges."""
        await self._release(request_id, hold_id, settle=True, timeout_s=timeout_s)

    async def _release(
        self, request_id: str, hold_id: str, *, settle: bool, timeout_s: float
    ) -> None:
        request = grant_pb2.ReleaseHoldRequest(
            request_id=request_id, hold_id=hold_id, settle=settle
        )
        try:
            await self._stub.ReleaseHold(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from error

    async def close_holds(
        self, items: Sequence[HoldRelease], timeout_s: float
    ) -> list[ReleaseOutcome]:
        """Release or settle up to ``MAX_RELEASES_PER_CALL`` holds in one ReleaseHolds call.

        Returns one outcome per item, in order. Raises LedgerUnavailable or LedgerRejected
        when the call fails as a whole. After LedgerUnavailable some items may have been
        applied, so repeat them with the same request ids.
        """
        request = grant_pb2.ReleaseHoldsRequest(
            holds=[
                grant_pb2.ReleaseHoldRequest(
                    request_id=item.request_id, hold_id=item.hold_id, settle=item.settle
                )
                for item in items
            ]
        )
        try:
            response = await self._stub.ReleaseHolds(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A grant service older than ReleaseHolds: release one hold per call.
                return await self._close_each(items, timeout_s)
            raise _translate(error) from error
        if len(response.results) != len(items):
            raise LedgerUnavailable(
                f"ReleaseHolds returned {len(response.results)} results for {len(items)} "
                "holds, expected one per hold"
            )
        return [_release_outcome(result) for result in response.results]

    async def _close_each(
        self, items: Sequence[HoldRelease], timeout_s: float
    ) -> list[ReleaseOutcome]:
        """Release ``items`` one call each, stopping at the first unavailable one.

        The items after it are reported unavailable without a call, because each call to a
        stalled service would wait out its own timeout.
        """
        outcomes: list[ReleaseOutcome] = []
        for item in items:
            if outcomes and outcomes[-1].status == "unavailable":
                outcomes.append(
                    ReleaseOutcome(item.request_id, "unavailable", outcomes[-1].message)
                )
                continue
            outcomes.append(await self._close_one(item, timeout_s))
        return outcomes

    async def _close_one(self, item: HoldRelease, timeout_s: float) -> ReleaseOutcome:
        try:
            await self._release(
                item.request_id, item.hold_id, settle=item.settle, timeout_s=timeout_s
            )
        except LedgerUnavailable as error:
            return ReleaseOutcome(item.request_id, "unavailable", str(error))
        except LedgerRejected as error:
            return ReleaseOutcome(item.request_id, "rejected", str(error))
        return ReleaseOutcome(item.request_id, "done")

    async def refund(
        self, request_id: str, hold_id: str, amount: Decimal, reason: str, timeout_s: float
    ) -> int:
        request = grant_pb2.RefundRequest(
            request_id=request_id,
            hold_id=hold_id,
            amount_pf_days=decimals.to_proto(amount),
            reason=reason,
        )
        try:
            entry = await self._stub.Refund(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from error
        return int(entry.entry_id)

    async def grant_terms(self, grant_id: str, timeout_s: float) -> GrantTerms:
        try:
            grant = await self._stub.GetGrant(
                grant_pb2.GetGrantRequest(grant_id=grant_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error) from error
        if grant.rate_policy == grant_pb2.RATE_POLICY_FIXED_AT_AWARD:
            return GrantTerms(RatePolicy.FIXED_AT_AWARD, grant.rate_card_version or None)
        return GrantTerms(RatePolicy.CURRENT, None)
