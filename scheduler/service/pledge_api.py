"""Pledge and recall RPCs of the scheduler: SetPledge, ListPledges, RecallCapacity, ListRecalls."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Final

import grpc
from google.protobuf import duration_pb2

from acsp.time_range import LATEST_SECONDS, LATEST_TIME, RANGE_FIX
from acsp.v1 import scheduler_pb2
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.context import request_id
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

from .errors import InvalidFields
from .inputs import PledgeChanged, RecallAdded
from .leadership import Leadership, Term
from .model import utc_text
from .pledges import (
    PledgeOverlap,
    PledgeRecord,
    PledgeStore,
    RecallPastPledge,
    RecallRecord,
    RequestReused,
    pledge_from_proto,
    pledge_to_proto,
    recall_to_proto,
    timestamp_problem,
)
from .provider_api import ProviderRpcs
from .validation import MAX_REASON_LENGTH, MAX_REQUEST_ID_LENGTH, check_length

OPERATORS: Final = (Role.PROVIDER_OPERATOR, Role.PROGRAM_OFFICE, Role.SERVICE)

RECALL_PAST_LEEWAY_S: Final = 300.0
"""How far in the past a recall may take effect, for clocks that differ and a recall that
means now."""


class PledgeRpcs(ProviderRpcs):
    """Handlers of the pledge and recall RPCs of ``SchedulerService``."""

    def __init__(self, leadership: Leadership) -> None:
        super().__init__(leadership)
        self._pledges = PledgeStore(leadership.pool)

    async def SetPledge(
        self, request: scheduler_pb2.SetPledgeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Pledge:
        require_operator_of(request.pledge.provider_id)
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        pledge, violations = pledge_from_proto(request.pledge, request.request_id)
        if violations:
            raise InvalidFields(violations)
        leader = self._lead.require()
        await self._check_registered_region(leader, pledge.provider, pledge.region)
        cause = f"rpc:SetPledge:{request.request_id or request_id() or ''}"
        created = not request.pledge.pledge_id
        try:
            stored = await self._pledges.upsert(pledge, cause, created)
        except KeyError:
            # Caught before LookupError, which is its base class.
            raise NotFound(
                "pledge",
                pledge.pledge_id,
                "leave pledge_id empty to create a pledge, or pass an id that ListPledges returns",
            ) from None
        except LookupError as exc:
            raise FailedPrecondition(str(exc), "pledge.recallable_count") from None
        except RequestReused as exc:
            raise FailedPrecondition(f"{exc} {_REUSED_FIX}", "request_id") from None
        except PledgeOverlap as exc:
            raise FailedPrecondition(str(exc), "pledge.window") from None
        if not stored:
            raise InvalidArgument(
                "pledge.pledge_id",
                f"{pledge.pledge_id!r} names a pledge of another provider, region or model",
                "leave pledge_id empty to create a pledge",
            )
        await leader.inbox.put(PledgeChanged(pledge))
        engine = leader.book.engine
        return pledge_to_proto(
            pledge, engine.registered_accelerators(pledge), engine.healthy_accelerators(pledge)
        )

    async def _check_registered_region(
        self, leader: Term, provider_id: str, region_id: str
    ) -> None:
        """Raise InvalidArgument unless ``region_id`` is a registered region of ``provider_id``.

        The registry also contains the providers and regions that node inventories registered.
        A node of the region in the leader's fleet counts too: its inventory registers the
        region in the loop turn's commit, which may not have happened yet.
        """
        if any(n.provider == provider_id and n.region == region_id for n in leader.fleet.nodes()):
            return
        provider = await self._providers.get(provider_id)
        if provider is None:
            raise InvalidArgument(
                "pledge.provider_id",
                f"provider {provider_id!r} is not registered",
                f"start a node agent of the region (acsp agent run --provider {provider_id} "
                f"--region REGION), whose inventory registers both, or have the program office "
                "call the RegisterProvider RPC, which the acsp CLI has no command for",
            )
        regions = [r.region_id for r in provider.regions]
        if region_id not in regions:
            raise InvalidArgument(
                "pledge.region_id",
                f"{region_id!r} is not a registered region of provider {provider_id!r}"
                f" (registered: {', '.join(regions) or 'none'})",
                "name a registered region, or register this one by starting a node agent in it "
                f"(acsp agent run --provider {provider_id} --region {region_id}), whose inventory "
                "registers it. The RegisterProvider RPC registers regions too, but the acsp CLI "
                "has no command for it",
            )

    async def ListPledges(
        self, request: scheduler_pb2.ListPledgesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListPledgesResponse:
        current_principal()
        pledges = await self._pledges.pledges(request.provider_id)
        term = self._lead.current
        if term is None:
            # A standby has no fleet in memory, so it leaves the counts 0.
            return scheduler_pb2.ListPledgesResponse(pledges=[pledge_to_proto(p) for p in pledges])
        engine = term.book.engine
        return scheduler_pb2.ListPledgesResponse(
            pledges=[
                pledge_to_proto(
                    p, engine.registered_accelerators(p), engine.healthy_accelerators(p)
                )
                for p in pledges
            ],
            fleet_counted=True,
        )

    async def RecallCapacity(
        self, request: scheduler_pb2.RecallCapacityRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Recall:
        principal = require_roles(*OPERATORS)
        wanted = request.recall
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        check_length("recall.reason", wanted.reason, MAX_REASON_LENGTH)
        if not wanted.pledge_id:
            raise InvalidArgument("recall.pledge_id", "is empty", "name the pledge to recall from")
        if wanted.count <= 0:
            raise InvalidArgument("recall.count", "is 0", "recall at least one accelerator")
        recall = recall_from_request(request, time.time())
        leader = self._lead.require()
        try:
            owner = {p.pledge_id: p for p in await self._pledges.pledges()}.get(wanted.pledge_id)
            if owner is None:
                raise KeyError(wanted.pledge_id)
            check_operator(principal, owner.provider)
            recall, pledge, freed = await self._pledges.add_recall(
                recall, request.request_id or None, lambda r, p: _freed_by(leader, r, p)
            )
        except KeyError:
            raise NotFound("pledge", wanted.pledge_id) from None
        except RecallPastPledge as exc:
            field, name, reason = "recall.end_time", "end_time", str(exc)
            if recall.duration is not None and recall.end is not None:
                field = name = "duration"
                reason = (
                    f"ends the recall at {utc_text(recall.end)}, after pledge "
                    f"{exc.pledge.pledge_id} ends at {utc_text(exc.pledge.end)}"
                )
            raise InvalidArgument(
                field,
                reason,
                f"end the recall at {utc_text(exc.pledge.end)} or earlier, or leave {name} "
                "unset so that the recall ends with its pledge",
            ) from None
        except RequestReused as exc:
            raise FailedPrecondition(f"{exc} {_REUSED_FIX}", "request_id") from None
        except LookupError as exc:
            raise FailedPrecondition(str(exc), "recall.count") from None
        await leader.inbox.put(RecallAdded(recall, pledge))
        return recall_to_proto(recall, freed)

    async def ListRecalls(
        self, request: scheduler_pb2.ListRecallsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListRecallsResponse:
        current_principal()
        recalls = await self._pledges.recalls(request.provider_id)
        return scheduler_pb2.ListRecallsResponse(recalls=[recall_to_proto(r) for r in recalls])


def recall_from_request(request: scheduler_pb2.RecallCapacityRequest, now: float) -> RecallRecord:
    """Convert the recall of a RecallCapacity request; raise InvalidArgument naming the field.

    A notice or duration resolves to an effective or end time from ``now`` (Unix seconds).
    The recall keeps both, so that a retry of the request matches on them.
    """
    requested = request.recall
    notice = _relative(request, "notice", "effective_time", allow_zero=True)
    duration = _relative(request, "duration", "end_time", allow_zero=False)
    if notice is None and not requested.HasField("effective_time"):
        raise InvalidArgument(
            "recall.effective_time",
            "is missing",
            "set when the capacity must be free, or set notice instead",
        )
    for name in ("effective_time", "end_time"):
        problem = timestamp_problem(getattr(requested, name)) if requested.HasField(name) else ""
        if problem:
            raise InvalidArgument(f"recall.{name}", problem, RANGE_FIX)
    # The arithmetic is on datetimes, exact to the microsecond that the table keeps, so the
    # stored end is exactly duration after the stored effective time.
    if notice is not None:
        _check_before_latest("notice", notice, now)
        effective = datetime.fromtimestamp(now, UTC) + notice
    else:
        effective = requested.effective_time.ToDatetime(tzinfo=UTC)
        if effective.timestamp() < now - RECALL_PAST_LEEWAY_S:
            raise InvalidArgument(
                "recall.effective_time",
                f"is {utc_text(effective.timestamp())}, in the past, which would skip the "
                "jobs' notice",
                "set it to now or later, or set notice instead",
            )
    end: datetime | None = None
    if duration is not None:
        _check_before_latest("duration", duration, effective.timestamp())
        end = effective + duration
    elif requested.HasField("end_time"):
        end = requested.end_time.ToDatetime(tzinfo=UTC)
        if end <= effective:
            raise InvalidArgument(
                "recall.end_time", "is not after effective_time", "end the recall later"
            )
    return RecallRecord(
        f"rc-{uuid.uuid4().hex[:16]}",
        requested.pledge_id,
        requested.count,
        effective.timestamp(),
        end.timestamp() if end is not None else None,
        requested.reason,
        notice,
        duration,
    )


def _relative(
    request: scheduler_pb2.RecallCapacityRequest, name: str, absolute: str, allow_zero: bool
) -> timedelta | None:
    """Return the request's ``name`` Duration as a timedelta, or None when it is unset.

    Raise InvalidArgument when it is set together with ``recall.<absolute>``, which it
    replaces, or when it is not a valid Duration, negative, or 0 without ``allow_zero``.
    """
    if not request.HasField(name):
        return None
    value: duration_pb2.Duration = getattr(request, name)
    if request.recall.HasField(absolute):
        raise InvalidArgument(
            name, f"is set together with recall.{absolute}", "set only one of them"
        )
    seconds, nanos = value.seconds, value.nanos
    if abs(nanos) >= 1_000_000_000 or (seconds and nanos and (seconds > 0) != (nanos > 0)):
        raise InvalidArgument(
            name,
            f"has seconds={seconds} and nanos={nanos}, which is not a valid Duration",
            "give nanos from -999999999 to 999999999 with the sign of seconds",
        )
    if seconds < 0 or nanos < 0:
        raise InvalidArgument(name, "is negative", "give 0 seconds or more")
    if not allow_zero and seconds == 0 and nanos == 0:
        raise InvalidArgument(name, "is not above 0", "give a duration above 0 seconds")
    # Microseconds, toward zero, as the table stores intervals.
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


def _check_before_latest(name: str, length: timedelta, start: float) -> None:
    """Raise InvalidArgument naming ``name`` unless ``start`` plus ``length`` falls before
    the latest time a recall may name."""
    if start + length.total_seconds() < LATEST_SECONDS:
        return
    raise InvalidArgument(
        name,
        f"is {length.total_seconds():g} s, which ends on or after {LATEST_TIME.date()}",
        f"give fewer seconds, so that the recall ends before {LATEST_TIME.date()}",
    )


_REUSED_FIX: Final = (
    "with other values; repeat that request unchanged to get its result, or use a new request_id"
)


def _freed_by(term: Term, recall: RecallRecord, pledge: PledgeRecord) -> int:
    """Return the accelerators ``recall`` takes from what its region may use, with the fleet
    in the leader's memory now. Raise FailedPrecondition when it would take none.

    A recall that frees nothing is rejected, so that a provider never believes it has
    capacity back that jobs still use.
    """
    # NOTE: a recall accepted a moment ago but not yet applied by the loop is not counted, so
    # two recalls in quick succession may report more freed accelerators than the second frees.
    if not pledge.start <= recall.effective_at < pledge.end:
        raise FailedPrecondition(
            f"takes effect at {utc_text(recall.effective_at)}, outside the window of pledge "
            f"{pledge.pledge_id} ({utc_text(pledge.start)} to {utc_text(pledge.end)}), so it "
            "would free nothing; set a time within the window",
            "recall.effective_time",
        )
    freed = term.book.engine.recall_frees(pledge, recall)
    if freed > 0:
        return freed
    registered = term.book.engine.registered_accelerators(pledge)
    where = f"{pledge.provider}/{pledge.region}"
    if registered == 0:
        raise FailedPrecondition(
            f"{where} has no registered {pledge.model} accelerators, so the recall would free "
            "nothing; recall once their nodes have joined (acsp fleet nodes lists them)",
            "recall.count",
        )
    raise FailedPrecondition(
        f"{where} has {registered} registered {pledge.model} accelerators and pledge "
        f"{pledge.pledge_id} protects {pledge.protected}, which a recall cannot take, so the "
        "recall would free nothing; lower the protected count with acsp fleet pledge set "
        f"--pledge-id {pledge.pledge_id}, or recall once more accelerators have joined",
        "recall.count",
    )


def require_operator_of(provider: str) -> Principal:
    principal = require_roles(*OPERATORS)
    check_operator(principal, provider)
    return principal


def check_operator(principal: Principal, provider: str) -> None:
    if Role.PROVIDER_OPERATOR in principal.roles and principal.provider not in (None, provider):
        raise PermissionDenied(
            f"operator of provider {principal.provider!r} cannot act for provider {provider!r}"
        )
