"""Fleet RPCs of the scheduler: nodes, drains and the catalog.

The pledge and recall RPCs are in :mod:`.pledge_api`, the provider registry's in
:mod:`.provider_api`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import grpc

from acsp import decimals
from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.engine.catalog import DEFAULT_CATALOG
from services.runtime.auth import Role, current_principal, require_roles
from services.runtime.context import remaining_s
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

from .engine_adapter import AcceleratorHealth, EngineAdapter
from .fleet import NODE_STATUSES, AcceleratorView, NodeView
from .inputs import DrainRequested, NodeDownRequested
from .leadership import Term
from .pledge_api import OPERATORS, PledgeRpcs, require_operator_of
from .validation import MAX_REASON_LENGTH, MAX_REQUEST_ID_LENGTH, check_length


class FleetRpcs(PledgeRpcs):
    """Handlers of the fleet half of ``SchedulerService``."""

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListNodesResponse:
        current_principal()
        leader = self._lead.require()
        wanted = _node_state_name(request.state) if request.state else ""
        nodes = sorted(leader.fleet.nodes(), key=lambda n: n.key)
        jobs = leader.book.jobs_by_node()
        selected = [
            n
            for n in nodes
            if (not request.provider_id or n.provider == request.provider_id)
            and (not request.region_id or n.region == request.region_id)
            and (not wanted or shown_status(n, jobs) == wanted)
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
        require_operator_of(request.provider_id)
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
        state=scheduler_pb2.NodeState.Value(f"NODE_STATE_{shown_status(node, jobs).upper()}"),  # type: ignore[arg-type]
        accelerators=[_accelerator_to_proto(node, acc, failures) for acc in node.accelerators],
        software_stacks=node.software_stacks,
        state_cause=_state_cause(node),
        job_ids=jobs.get(node.key, ()),
    )
    if node.last_heartbeat:
        msg.last_heartbeat_time.FromNanoseconds(int(node.last_heartbeat * 1e9))
    return msg


def shown_status(node: NodeView, jobs: Mapping[str, list[str]]) -> str:
    """Return the status that node lists show: a draining node that runs nothing is drained.

    ``jobs`` maps node keys to the jobs that may still run a task there, including copies
    whose stop is not yet confirmed, so a node is drained only once every stop is confirmed.
    """
    if node.status == "draining" and not jobs.get(node.key):
        return "drained"
    return node.status


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
