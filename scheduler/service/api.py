"""The ``acsp.v1.SchedulerService`` servicer: protobuf at the edge, dataclasses inside.

Reads are served from PostgreSQL by every replica. Writes (submit, cancel, drain) and watches
need the shard's leader. A standby rejects them with UNAVAILABLE, so clients retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Final

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from acsp.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.engine.catalog import DEFAULT_CATALOG
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.context import remaining_s, request_id
from services.runtime.errors import (
    CallerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

from .convert import job_state_from_proto, job_to_proto, spec_from_proto
from .fleet import NODE_STATUSES, NodeView
from .inputs import CancelRequested, DrainRequested, PledgeChanged, RecallAdded
from .leadership import Leadership
from .model import Job, JobFilter, new_job_id
from .pledges import (
    PledgeStore,
    RecallRecord,
    pledge_from_proto,
    pledge_to_proto,
    recall_to_proto,
)
from .store import decode_page_token
from .validation import FieldViolation, validate_array_size, validate_spec
from .watch import WatchOverflow

logger = logging.getLogger(__name__)

WATCH_POLL_S: Final = 1.0
SUBMITTERS: Final = (Role.RESEARCHER, Role.PI, Role.SERVICE, Role.PROGRAM_OFFICE)
OPERATORS: Final = (Role.PROVIDER_OPERATOR, Role.PROGRAM_OFFICE, Role.SERVICE)


class InvalidJobRequest(CallerError):
    """Every invalid field of a request, with ``google.rpc.BadRequest`` details."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        text = "; ".join(f"{v.field} {v.reason}" for v in violations)
        super().__init__(f"invalid job request: {text}")
        self.violations = violations

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, leadership: Leadership) -> None:
        self._lead = leadership
        self._pledges = PledgeStore(leadership.pool)

    # Jobs.

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        principal = require_roles(*SUBMITTERS)
        jobs, request_ids, array_id = self._prepare(request, principal, "")
        stored = await self._lead.require().batcher.submit(jobs, request_ids)
        return _submit_response(stored, array_id, request.spec.array_size)

    async def SubmitJobs(
        self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobsResponse:
        principal = require_roles(*SUBMITTERS)
        prepared = [
            self._prepare(item, principal, f"jobs[{i}].") for i, item in enumerate(request.jobs)
        ]
        jobs = [job for p in prepared for job in p[0]]
        request_ids = [rid for p in prepared for rid in p[1]]
        stored = await self._lead.require().batcher.submit(jobs, request_ids)
        results = []
        offset = 0
        for (batch, _, array_id), item in zip(prepared, request.jobs, strict=True):
            part = stored[offset : offset + len(batch)]
            offset += len(batch)
            results.append(_submit_response(part, array_id, item.spec.array_size))
        return scheduler_pb2.SubmitJobsResponse(results=results)

    def _prepare(
        self, request: scheduler_pb2.SubmitJobRequest, principal: Principal, prefix: str
    ) -> tuple[list[Job], list[str | None], str]:
        spec, violations = spec_from_proto(request.spec)
        violations += validate_spec(spec, f"{prefix}spec")
        violations += validate_array_size(request.spec.array_size, f"{prefix}spec.array_size")
        if violations:
            raise InvalidJobRequest(
                [
                    FieldViolation(
                        f"{prefix}{v.field}" if not v.field.startswith(prefix) else v.field,
                        v.reason,
                    )
                    for v in violations
                ]
            )
        owner = principal.subject
        institution = principal.institution or ""
        size = request.spec.array_size
        rid = request.request_id or None
        if size <= 1:
            job = Job(job_id=new_job_id(), spec=spec, owner=owner, institution=institution)
            return [job], [rid], ""
        array_id = new_job_id()
        jobs = [
            Job(
                job_id=f"{array_id}-{index}",
                spec=replace(spec, env=(*spec.env, ("ACSP_ARRAY_INDEX", str(index)))),
                owner=owner,
                institution=institution,
                array_id=array_id,
                array_index=index,
            )
            for index in range(size)
        ]
        return jobs, [f"{rid}/{i}" if rid else None for i in range(size)], array_id

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        principal = current_principal()
        if not request.job_id:
            raise InvalidArgument("job_id", "is empty", "pass the id SubmitJob returned")
        job = await self._lead.store.get_job(request.job_id)
        if job is None or not _may_see(principal, job):
            raise NotFound("job", request.job_id)
        return job_to_proto(job)

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListJobsResponse:
        principal = current_principal()
        states: list[str] = []
        for i, value in enumerate(request.states):
            name = job_state_from_proto(value)
            if name is None:
                raise InvalidArgument(f"states[{i}]", f"{value} is not a job state", "omit it")
            states.append(name)
        if request.page.page_size > 1000:
            raise InvalidArgument(
                "page.page_size", f"{request.page.page_size} is above 1000", "ask for at most 1000"
            )
        try:
            if request.page.page_token:
                decode_page_token(request.page.page_token)
        except ValueError as exc:
            raise InvalidArgument(
                "page.page_token", str(exc), "pass a token a list returned"
            ) from None
        owner = "" if _sees_all(principal) else principal.subject
        filters = JobFilter(tuple(states), request.project_id, request.array_job_id, owner)
        jobs, token = await self._lead.store.list_jobs(
            filters, request.page.page_size, request.page.page_token
        )
        return scheduler_pb2.ListJobsResponse(
            jobs=[job_to_proto(job) for job in jobs],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        principal = current_principal()
        if not request.job_id:
            raise InvalidArgument("job_id", "is empty", "pass the id of the job to cancel")
        job = await self._lead.store.get_job(request.job_id)
        if job is None or not _may_see(principal, job):
            raise NotFound("job", request.job_id)
        if job.owner != principal.subject and not _sees_all(principal):
            raise PermissionDenied(f"job {job.job_id} belongs to {job.owner!r}")
        if job.terminal:
            return job_to_proto(job)
        leader = self._lead.require()
        reply: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        reason = request.reason or f"cancelled by {principal.subject}"
        cause = f"rpc:CancelJob:{request.request_id or request_id() or ''}"
        await leader.inbox.put(CancelRequested(job.job_id, reason, cause, reply))
        result = await asyncio.wait_for(reply, timeout=remaining_s(10.0))
        if result is None:
            refreshed = await self._lead.store.get_job(job.job_id)
            return job_to_proto(refreshed or job)
        return job_to_proto(result)

    async def WatchJobs(
        self, request: scheduler_pb2.WatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.Job]:
        principal = current_principal()
        leader = self._lead.require()
        watcher = leader.watchers.subscribe(request.job_id, request.project_id)
        try:
            if request.send_initial:
                for initial in await self._initial(request, principal):
                    yield job_to_proto(initial)
            while True:
                try:
                    change = await watcher.next(WATCH_POLL_S)
                except WatchOverflow as exc:
                    raise Unavailable(str(exc)) from None
                if change is None:
                    if not self._lead.leading:
                        raise Unavailable("the scheduler lost leadership; watch again")
                    continue
                if _may_see(principal, change):
                    yield job_to_proto(change)
        finally:
            leader.watchers.unsubscribe(watcher)

    async def _initial(
        self, request: scheduler_pb2.WatchJobsRequest, principal: Principal
    ) -> list[Job]:
        if request.job_id:
            job = await self._lead.store.get_job(request.job_id)
            if job is None or not _may_see(principal, job):
                raise NotFound("job", request.job_id)
            return [job]
        owner = "" if _sees_all(principal) else principal.subject
        filters = JobFilter(
            ("pending", "starting", "running", "stopping"), request.project_id, "", owner
        )
        jobs, _ = await self._lead.store.list_jobs(filters, 1000, "")
        return jobs

    async def GetQueueSummary(
        self, request: scheduler_pb2.GetQueueSummaryRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetQueueSummaryResponse:
        current_principal()
        by_state, by_reason = await self._lead.store.counts()
        response = scheduler_pb2.GetQueueSummaryResponse(
            jobs_by_state=by_state, pending_by_reason=by_reason
        )
        leader = self._lead.current
        if leader is not None:
            used, total = leader.usage_by_region()
            response.used_millis_by_region.update(used)
            response.total_millis_by_region.update(total)
        return response

    # Fleet.

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
        start = int(request.page.page_token or 0) if request.page.page_token.isdigit() else 0
        page = selected[start : start + size]
        token = str(start + size) if start + size < len(selected) else ""
        return scheduler_pb2.ListNodesResponse(
            nodes=[_node_to_proto(n) for n in page],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def GetNode(
        self, request: scheduler_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Node:
        current_principal()
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        node = self._lead.require().fleet.get(key)
        if node is None:
            raise NotFound("node", key)
        return _node_to_proto(node)

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
        key = f"{request.provider_id}.{request.region_id}.{request.node_id}"
        leader = self._lead.require()
        reply: asyncio.Future[NodeView | None] = asyncio.get_running_loop().create_future()
        reason = request.reason or ("undrained" if request.undrain else "drained by operator")
        await leader.inbox.put(DrainRequested(key, not request.undrain, reason, reply))
        node = await asyncio.wait_for(reply, timeout=remaining_s(10.0))
        if node is None:
            raise NotFound("node", key)
        await leader.nodes.set_draining(
            request.provider_id, request.region_id, request.node_id, not request.undrain, reason
        )
        return _node_to_proto(node)

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
                    peak_dense_tflops=common_pb2.Decimal(value=str(m.peak_tflops)),
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
        pledge, violations = pledge_from_proto(request.pledge)
        if violations:
            raise InvalidJobRequest(violations)
        leader = self._lead.require()
        cause = f"rpc:SetPledge:{request.request_id or request_id() or ''}"
        try:
            stored = await self._pledges.upsert(pledge, cause)
        except LookupError as exc:
            raise FailedPrecondition(str(exc), "pledge.recallable_count") from None
        if not stored:
            raise InvalidArgument(
                "pledge.pledge_id",
                f"{pledge.pledge_id!r} names a pledge of another provider, region or model",
                "leave pledge_id empty to create a pledge",
            )
        await leader.inbox.put(PledgeChanged(pledge))
        return pledge_to_proto(pledge)

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
        if not wanted.pledge_id:
            raise InvalidArgument("recall.pledge_id", "is empty", "name the pledge to recall from")
        if wanted.count <= 0:
            raise InvalidArgument("recall.count", "is 0", "recall at least one accelerator")
        if not wanted.HasField("effective_time"):
            raise InvalidArgument(
                "recall.effective_time", "is missing", "set when the capacity must be free"
            )
        effective = wanted.effective_time.ToNanoseconds() / 1e9
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

    async def RegisterProvider(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise _not_implemented("RegisterProvider")

    async def ListProviders(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise _not_implemented("ListProviders")


def _require_operator_of(provider: str) -> Principal:
    principal = require_roles(*OPERATORS)
    _check_operator(principal, provider)
    return principal


def _check_operator(principal: Principal, provider: str) -> None:
    if Role.PROVIDER_OPERATOR in principal.roles and principal.provider not in (None, provider):
        raise PermissionDenied(
            f"operator of provider {principal.provider!r} cannot act for provider {provider!r}"
        )


class _Unimplemented(CallerError):
    code = grpc.StatusCode.UNIMPLEMENTED


def _not_implemented(method: str) -> CallerError:
    # NOTE: the provider registry (display names, jurisdictions) is not stored yet; providers
    # and regions exist through their nodes' inventories and their pledges.
    return _Unimplemented(f"{method} is not implemented by this scheduler version yet")


def _submit_response(
    jobs: list[Job], array_id: str, array_size: int
) -> scheduler_pb2.SubmitJobResponse:
    if not array_id:
        return scheduler_pb2.SubmitJobResponse(job=job_to_proto(jobs[0]))
    parent = job_to_proto(replace(jobs[0], job_id=array_id, array_index=0))
    parent.spec.array_size = array_size
    parent.state_message = f"array of {len(jobs)} jobs"
    return scheduler_pb2.SubmitJobResponse(job=parent, array_job_ids=[job.job_id for job in jobs])


def _sees_all(principal: Principal) -> bool:
    return principal.has_any((Role.PROGRAM_OFFICE, Role.SERVICE))


def _may_see(principal: Principal, job: Job) -> bool:
    # NOTE: project membership is stored by the grant service and not checked here yet, so
    # a researcher can read only the jobs they submitted.
    return _sees_all(principal) or job.owner == principal.subject


def _node_state_name(value: int) -> str:
    name = scheduler_pb2.NodeState.Name(value).removeprefix("NODE_STATE_").lower()  # type: ignore[arg-type]
    if name not in NODE_STATUSES:
        raise InvalidArgument("state", f"{value} is not a node state", "omit it or pass one")
    return name


def _node_to_proto(node: NodeView) -> scheduler_pb2.Node:
    msg = scheduler_pb2.Node(
        node_id=node.node,
        provider_id=node.provider,
        region_id=node.region,
        state=scheduler_pb2.NodeState.Value(f"NODE_STATE_{node.status.upper()}"),  # type: ignore[arg-type]
        accelerators=[
            scheduler_pb2.Accelerator(
                accelerator_id=acc.accelerator_id,
                pci_bus_id=acc.pci_bus_id,
                model=acc.model,
                interconnect_domain=acc.interconnect_domain,
                health=scheduler_pb2.HEALTH_STATE_OK
                if acc.healthy
                else scheduler_pb2.HEALTH_STATE_FAILED,
            )
            for acc in node.accelerators
        ],
        software_stacks=node.software_stacks,
        state_cause=common_pb2.Cause(reason=node.status_reason),
    )
    if node.last_heartbeat:
        msg.last_heartbeat_time.FromNanoseconds(int(node.last_heartbeat * 1e9))
    return msg
