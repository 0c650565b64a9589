"""RPC handlers for grants, sub-allocations and the money-moving ledger calls."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import localcontext

import asyncpg
import grpc

from acsp import decimals
from acsp.v1 import grant_pb2
from services.grant import access, budget, views
from services.grant import convert as cv
from services.grant import ledger_rules as rules
from services.grant.amounts import EXACT, ZERO
from services.grant.app import (
    GrantApp,
    page_in,
    page_out,
    reference_in,
    request_id_in,
    scoped_key,
)
from services.grant.constraints import OUTSIDE_CONSTRAINTS, OutsideConstraints
from services.grant.errors import FailedPrecondition, InsufficientBudget, InvalidArgument, NotFound
from services.grant.expiry import ExpiryRequest, expire_requested
from services.grant.extension import extend_grant
from services.grant.ledger import RequestRejected
from services.grant.ledger_ops import (
    Cause,
    ChargeRequest,
    EntryResult,
    HoldRequest,
    LedgerRequest,
    RefundRequest,
    ReleaseRequest,
)
from services.grant.ledger_state import allocation_pot_name, grant_pot_name, pot_from_row
from services.grant.review_rules import Tier, check_supplement
from services.runtime.auth import Principal, current_principal
from services.runtime.context import request_id
from services.runtime.errors import ServiceError

log = logging.getLogger(__name__)

GRANT_STATES = {
    grant_pb2.GRANT_STATE_ACTIVE: "active",
    grant_pb2.GRANT_STATE_PENDING: "pending",
    grant_pb2.GRANT_STATE_EXPIRED: "expired",
}


def _cause(principal: Principal, method: str, reason: str = "") -> Cause:
    return Cause(
        actor=principal.subject, trigger=f"rpc:{method}", reason=reason or (request_id() or "")
    )


async def _visible_grant(conn: asyncpg.Connection, grant_id: str) -> views.GrantView:
    """Return the grant if the caller may see it; a hidden grant is reported as not found."""
    view = await views.grant_view(conn, grant_id)
    try:
        await access.require_project_visible(conn, view.row["project_id"])
    except NotFound:
        raise NotFound("grant", grant_id) from None
    return view


async def _grant_for_allocations(
    conn: asyncpg.Connection, grant_id: str
) -> tuple[views.GrantView, frozenset[str] | None]:
    """Return the grant and the holders whose sub-allocations of it the caller may read.

    The holders are None when the caller may see the whole grant. A member of sub-projects
    that hold sub-allocations of it gets those sub-projects' ids, since they may draw on those
    sub-allocations. Anyone else gets NotFound for the grant, as from :func:`_visible_grant`.
    """
    view = await views.grant_view(conn, grant_id)
    project_id = view.row["project_id"]
    try:
        await access.require_project_visible(conn, project_id)
    except NotFound:
        subject = current_principal().subject
        holders = await access.drawing_sub_projects(conn, project_id, grant_id, subject)
        if not holders:
            raise NotFound("grant", grant_id) from None
        return view, holders
    return view, None


async def _grant_of_readable_allocation(
    conn: asyncpg.Connection, grant_id: str, allocation_id: str
) -> views.GrantView:
    """Return the grant if the caller may read its sub-allocation ``allocation_id``.

    A caller limited to some holders gets NotFound for the grant when the sub-allocation is
    missing or held by another, so the reply does not reveal the grant's other sub-allocations.
    """
    view, holders = await _grant_for_allocations(conn, grant_id)
    if holders is None:
        return view
    holder = await conn.fetchval(
        "SELECT holder FROM allocations WHERE id = $1 AND grant_id = $2", allocation_id, grant_id
    )
    if holder not in holders:
        raise NotFound("grant", grant_id)
    return view


def _raise_outcome(outcome: object) -> EntryResult:
    if isinstance(outcome, Exception):
        raise outcome
    assert isinstance(outcome, EntryResult)
    return outcome


MAX_HOLDS_PER_CALL = 1000
"""Largest number of items in one PlaceHolds or ReleaseHolds call."""
MAX_BIGINT = 2**63 - 1
"""Largest ledger entry id, PostgreSQL's ``bigint``."""


def _check_payer(prefix: str, grant_id: str, project_id: str, sub_allocation_id: str) -> None:
    """Raise InvalidArgument unless the request names a grant, or a project without a
    sub-allocation, because a sub-allocation draws on one grant that the caller must name."""
    if not grant_id and not project_id:
        raise InvalidArgument(
            f"{prefix}grant_id", "and project_id are both missing", "name the grant or the project"
        )
    if sub_allocation_id and not grant_id:
        raise InvalidArgument(
            f"{prefix}grant_id",
            f"is missing, but sub_allocation_id {sub_allocation_id!r} names a part of one grant",
            "name the grant that the sub-allocation belongs to",
        )


def _hold_in(item: grant_pb2.PlaceHoldRequest, cause: Cause, prefix: str) -> HoldRequest:
    """Convert one hold of a PlaceHolds call, naming its fields under ``prefix``."""
    _check_payer(prefix, item.grant_id, item.project_id, item.sub_allocation_id)
    return HoldRequest(
        key=request_id_in(item.request_id, f"{prefix}request_id"),
        grant_id=item.grant_id or None,
        project_id=item.project_id or None,
        allocation_id=item.sub_allocation_id or None,
        job_id=cv.text_in(f"{prefix}job_id", item.job_id),
        amount=cv.amount_in(f"{prefix}amount_pf_days", item.amount_pf_days),
        cause=cause,
        placement=cv.placement_in(prefix, item),
    )


def _hold_failure(request_id: str, error: ServiceError) -> grant_pb2.PlaceHoldResult:
    reason = OUTSIDE_CONSTRAINTS if isinstance(error, OutsideConstraints) else ""
    result = grant_pb2.PlaceHoldResult(
        request_id=request_id, code=error.code.value[0], message=error.message, reason=reason
    )
    if isinstance(error, InsufficientBudget):
        # Exact amounts for the scheduler, which rounds them only for the job's pending reason.
        result.available_pf_days.CopyFrom(decimals.to_proto(error.available))
        if error.credited is not None:
            result.credited_pf_days.CopyFrom(decimals.to_proto(error.credited))
    return result


def _release_in(item: grant_pb2.ReleaseHoldRequest, cause: Cause, prefix: str) -> ReleaseRequest:
    """Convert one release of a ReleaseHolds call, naming its fields under ``prefix``."""
    return ReleaseRequest(
        key=request_id_in(item.request_id, f"{prefix}request_id"),
        hold_id=reference_in(f"{prefix}hold_id", item.hold_id),
        cause=cause,
        settle=item.settle,
    )


def _release_failure(request_id: str, error: ServiceError) -> grant_pb2.ReleaseHoldResult:
    return grant_pb2.ReleaseHoldResult(
        request_id=request_id, code=error.code.value[0], message=error.message
    )


class LedgerHandlers:
    """Grants, sub-allocations, holds, charges, releases, refunds and history."""

    app: GrantApp

    def _grant_out(self, view: views.GrantView, now: datetime | None = None) -> grant_pb2.Grant:
        """Convert ``view`` into a reply's Grant, as of ``now`` (the current time by default)."""
        return cv.grant_out(
            view.row,
            view.institution_id,
            view.balance,
            now or datetime.now(UTC),
            self.app.settings.tier_limits(),
        )

    async def GetGrant(
        self, request: grant_pb2.GetGrantRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Grant:
        grant_id = reference_in("grant_id", request.grant_id)
        async with self.app.database().acquire() as conn:
            view = await _visible_grant(conn, grant_id)
        return self._grant_out(view)

    async def ListGrants(
        self, request: grant_pb2.ListGrantsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListGrantsResponse:
        principal = current_principal()
        limit, after = page_in(request.page)
        now = datetime.now(UTC)
        async with self.app.database().acquire() as conn:
            grants = await views.list_grants(
                conn,
                principal.subject,
                access.is_overseer(principal),
                request.project_id,
                request.institution_id,
                GRANT_STATES.get(request.state, ""),  # type: ignore[call-overload]
                now,
                after,
                limit,
            )
        tier_limits = self.app.settings.tier_limits()
        return grant_pb2.ListGrantsResponse(
            grants=[
                cv.grant_out(g.row, g.institution_id, g.balance, now, tier_limits) for g in grants
            ],
            page=page_out([g.row["id"] for g in grants], limit),
        )

    async def SupplementGrant(
        self, request: grant_pb2.SupplementGrantRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Grant:
        principal = access.require_program_office("supplement grants")
        key = scoped_key("supplement", principal.subject, request_id_in(request.request_id))
        grant_id = reference_in("grant_id", request.grant_id)
        amount = cv.amount_in("amount_pf_days", request.amount_pf_days)
        reason = cv.text_in("reason", request.reason, limit=2000)
        now = datetime.now(UTC)
        async with self.app.database().transaction() as conn:
            row = await budget.lock_grant(conn, grant_id)
            # Read after the lock, so that a retry racing the first request waits for it to
            # commit and then returns its result instead of finding the grant supplemented.
            stored = await budget.existing_entry(conn, key)
            if stored is not None:
                budget.check_same_entry(stored, grant_id, amount)
            else:
                check_supplement(
                    Tier(row["tier"]), amount, row["supplemented"], self.app.settings.tier_limits()
                )
                cause = _cause(principal, "SupplementGrant", reason)
                await budget.supplement_grant(conn, grant_id, amount, key, cause, now)
            view = await views.grant_view(conn, grant_id)
        return self._grant_out(view, now)

    async def ExtendGrant(
        self, request: grant_pb2.ExtendGrantRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Grant:
        principal = access.require_program_office("extend grants")
        key = scoped_key("extend", principal.subject, request_id_in(request.request_id))
        grant_id = reference_in("grant_id", request.grant_id)
        new_end = cv.time_in("new_end_time", request.new_end_time, request.HasField("new_end_time"))
        reason = cv.text_in("reason", request.reason, limit=2000)
        async with self.app.database().transaction() as conn:
            moved = await extend_grant(
                conn,
                grant_id,
                new_end,
                key,
                principal.subject,
                reason,
                now=datetime.now(UTC),
                max_validity_days=self.app.settings.max_validity_days,
            )
            view = await views.grant_view(conn, grant_id)
        if not moved:
            return self._grant_out(view)
        log.info(
            "grant extended",
            extra={
                "grant_id": grant_id,
                "actor": principal.subject,
                "ends_at": new_end,
                "reason": reason,
            },
        )
        return self._grant_out(view)

    async def ExpireGrants(
        self, request: grant_pb2.ExpireGrantsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ExpireGrantsResponse:
        principal = current_principal()
        if not access.is_overseer(principal):
            access.require_program_office("expire grants")
        key = request_id_in(request.request_id)
        now = datetime.now(UTC)
        as_of = now
        if request.HasField("as_of_time"):
            as_of = cv.time_in("as_of_time", request.as_of_time, present=True)
        if as_of > now:
            raise InvalidArgument(
                "as_of_time", "is in the future", "grants can only expire once their window ended"
            )
        expiry = ExpiryRequest(
            key=scoped_key("expiry", principal.subject, key),
            requested_as_of=as_of if request.HasField("as_of_time") else None,
            as_of=as_of,
            actor=principal.subject,
        )
        result = await expire_requested(self.app, expiry, _cause(principal, "ExpireGrants"))
        return grant_pb2.ExpireGrantsResponse(
            grant_ids=result.grant_ids, returned_pf_days=cv.amount_out(result.returned)
        )

    async def CreateSubAllocation(
        self, request: grant_pb2.CreateSubAllocationRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.SubAllocation:
        key = scoped_key(
            "sub-allocation", current_principal().subject, request_id_in(request.request_id)
        )
        grant_id = reference_in("grant_id", request.grant_id)
        holder = cv.text_in("holder", request.holder)
        amount = cv.amount_in("amount_pf_days", request.amount_pf_days)
        parent = request.parent_sub_allocation_id or None
        async with self.app.database().transaction() as conn:
            view = await _visible_grant(conn, grant_id)
            principal = await access.require_project_pi(
                conn, view.row["project_id"], "delegate sub-allocations"
            )
            allocation_id = await budget.create_sub_allocation(
                conn,
                grant_id,
                parent,
                holder,
                amount,
                key,
                _cause(principal, "CreateSubAllocation"),
                datetime.now(UTC),
            )
            row = await conn.fetchrow("SELECT * FROM allocations WHERE id = $1", allocation_id)
            balance = await views.allocation_balance(conn, grant_id, allocation_id)
        return _allocation_out(row, balance)

    async def ListSubAllocations(
        self, request: grant_pb2.ListSubAllocationsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListSubAllocationsResponse:
        principal = current_principal()
        filtered = bool(request.holder) or request.caller_may_draw
        if not request.grant_id and not filtered:
            raise InvalidArgument(
                "grant_id",
                "is missing",
                "name the grant, or set holder or caller_may_draw to list across grants",
            )
        grant_id = reference_in("grant_id", request.grant_id) if request.grant_id else ""
        holder = cv.text_in("holder", request.holder, required=False)
        limit, after = page_in(request.page)
        async with self.app.database().acquire() as conn:
            see_all = access.is_overseer(principal)
            if grant_id:
                _, holders = await _grant_for_allocations(conn, grant_id)
                # The caller sees the whole grant, unless only as a sub-project's member.
                see_all = holders is None
            listed = views.AllocationFilter(
                subject=principal.subject,
                see_all=see_all,
                grant_id=grant_id,
                holder=holder,
                caller_may_draw=request.caller_may_draw,
            )
            page = await views.list_allocations(conn, listed, after, limit)
        return grant_pb2.ListSubAllocationsResponse(
            sub_allocations=[_allocation_out(r, b) for r, b in page],
            page=page_out([r["id"] for r, _ in page], limit),
        )

    async def CheckFunds(
        self, request: grant_pb2.CheckFundsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.CheckFundsResponse:
        amount = cv.amount_in("amount_pf_days", request.amount_pf_days)
        _check_payer("", request.grant_id, request.project_id, request.sub_allocation_id)
        now = datetime.now(UTC)
        async with self.app.database().acquire() as conn:
            if request.grant_id:
                if request.sub_allocation_id:
                    view = await _grant_of_readable_allocation(
                        conn, request.grant_id, request.sub_allocation_id
                    )
                else:
                    view = await _visible_grant(conn, request.grant_id)
                grant = budget.grant_state(view.row)
                pot = pot_from_row(grant_pot_name(grant.grant_id), view.row)
                if request.sub_allocation_id:
                    row = await conn.fetchrow(
                        "SELECT * FROM allocations WHERE id = $1 AND grant_id = $2",
                        request.sub_allocation_id,
                        grant.grant_id,
                    )
                    if row is None:
                        raise NotFound("sub-allocation", request.sub_allocation_id)
                    pot = pot_from_row(allocation_pot_name(row["id"]), row)
                available = pot.available if grant.is_open_at(now) else ZERO
                grant_id = grant.grant_id
            else:
                project_id = reference_in("project_id", request.project_id)
                await access.require_project_visible(conn, project_id)
                rows = await conn.fetch(
                    "SELECT * FROM grants WHERE project_id = $1 AND NOT expired", project_id
                )
                candidates = [
                    (budget.grant_state(r), pot_from_row(grant_pot_name(r["id"]), r)) for r in rows
                ]
                try:
                    chosen, pot = rules.choose_grant(candidates, amount, now)
                    grant_id, available = chosen.grant_id, pot.available
                except FailedPrecondition:
                    open_pots = [p for g, p in candidates if g.is_open_at(now)]
                    best = max(open_pots, key=lambda p: p.available, default=None)
                    grant_id = best.name.removeprefix("grant:") if best else ""
                    available = best.available if best else ZERO
        with localcontext(EXACT):
            shortfall = max(ZERO, amount - available)
        return grant_pb2.CheckFundsResponse(
            sufficient=shortfall == ZERO,
            grant_id=grant_id,
            available_pf_days=cv.amount_out(available),
            shortfall_pf_days=cv.amount_out(shortfall),
        )

    async def PlaceHold(
        self, request: grant_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Hold:
        principal = access.require_money_service(self.app.settings.money_services, "place holds")
        key = request_id_in(request.request_id)
        amount = cv.amount_in("amount_pf_days", request.amount_pf_days)
        job_id = cv.text_in("job_id", request.job_id)
        _check_payer("", request.grant_id, request.project_id, request.sub_allocation_id)
        if not request.grant_id:
            async with self.app.database().acquire() as conn:
                if (
                    await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", request.project_id)
                    is None
                ):
                    raise NotFound("project", request.project_id)
        hold = HoldRequest(
            key=key,
            grant_id=request.grant_id or None,
            project_id=request.project_id or None,
            allocation_id=request.sub_allocation_id or None,
            job_id=job_id,
            amount=amount,
            cause=_cause(principal, "PlaceHold"),
            placement=cv.placement_in("", request),
        )
        result = _raise_outcome(await self.app.ledger_batcher().submit(hold))
        if result.applied:
            # A hold this call created has nothing charged or released yet.
            return grant_pb2.Hold(
                hold_id=result.hold_id or "",
                grant_id=result.grant_id,
                sub_allocation_id=result.allocation_id or "",
                job_id=result.job_id,
                held_pf_days=cv.amount_out(result.amount),
                charged_pf_days=cv.amount_out(ZERO),
                released_pf_days=cv.amount_out(ZERO),
            )
        async with self.app.database().acquire() as conn:
            return cv.hold_out(await views.hold_row(conn, result.hold_id or ""))

    async def PlaceHolds(
        self, request: grant_pb2.PlaceHoldsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.PlaceHoldsResponse:
        """Place many holds through the batched ledger path, each with its own result.

        A hold that is malformed or cannot be placed gets its status in its result; the others
        are placed all the same. Only a call-wide problem (caller, size) fails the call.
        """
        principal = access.require_money_service(self.app.settings.money_services, "place holds")
        if len(request.holds) > MAX_HOLDS_PER_CALL:
            raise InvalidArgument(
                "holds", f"has more than {MAX_HOLDS_PER_CALL} items", "split the batch"
            )
        cause = _cause(principal, "PlaceHolds")
        results: list[grant_pb2.PlaceHoldResult | None] = [None] * len(request.holds)
        queued: list[tuple[int, HoldRequest]] = []
        unknown_projects = await self._missing_projects(
            {h.project_id for h in request.holds if not h.grant_id and h.project_id}
        )
        for index, item in enumerate(request.holds):
            try:
                hold = _hold_in(item, cause, f"holds[{index}].")
                if hold.grant_id is None and hold.project_id in unknown_projects:
                    raise NotFound("project", hold.project_id or "")
            except ServiceError as error:
                results[index] = _hold_failure(item.request_id, error)
                continue
            queued.append((index, hold))
        outcomes = await self.app.ledger_batcher().submit_many([h for _, h in queued])
        for (index, hold), outcome in zip(queued, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                results[index] = _hold_failure(hold.key, outcome)
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                results[index] = grant_pb2.PlaceHoldResult(
                    request_id=hold.key, hold=await self._hold_out(outcome)
                )
        failed = [r for r in results if r is not None and r.code != 0]
        if failed:
            log.info(
                "PlaceHolds: %d of %d holds not placed, first %s: %s",
                len(failed),
                len(results),
                failed[0].request_id,
                failed[0].message,
            )
        return grant_pb2.PlaceHoldsResponse(results=[r for r in results if r is not None])

    async def _missing_projects(self, project_ids: set[str]) -> set[str]:
        if not project_ids:
            return set()
        async with self.app.database().acquire() as conn:
            rows = await conn.fetch(
                "SELECT id FROM projects WHERE id = ANY($1::text[])", list(project_ids)
            )
        return project_ids - {row["id"] for row in rows}

    async def _hold_out(self, result: EntryResult) -> grant_pb2.Hold:
        if result.applied:
            # A hold this call created has nothing charged or released yet.
            return grant_pb2.Hold(
                hold_id=result.hold_id or "",
                grant_id=result.grant_id,
                sub_allocation_id=result.allocation_id or "",
                job_id=result.job_id,
                held_pf_days=cv.amount_out(result.amount),
                charged_pf_days=cv.amount_out(ZERO),
                released_pf_days=cv.amount_out(ZERO),
            )
        async with self.app.database().acquire() as conn:
            return cv.hold_out(await views.hold_row(conn, result.hold_id or ""))

    async def CommitCharges(
        self, request: grant_pb2.CommitChargesRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.CommitChargesResponse:
        principal = access.require_money_service(self.app.settings.money_services, "commit charges")
        if not request.charges:
            raise InvalidArgument("charges", "is empty", "send at least one charge")
        if len(request.charges) > 1000:
            raise InvalidArgument("charges", "has more than 1000 items", "split the batch")
        charges: list[LedgerRequest] = []
        for index, item in enumerate(request.charges):
            prefix = f"charges[{index}]"
            reason = f"usage {item.usage_reference}; rate card v{item.rate_card_version}"
            charges.append(
                ChargeRequest(
                    key=request_id_in(item.request_id, f"{prefix}.request_id"),
                    hold_id=reference_in(f"{prefix}.hold_id", item.hold_id),
                    amount=cv.amount_in(f"{prefix}.amount_pf_days", item.amount_pf_days),
                    cause=_cause(principal, "CommitCharges", reason),
                )
            )
        try:
            if len(charges) == 1:
                # One charge is all or nothing anyway, so it may share a batch with others.
                outcomes = [await self.app.ledger_batcher().submit(charges[0])]
                if isinstance(outcomes[0], FailedPrecondition | NotFound):
                    raise RequestRejected(0, outcomes[0])
            else:
                # All or nothing, so a rejected charge never leaves its call half applied.
                outcomes = await self.app.direct_ledger().apply(charges, atomic=True)
        except RequestRejected as rejected:
            error = rejected.error
            if isinstance(error, FailedPrecondition):
                index = rejected.index
                raise FailedPrecondition(
                    f"charges[{index}]: {error.reason}; no charge of this call was applied",
                    field=f"charges[{index}]",
                ) from None
            raise error from None
        results = [_raise_outcome(o) for o in outcomes]
        return grant_pb2.CommitChargesResponse(
            results=[
                grant_pb2.ChargeResult(request_id=c.key, entry_id=r.entry_id, applied=r.applied)
                for c, r in zip(charges, results, strict=True)
            ]
        )

    async def ReleaseHold(
        self, request: grant_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Hold:
        principal = access.require_money_service(self.app.settings.money_services, "release holds")
        release = ReleaseRequest(
            key=request_id_in(request.request_id),
            hold_id=reference_in("hold_id", request.hold_id),
            cause=_cause(principal, "ReleaseHold"),
            settle=request.settle,
        )
        _raise_outcome(await self.app.ledger_batcher().submit(release))
        async with self.app.database().acquire() as conn:
            return cv.hold_out(await views.hold_row(conn, release.hold_id))

    async def ReleaseHolds(
        self, request: grant_pb2.ReleaseHoldsRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ReleaseHoldsResponse:
        """Release or settle many holds through the batched ledger path, each with a result.

        A release that is malformed, names an unknown hold or reuses another request's id gets
        its status in its result, and the others are applied all the same. Only a call-wide
        problem (caller, size) fails the call.
        """
        principal = access.require_money_service(self.app.settings.money_services, "release holds")
        if len(request.holds) > MAX_HOLDS_PER_CALL:
            raise InvalidArgument(
                "holds", f"has more than {MAX_HOLDS_PER_CALL} items", "split the batch"
            )
        cause = _cause(principal, "ReleaseHolds")
        results: list[grant_pb2.ReleaseHoldResult | None] = [None] * len(request.holds)
        queued: list[tuple[int, ReleaseRequest]] = []
        for index, item in enumerate(request.holds):
            try:
                release = _release_in(item, cause, f"holds[{index}].")
            except ServiceError as error:
                results[index] = _release_failure(item.request_id, error)
                continue
            queued.append((index, release))
        outcomes = await self.app.ledger_batcher().submit_many([r for _, r in queued])
        for (index, release), outcome in zip(queued, outcomes, strict=True):
            if isinstance(outcome, ServiceError):
                results[index] = _release_failure(release.key, outcome)
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                results[index] = grant_pb2.ReleaseHoldResult(request_id=release.key)
        failed = [r for r in results if r is not None and r.code != 0]
        if failed:
            log.info(
                "ReleaseHolds: %d of %d releases failed, first %s: %s",
                len(failed),
                len(results),
                failed[0].request_id,
                failed[0].message,
            )
        return grant_pb2.ReleaseHoldsResponse(results=[r for r in results if r is not None])

    async def Refund(
        self, request: grant_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.LedgerEntry:
        principal = access.require_money_service(self.app.settings.money_services, "refund charges")
        refund = RefundRequest(
            key=request_id_in(request.request_id),
            hold_id=reference_in("hold_id", request.hold_id),
            amount=cv.amount_in("amount_pf_days", request.amount_pf_days),
            cause=_cause(principal, "Refund", cv.text_in("reason", request.reason, limit=2000)),
        )
        result = _raise_outcome(await self.app.ledger_batcher().submit(refund))
        async with self.app.database().acquire() as conn:
            row, postings = await views.entry_with_postings(conn, result.entry_id)
        return cv.entry_out(row, postings)

    async def GetBalance(
        self, request: grant_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.Balance:
        grant_id = reference_in("grant_id", request.grant_id)
        async with self.app.database().acquire() as conn:
            if not request.sub_allocation_id:
                view = await _visible_grant(conn, grant_id)
                return cv.balance_out(view.balance)
            await _grant_of_readable_allocation(conn, grant_id, request.sub_allocation_id)
            balance = await views.allocation_balance(conn, grant_id, request.sub_allocation_id)
        return cv.balance_out(balance)

    async def ListLedgerEntries(
        self, request: grant_pb2.ListLedgerEntriesRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.ListLedgerEntriesResponse:
        grant_id = reference_in("grant_id", request.grant_id)
        limit, token = page_in(request.page)
        if token and not (token.isascii() and token.isdigit() and int(token) <= MAX_BIGINT):
            raise InvalidArgument(
                "page.page_token",
                f"{token!r} is not a token this call returned",
                "pass it back unchanged",
            )
        kind = cv.ENTRY_KIND_IN.get(request.kind)  # type: ignore[call-overload]
        async with self.app.database().acquire() as conn:
            await _visible_grant(conn, grant_id)
            page = await views.list_entries(
                conn, grant_id, kind.value if kind else "", int(token or 0), limit
            )
        return grant_pb2.ListLedgerEntriesResponse(
            entries=[cv.entry_out(r, p) for r, p in page],
            page=page_out([str(r["id"]) for r, _ in page], limit),
        )

    async def GetLedgerSummary(
        self, request: grant_pb2.GetLedgerSummaryRequest, context: grpc.aio.ServicerContext
    ) -> grant_pb2.GetLedgerSummaryResponse:
        access.require_program_office("read the program's ledger summary")
        async with self.app.database().acquire() as conn:
            summary = await views.ledger_summary(conn)
        return grant_pb2.GetLedgerSummaryResponse(
            postings_sum_pf_days=cv.signed_out(summary.postings_sum),
            entry_count=summary.entry_count,
            negative_grant_ids=summary.negative_grant_ids,
            program_pool_pf_days=cv.signed_out(summary.program_pool),
        )


def _allocation_out(row: asyncpg.Record, balance: rules.RolledBalance) -> grant_pb2.SubAllocation:
    message = grant_pb2.SubAllocation(
        sub_allocation_id=row["id"],
        grant_id=row["grant_id"],
        parent_sub_allocation_id=row["parent_id"] or "",
        holder=row["holder"],
        balance=cv.balance_out(balance),
    )
    cv.time_out(row["created_at"], message.create_time)
    return message
