"""Fleet RPCs of the scheduler: nodes, drains, the catalog, pledges and recalls.

The provider registry's RPCs are in :mod:`.provider_api`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Final

import grpc

from acsp import decimals
from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.engine.catalog import DEFAULT_CATALOG
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.context import remaining_s, request_id
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

from .engine_adapter import AcceleratorHealth, EngineAdapter
from .errors import InvalidFields
from .fleet import NODE_STATUSES, AcceleratorView, NodeView
from .inputs import DrainRequested, NodeDownRequested, PledgeChanged, RecallAdded
from .leadership import Leadership, Term
from .model import utc_text
from .pledges import (
    PledgeStore,
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


class FleetRpcs(ProviderRpcs):
    """Handlers of the fleet half of ``SchedulerService``."""

    def __init__(self, leadership: Leadership) -> None:
        super().__init__(leadership)
        self._pledges = PledgeStore(leadership.pool)

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListNodesResponse:
        current_principal()
        leader = self._lead.require()
        wanted = _node_state_name(request.state) if request.state else ""
        nodes = sorted(leader.fleet.nodes(), key=lambda n: n.key)
        selected = [
            n
            for n in nodes
            if (not request.provider_id or n.provider == request.provider_id)
            and (not request.region_id or n.region == request.region_id)
            and (not wanted or n.status == wanted)
        ]
        size = request.page.page_size or 100
        if size > 1000:
            raise InvalidArgument("page.page_size", f"{size} is above 1000", "ask for at most 1000")
        token_text = request.page.page_token
        if token_text and not (token_text.isascii() and token_text.isdigit()):
            raise InvalidArgument(
                "page.page_token",
                f"{token_text!r} is not a token this list returned",
                "pass next_page_token of the previous page, or leave it empty for the first page",
            )
        start = int(token_text or 0)
        page = selected[start : start + size]
        token = str(start + size) if start + size < len(selected) else ""
        failures = _failures_by_accelerator(leader.book.engine)
        jobs = leader.book.jobs_by_node()
        return scheduler_pb2.ListNodesResponse(
            nodes=[_node_to_proto(n, failures, jobs) for n in page],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def GetNode(
        self, request: scheduler_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Node:
        current_principal()
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        leader = self._lead.require()
        node = leader.fleet.get(key)
        if node is None:
            raise NotFound("node", _node_name(request))
        return _node_reply(leader, node)

    async def DrainNode(
        self, request: scheduler_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Node:
        principal = require_roles(*OPERATORS)
        if Role.PROVIDER_OPERATOR in principal.roles and principal.provider not in (
            None,
            request.provider_id,
        ):
            raise PermissionDenied(
                f"operator of provider {principal.provider!r} cannot drain "
                f"nodes of {request.provider_id!r}"
            )
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        check_length("reason", request.reason, MAX_REASON_LENGTH)
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        leader = self._lead.require()
        reply: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
        reason = request.reason or ("undrained" if request.undrain else "drained by operator")
        # The loop replies once its turn has stored the change.
        await leader.inbox.put(DrainRequested(key, not request.undrain, reason, reply))
        node = await asyncio.wait_for(reply, timeout=remaining_s(10.0))
        if node is None:
            raise NotFound("node", _node_name(request))
        return _node_reply(leader, node)

    async def MarkNodeDown(
        self, request: scheduler_pb2.MarkNodeDownRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Node:
        _require_operator_of(request.provider_id)
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        check_length("reason", request.reason, MAX_REASON_LENGTH)
        if not request.reason.strip():
            raise InvalidArgument(
                "reason",
                "is empty",
                "say how you know that nothing runs on the node, e.g. 'powered off'",
            )
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        leader = self._lead.require()
        reply: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
        await leader.inbox.put(NodeDownRequested(key, request.reason, reply))
        node = await asyncio.wait_for(reply, timeout=remaining_s(10.0))
        if node is None:
            raise NotFound("node", _node_name(request))
        if node.status != "down":
            if node.status == "draining":
                next_step = (
                    "It takes no new work already. Stop its agent, wait until the node shows "
                    "as unknown, then mark it down"
                )
            else:
                next_step = (
                    "Drain it to stop new work, or stop its agent and wait until the node "
                    "shows as unknown"
                )
            raise FailedPrecondition(
                f"node {_node_name(request)} is {node.status}, and only an unknown node (one "
                f"that missed its heartbeats) can be marked down. {next_step}",
                "node_id",
            )
        return _node_reply(leader, node)

    async def ListAcceleratorModels(
        self,
        request: scheduler_pb2.ListAcceleratorModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.ListAcceleratorModelsResponse:
        current_principal()
        return scheduler_pb2.ListAcceleratorModelsResponse(
            models=[
                common_pb2.AcceleratorModel(
                    name=m.name,
                    vendor=common_pb2.Vendor.Value(f"VENDOR_{m.vendor.upper()}"),  # type: ignore[arg-type]
                    memory_gib=m.memory_gib,
                    peak_dense_tflops=decimals.to_proto(m.peak_tflops),
                    reference_precision="fp16/bf16-tensor",
                    software_stacks=[m.software_stack],
                    source=m.source,
                )
                for m in DEFAULT_CATALOG
            ]
        )

    async def SetPledge(
        self, request: scheduler_pb2.SetPledgeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Pledge:
        _require_operator_of(request.pledge.provider_id)
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
        if not stored:
            raise InvalidArgument(
                "pledge.pledge_id",
                f"{pledge.pledge_id!r} names a pledge of another provider, region or model",
                "leave pledge_id empty to create a pledge",
            )
        await leader.inbox.put(PledgeChanged(pledge))
        return pledge_to_proto(pledge)

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
                "register it with RegisterProvider before it pledges",
            )
        regions = [r.region_id for r in provider.regions]
        if region_id not in regions:
            raise InvalidArgument(
                "pledge.region_id",
                f"{region_id!r} is not a registered region of provider {provider_id!r}"
                f" (registered: {', '.join(regions) or 'none'})",
                "name a registered region, or add it with RegisterProvider",
            )

    async def ListPledges(
        self, request: scheduler_pb2.ListPledgesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListPledgesResponse:
        current_principal()
        pledges = await self._pledges.pledges(request.provider_id)
        return scheduler_pb2.ListPledgesResponse(pledges=[pledge_to_proto(p) for p in pledges])

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
        if not wanted.HasField("effective_time"):
            raise InvalidArgument(
                "recall.effective_time", "is missing", "set when the capacity must be free"
            )
        for name in ("effective_time", "end_time"):
            problem = timestamp_problem(getattr(wanted, name))
            if problem:
                raise InvalidArgument(f"recall.{name}", problem, "pass a time within that range")
        effective = wanted.effective_time.ToNanoseconds() / 1e9
        if effective < time.time() - RECALL_PAST_LEEWAY_S:
            raise InvalidArgument(
                "recall.effective_time",
                f"is {utc_text(effective)}, in the past, which would skip the jobs' notice",
                "set it to now or later",
            )
        end = wanted.end_time.ToNanoseconds() / 1e9 if wanted.HasField("end_time") else None
        if end is not None and end <= effective:
            raise InvalidArgument(
                "recall.end_time", "is not after effective_time", "end the recall later"
            )
        leader = self._lead.require()
        recall = RecallRecord(
            f"rc-{uuid.uuid4().hex[:16]}",
            wanted.pledge_id,
            wanted.count,
            effective,
            end,
            wanted.reason,
        )
        try:
            owner = {p.pledge_id: p for p in await self._pledges.pledges()}.get(wanted.pledge_id)
            if owner is None:
                raise KeyError(wanted.pledge_id)
            _check_operator(principal, owner.provider)
            recall, pledge = await self._pledges.add_recall(recall, request.request_id or None)
        except KeyError:
            raise NotFound("pledge", wanted.pledge_id) from None
        except RequestReused as exc:
            raise FailedPrecondition(f"{exc} {_REUSED_FIX}", "request_id") from None
        except LookupError as exc:
            raise FailedPrecondition(str(exc), "recall.count") from None
        await leader.inbox.put(RecallAdded(recall, pledge))
        return recall_to_proto(recall)

    async def ListRecalls(
        self, request: scheduler_pb2.ListRecallsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListRecallsResponse:
        current_principal()
        recalls = await self._pledges.recalls(request.provider_id)
        return scheduler_pb2.ListRecallsResponse(recalls=[recall_to_proto(r) for r in recalls])


_REUSED_FIX: Final = (
    "with other values; repeat that request unchanged to get its result, or use a new request_id"
)


def _require_operator_of(provider: str) -> Principal:
    principal = require_roles(*OPERATORS)
    _check_operator(principal, provider)
    return principal


def _check_operator(principal: Principal, provider: str) -> None:
    if Role.PROVIDER_OPERATOR in principal.roles and principal.provider not in (None, provider):
        raise PermissionDenied(
            f"operator of provider {principal.provider!r} cannot act for provider {provider!r}"
        )


def _node_state_name(value: int) -> str:
    try:
        enum_name = scheduler_pb2.NodeState.Name(value)  # type: ignore[arg-type]
    except ValueError:
        enum_name = ""
    name = enum_name.removeprefix("NODE_STATE_").lower()
    if name not in NODE_STATUSES:
        raise InvalidArgument("state", f"{value} is not a node state", "omit it or pass one")
    return name


def _failures_by_accelerator(
    engine: EngineAdapter,
) -> dict[tuple[str, str], AcceleratorHealth]:
    """Index the leader's failed accelerators by node key and accelerator id."""
    return {(f.node_key, f.accelerator_id): f for f in engine.failed_accelerators()}


def _accelerator_to_proto(
    node: NodeView, acc: AcceleratorView, failures: Mapping[tuple[str, str], AcceleratorHealth]
) -> scheduler_pb2.Accelerator:
    """Convert one accelerator, failed if the leader keeps it out of placement.

    The leader's failure list wins over the inventory: a failure stays until the agent
    reports the condition cleared, even when a later inventory calls the device healthy.
    """
    msg = scheduler_pb2.Accelerator(
        accelerator_id=acc.accelerator_id,
        pci_bus_id=acc.pci_bus_id,
        model=acc.model,
        interconnect_domain=acc.interconnect_domain,
        health=scheduler_pb2.HEALTH_STATE_OK if acc.healthy else scheduler_pb2.HEALTH_STATE_FAILED,
    )
    failure = failures.get((node.key, acc.accelerator_id))
    if failure is not None:
        msg.health = scheduler_pb2.HEALTH_STATE_FAILED
        trigger = "inventory" if failure.event_id.startswith("inventory:") else "event:health"
        msg.health_cause.CopyFrom(
            common_pb2.Cause(trigger=trigger, reference_id=failure.event_id, reason=failure.reason)
        )
    return msg


def _node_reply(leader: Term, node: NodeView) -> scheduler_pb2.Node:
    """Return ``node`` as the reply of a call about one node, with its failures and jobs."""
    return _node_to_proto(
        node, _failures_by_accelerator(leader.book.engine), leader.book.jobs_by_node()
    )


def _node_to_proto(
    node: NodeView,
    failures: Mapping[tuple[str, str], AcceleratorHealth],
    jobs: Mapping[str, list[str]],
) -> scheduler_pb2.Node:
    msg = scheduler_pb2.Node(
        node_id=node.node,
        provider_id=node.provider,
        region_id=node.region,
        state=scheduler_pb2.NodeState.Value(f"NODE_STATE_{node.status.upper()}"),  # type: ignore[arg-type]
        accelerators=[_accelerator_to_proto(node, acc, failures) for acc in node.accelerators],
        software_stacks=node.software_stacks,
        state_cause=_state_cause(node),
        job_ids=jobs.get(node.key, ()),
    )
    if node.last_heartbeat:
        msg.last_heartbeat_time.FromNanoseconds(int(node.last_heartbeat * 1e9))
    return msg


DRAIN_TRIGGERS: Final[Mapping[str, str]] = {
    "operator": "rpc:DrainNode",
    "agent": "agent:drain_requested",
}
"""The trigger of a draining node's state cause, by who requested the drain."""


def _state_cause(node: NodeView) -> common_pb2.Cause:
    """Return the cause of ``node``'s state. For a draining node it names who requested the
    drain, and when."""
    drain = node.drain
    if drain is None or node.status not in ("draining", "drained"):
        return common_pb2.Cause(reason=node.status_reason)
    cause = common_pb2.Cause(trigger=DRAIN_TRIGGERS[drain.source], reason=drain.reason)
    if drain.at:
        cause.time.FromNanoseconds(int(drain.at * 1e9))
    return cause


def _node_name(
    request: scheduler_pb2.GetNodeRequest
    | scheduler_pb2.DrainNodeRequest
    | scheduler_pb2.MarkNodeDownRequest,
) -> str:
    """Return the node of ``request`` as ``<provider>/<region>/<node>``, as operators write it."""
    return f"{request.provider_id}/{request.region_id}/{request.node_id}"
