"""Fleet RPCs of the scheduler: nodes, drains, deletions and the catalog.

The pledge and recall RPCs are in :mod:`.pledge_api`, the provider registry's in
:mod:`.provider_api`.
"""

from __future__ import annotations

import asyncio

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
    quoted,
)

from .fleet import NODE_STATUSES, NodeView
from .inputs import DrainRequested, NodeDeleteRequested, NodeDownRequested
from .leadership import Term
from .node_deletion import DeleteOutcome
from .node_proto import failures_by_accelerator, node_to_proto, shown_status
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
        failures = failures_by_accelerator(leader.book.engine)
        return scheduler_pb2.ListNodesResponse(
            nodes=[node_to_proto(n, failures, jobs) for n in page],
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

    async def DeleteNode(
        self, request: scheduler_pb2.DeleteNodeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Node:
        principal = require_operator_of(request.provider_id)
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        check_length("reason", request.reason, MAX_REASON_LENGTH)
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        leader = self._lead.require()
        if request.request_id:
            earlier = await _earlier_deletion(leader, request)
            if earlier is not None:
                return earlier
        reply: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()
        await leader.inbox.put(
            NodeDeleteRequested(key, request.reason, request.request_id, principal.subject, reply)
        )
        outcome = await asyncio.wait_for(reply, timeout=remaining_s(10.0))
        if outcome.deletion is not None:
            return scheduler_pb2.Node.FromString(outcome.deletion.node_message)
        if outcome.node is None:
            # A call with the same request id may have deleted the node in the meantime.
            earlier = await _earlier_deletion(leader, request) if request.request_id else None
            if earlier is not None:
                return earlier
            raise NotFound("node", _node_name(request))
        raise FailedPrecondition(_kept_reason(_node_name(request), outcome), "node_id")

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


def _node_reply(leader: Term, node: NodeView) -> scheduler_pb2.Node:
    """Return ``node`` as the reply of a call about one node, with its failures and jobs."""
    return node_to_proto(
        node, failures_by_accelerator(leader.book.engine), leader.book.jobs_by_node()
    )


async def _earlier_deletion(
    leader: Term, request: scheduler_pb2.DeleteNodeRequest
) -> scheduler_pb2.Node | None:
    """Return the node that an earlier DeleteNode call with the request's id deleted, or None.

    Raises FAILED_PRECONDITION when that call deleted another node.
    """
    found = await leader.nodes.deletion(request.request_id)
    if found is None:
        return None
    key, message = found
    node = scheduler_pb2.Node.FromString(message)
    name = f"{node.provider_id}/{node.region_id}/{node.node_id}"
    if key != f"{request.provider_id}.{request.region_id}.{request.node_id}":
        raise FailedPrecondition(
            f"request_id {quoted(request.request_id)} was already used to delete node {name}. "
            "Repeat that request unchanged to get its result, or use a new request_id",
            "request_id",
        )
    return node


def _kept_reason(name: str, outcome: DeleteOutcome) -> str:
    """Return why node ``name`` was not deleted and what to do first."""
    status = outcome.status
    if outcome.jobs:
        listed = ", ".join(outcome.jobs[:5])
        if len(outcome.jobs) > 5:
            listed += f" and {len(outcome.jobs) - 5} more"
        if status == "down":
            # The down mark confirmed that nothing runs there, so no stop is awaited.
            return (
                f"node {name} is down and jobs {listed} still have tasks placed there, which "
                "the next scheduling pass requeues, moves or ends. Retry in a few seconds"
            )
        if status == "up":
            fix = "Drain it, wait until its jobs stop, then delete it"
        elif status == "unknown":
            fix = (
                "It missed its heartbeats, so it cannot confirm their stops. Once the machine "
                "is off or runs nothing, mark it down, then delete it"
            )
        else:
            fix = (
                "Wait until they stop and their node confirms the stops, or cancel them, "
                "then delete it"
            )
        return f"node {name} is {status} and jobs {listed} may still run a task on it. {fix}"
    if status == "unknown":
        fix = "Drain it, or mark it down once the machine is off or runs nothing, then delete it"
    else:
        fix = "Drain it, wait until it shows as drained, then delete it"
    return (
        f"node {name} is {status} and not drained, and only a drained or down node can be "
        f"deleted. {fix}"
    )


def _node_name(
    request: scheduler_pb2.GetNodeRequest
    | scheduler_pb2.DrainNodeRequest
    | scheduler_pb2.MarkNodeDownRequest
    | scheduler_pb2.DeleteNodeRequest,
) -> str:
    """Return the node of ``request`` as ``<provider>/<region>/<node>``, as operators write it."""
    return f"{request.provider_id}/{request.region_id}/{request.node_id}"
