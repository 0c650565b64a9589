"""The ``acsp.v1.SchedulerService`` servicer: protobuf at the edge, dataclasses inside.

Reads are served from PostgreSQL by every replica. Writes (submit, cancel, drain) and watches
need the shard's leader. A standby rejects them with UNAVAILABLE, so clients retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Final, cast

import grpc

from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.context import remaining_s, request_id
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    require_id,
)
from services.runtime.evolve import evolve

from .admission import RateCard
from .award_check import check_hold_fits, check_project_hold_fits
from .convert import job_state_from_proto, job_to_proto, spec_from_proto
from .dependency_check import check_wait_count, resolve_after_ids
from .errors import GrantConstraintViolations, InvalidFields
from .fleet_api import FleetRpcs
from .grant_limits import check_against_grant, narrow_to_grant
from .inputs import CancelRequested
from .job_access import JobAccess, ReadScope
from .leadership import Leadership
from .model import Job, JobFilter, JobSpec, JobState, new_job_id
from .providers import ProviderDirectory
from .request_ids import check_repeated_in_batch, check_reused_ids, request_key, stored_keys
from .store import decode_page_token, encode_page_token
from .task_output import TaskOutputReader, output_limit
from .validation import (
    MAX_REASON_LENGTH,
    MAX_REQUEST_ID_LENGTH,
    FieldViolation,
    check_length,
    validate_array_size,
    validate_batch_size,
    validate_models,
    validate_spec,
)
from .watch import WatchOverflow

logger = logging.getLogger(__name__)

WATCH_POLL_S: Final = 1.0
SUBMITTERS: Final = (Role.RESEARCHER, Role.PI, Role.SERVICE, Role.PROGRAM_OFFICE)
MAX_PAGE_BYTES: Final = 3 * 1024 * 1024
"""Encoded jobs of one ListJobs page, below the 4 MiB that gRPC clients receive by default."""
INITIAL_PAGE_SIZE: Final = 1000
"""Open jobs read per query while a watch sends its initial state."""
INITIAL_DRAIN_EVERY: Final = 100
"""Initial jobs sent between two moves of the watcher's queued changes aside."""


class SchedulerServicer(FleetRpcs, scheduler_pb2_grpc.SchedulerServiceServicer):
    """Job RPCs here, fleet and pledge RPCs in :class:`~.fleet_api.FleetRpcs`."""

    def __init__(self, leadership: Leadership, output_reply_timeout_s: float = 5.0) -> None:
        """``output_reply_timeout_s`` bounds ReadTaskOutput's wait for an agent, in seconds."""
        super().__init__(leadership)
        self._access = JobAccess(leadership.projects)
        self._output = TaskOutputReader(leadership.pool, leadership.nats, output_reply_timeout_s)

    # Jobs.

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobResponse:
        principal = require_roles(*SUBMITTERS)
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        jobs, request_ids, array_id = self._prepare(request, principal, "")
        key = request_key(principal.subject, request.request_id)
        jobs = await self._check_access(principal, jobs, "spec", key)
        jobs = await self._resolve_after(jobs, "spec.after_job_ids", key)
        check_wait_count([_waits(jobs)], "spec.after_job_ids")
        stored = await self._lead.require().batcher.submit(
            jobs, request_ids, [(jobs, key, "request_id")]
        )
        check_reused_ids(jobs, stored, "request_id")
        return _submit_response(stored, array_id, request.spec.array_size)

    async def SubmitJobs(
        self, request: scheduler_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitJobsResponse:
        principal = require_roles(*SUBMITTERS)
        too_many = validate_batch_size([item.spec.array_size for item in request.jobs])
        if too_many:
            raise InvalidFields(too_many)
        for i, item in enumerate(request.jobs):
            check_length(f"jobs[{i}].request_id", item.request_id, MAX_REQUEST_ID_LENGTH)
        check_repeated_in_batch(request.jobs)
        prepared = [
            self._prepare(item, principal, f"jobs[{i}].") for i, item in enumerate(request.jobs)
        ]
        # Every item is checked before any is stored, so a rejected item writes nothing.
        checked = []
        for i, ((batch, _, _), item) in enumerate(zip(prepared, request.jobs, strict=True)):
            key = request_key(principal.subject, item.request_id)
            allowed = await self._check_access(principal, batch, f"jobs[{i}].spec", key)
            checked.append(await self._resolve_after(allowed, f"jobs[{i}].spec.after_job_ids", key))
        check_wait_count([_waits(batch) for batch in checked], "jobs")
        submissions = [
            (batch, request_key(principal.subject, item.request_id), f"jobs[{i}].request_id")
            for i, (batch, item) in enumerate(zip(checked, request.jobs, strict=True))
        ]
        jobs = [job for batch in checked for job in batch]
        request_ids = [rid for p in prepared for rid in p[1]]
        stored = await self._lead.require().batcher.submit(jobs, request_ids, submissions)
        results = []
        offset = 0
        for i, (batch, (_, _, array_id), item) in enumerate(
            zip(checked, prepared, request.jobs, strict=True)
        ):
            part = stored[offset : offset + len(batch)]
            offset += len(batch)
            check_reused_ids(batch, part, f"jobs[{i}].request_id")
            results.append(_submit_response(part, array_id, item.spec.array_size))
        return scheduler_pb2.SubmitJobsResponse(results=results)

    async def _check_access(
        self, principal: Principal, jobs: list[Job], prefix: str, key: str | None = None
    ) -> list[Job]:
        """Check the submitter, grant and sub-allocation of ``jobs`` (one spec) with the grant
        service, and narrow their placement to the grant's constraints.

        Raises FAILED_PRECONDITION naming the field and the allowed values when the spec
        cannot run within the constraints, and naming ``wall_time_seconds`` when its hold
        exceeds all the grant or sub-allocation can ever be credited. A spec that names no
        grant draws on the one sub-allocation its project holds when the project has no grant
        of its own (see :meth:`ProjectDirectory.pick_sub_allocation`). Otherwise it is
        rejected only when no grant of its project could ever pay its hold. ``key`` is the
        submission's request id key, whose stored jobs a retry gets back.
        """
        spec = jobs[0].spec
        projects = self._lead.projects
        limits = await projects.check_submitter(principal, spec, prefix)
        if limits is None:
            picked = await self._pick_sub_allocation(jobs, prefix, key)
            if picked is not spec:
                # Checked again as if the caller had named the sub-allocation: from the cache.
                spec = picked
                jobs = [evolve(job, spec=_picked(job.spec, spec)) for job in jobs]
                limits = await projects.check_submitter(principal, spec, prefix)
        # Usage and fair share count against the project's institution, whoever submits.
        # check_submitter has just cached the project, so this reads no more than the cache.
        project = await projects.project(spec.project_id)
        if project is not None and project.institution_id:
            jobs = [evolve(job, institution=project.institution_id) for job in jobs]
        catalog = self._lead.catalog
        term = self._lead.current
        if limits is None:
            if term is not None and term.rates is not None:
                await self._check_project_hold(jobs[0], term.rates, prefix)
            return jobs
        providers = term.book.engine.providers if term is not None else ProviderDirectory()
        violations = check_against_grant(spec, limits, providers, catalog, prefix)
        if violations:
            raise GrantConstraintViolations(violations)
        narrowed = [evolve(job, spec=narrow_to_grant(job.spec, limits, catalog)) for job in jobs]
        # The elements of an array share one spec, so one check covers them, and it reads
        # only what check_submitter cached: no call to the grant service of its own.
        ceiling = await projects.award_ceiling(spec)
        if ceiling is not None and term is not None and term.rates is not None:
            check_hold_fits(narrowed[0], ceiling, term.rates, catalog, prefix)
        return narrowed

    async def _pick_sub_allocation(self, jobs: list[Job], prefix: str, key: str | None) -> JobSpec:
        """Return the spec of ``jobs`` set to draw on its project's one sub-allocation, if any.

        A retry of a call that stored its jobs gets them back, although the project may have
        come to hold several sub-allocations since, so the spec then stays unchanged. The
        store is read only when the pick fails, off the common path.
        """
        spec = jobs[0].spec
        try:
            return await self._lead.projects.pick_sub_allocation(spec, prefix)
        except InvalidArgument:
            if key is None:
                raise
            if not await self._lead.store.jobs_by_request_ids(stored_keys([(jobs, key, "")])):
                raise
            return spec

    async def _check_project_hold(self, job: Job, rates: RateCard, prefix: str) -> None:
        """Reject ``job``, which names no grant, when no grant of its project could pay it.

        The grant service picks the grant that pays when it places the hold, so the job is
        checked against every grant of the project, from a list cached per project. A grant
        awarded after the list was cached may pay the job, so a list older than a few seconds
        is read again before the job is rejected.
        """
        projects = self._lead.projects
        project_id = job.spec.project_id
        catalog = self._lead.catalog
        ceilings = await projects.project_ceilings(project_id)
        if not ceilings:
            return
        try:
            check_project_hold_fits(job, project_id, ceilings, rates, catalog, prefix)
        except FailedPrecondition:
            ceilings = await projects.project_ceilings(project_id, recent=True)
            if ceilings:
                check_project_hold_fits(job, project_id, ceilings, rates, catalog, prefix)

    async def _resolve_after(self, jobs: list[Job], field: str, key: str | None) -> list[Job]:
        """Check the jobs that ``jobs`` (one spec) wait for, and set the awaited jobs with each
        array replaced by its elements.

        Raises INVALID_ARGUMENT for an id of no job of the project, and FAILED_PRECONDITION
        for a job that ended without completing, unless ``key`` (the submission's request id
        key) already stored jobs.
        """
        spec = jobs[0].spec
        if not spec.after_job_ids:
            return jobs
        store = self._lead.store
        args = (spec.after_job_ids, spec.project_id, field, store.awaited_jobs)
        try:
            awaited = await resolve_after_ids(*args)
        except FailedPrecondition:
            # A retry of a call that stored its jobs gets them back, although a job that they
            # wait for ended since. The store is read only here, off the common path.
            if key is None or not await store.jobs_by_request_ids(stored_keys([(jobs, key, "")])):
                raise
            awaited = await resolve_after_ids(*args, reject_ended=False)
        return [evolve(job, spec=evolve(job.spec, awaited_job_ids=awaited)) for job in jobs]

    def _prepare(
        self, request: scheduler_pb2.SubmitJobRequest, principal: Principal, prefix: str
    ) -> tuple[list[Job], list[str | None], str]:
        spec, violations = spec_from_proto(request.spec)
        violations += validate_spec(
            spec,
            f"{prefix}spec",
            self.known_jurisdictions(),
            self._lead.max_payload,
            regions=self.known_regions(),
        )
        violations += validate_models(spec, self._lead.catalog, f"{prefix}spec")
        violations += validate_array_size(request.spec.array_size, f"{prefix}spec.array_size")
        if violations:
            raise InvalidFields(
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
        rid = request_key(owner, request.request_id)
        # The submission is each job's first change, and the store records it as such.
        now = time.time()
        if size == 0:
            job = Job(
                job_id=new_job_id(),
                spec=spec,
                owner=owner,
                institution=institution,
                submitted_at=now,
                updated_at=now,
            )
            return [job], [rid], ""
        array_id = new_job_id()
        jobs = [
            Job(
                job_id=f"{array_id}-{index}",
                spec=evolve(spec, env=(*spec.env, ("ACSP_ARRAY_INDEX", str(index)))),
                owner=owner,
                institution=institution,
                array_id=array_id,
                array_index=index,
                submitted_at=now,
                updated_at=now,
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
        try:
            return job_to_proto(await self._visible_job(principal, request.job_id))
        except NotFound:
            elements = await self._visible_array(principal, request.job_id)
            if not elements:
                raise
            return _array_parent(elements)

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
        scope = await self._access.read_scope(principal, request.project_id)
        filters = JobFilter(tuple(states), scope.project_id, request.array_job_id, scope.owner)
        jobs, token = await self._lead.store.list_jobs(
            filters, request.page.page_size, request.page.page_token
        )
        if request.array_job_id and not jobs and not request.page.page_token:
            # An empty first page is checked, so that a mistyped array id is reported
            # rather than listed as an array with no jobs.
            if not await self._visible_array(principal, request.array_job_id):
                raise NotFound(
                    "job array",
                    request.array_job_id,
                    "pass the id that SubmitJob returned for the array",
                )
        return _jobs_page(jobs, token)

    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        principal = current_principal()
        if not request.job_id:
            raise InvalidArgument("job_id", "is empty", "pass the id of the job to cancel")
        check_length("request_id", request.request_id, MAX_REQUEST_ID_LENGTH)
        check_length("reason", request.reason, MAX_REASON_LENGTH)
        try:
            job = await self._visible_job(principal, request.job_id)
        except NotFound:
            elements = await self._visible_array(principal, request.job_id)
            if not elements:
                raise
            return await self._cancel_array(principal, request, elements)
        await self._access.check_cancel(principal, job)
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
        # Access is checked before the first change is sent, so a watch of something the
        # caller may not read fails at once instead of staying silent.
        scope = await self._access.read_scope(principal, request.project_id)
        if request.job_id:
            try:
                await self._visible_job(principal, request.job_id)
            except NotFound:
                # A job array's parent id, as GetJob and CancelJob take it, watches its elements.
                if not await self._visible_array(principal, request.job_id):
                    raise
            # A job the caller may read is watched even when another member submitted it.
            scope = ReadScope(scope.project_id)
        watcher = leader.watchers.subscribe(request.job_id, request.project_id, principal.subject)
        try:
            if request.send_initial:
                # Changes that arrive meanwhile wait here, the latest per job, so that a long
                # initial state cannot overflow the watcher's queue. They follow it, except
                # those no newer than the state a page sent.
                latest_changes: dict[str, Job] = {}
                sent_at: dict[str, float | None] = {}
                try:
                    async for page in self._initial(request, scope):
                        for index, initial in enumerate(page):
                            sent_at[initial.job_id] = initial.updated_at
                            yield job_to_proto(initial)
                            if index % INITIAL_DRAIN_EVERY == 0:
                                _hold_latest(latest_changes, watcher.take_queued(), watcher.limit)
                        _hold_latest(latest_changes, watcher.take_queued(), watcher.limit)
                except WatchOverflow as exc:
                    raise Unavailable(str(exc)) from None
                for latest in latest_changes.values():
                    if _sent_already(latest, sent_at):
                        continue
                    if scope.matches(latest) and await self._access.may_see(principal, latest):
                        yield job_to_proto(latest)
            while True:
                try:
                    change = await watcher.next(WATCH_POLL_S)
                except WatchOverflow as exc:
                    raise Unavailable(str(exc)) from None
                if change is None:
                    if not self._lead.leading:
                        raise Unavailable("the scheduler lost leadership; watch again")
                    continue
                # Membership is checked again for every change, so a member removed from the
                # project stops seeing its jobs once the cached membership expires.
                if scope.matches(change) and await self._access.may_see(principal, change):
                    yield job_to_proto(change)
        finally:
            leader.watchers.unsubscribe(watcher)

    async def ReadTaskOutput(
        self, request: scheduler_pb2.ReadTaskOutputRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReadTaskOutputResponse:
        principal = current_principal()
        max_bytes = output_limit(request.max_bytes)
        try:
            job = await self._visible_job(principal, request.job_id)
        except NotFound:
            if await self._visible_array(principal, request.job_id):
                raise InvalidArgument(
                    "job_id",
                    f"{request.job_id} is a job array, whose tasks belong to its elements",
                    "pass the id of one element (array_job_ids of SubmitJob)",
                ) from None
            raise
        return await self._output.read(job, request.task_index, max_bytes)

    async def _visible_job(self, principal: Principal, job_id: str) -> Job:
        """Return job ``job_id`` if ``principal`` may read it.

        Raises NotFound both for a missing job and for one the caller may not read, so that a
        caller cannot probe for the job ids of other projects. Raises InvalidArgument for an
        empty id or one longer than any job id.
        """
        require_id("job_id", job_id, "pass the job id that SubmitJob returned")
        job = await self._lead.store.get_job(job_id)
        if job is None or not await self._access.may_see(principal, job):
            raise NotFound("job", job_id)
        return job

    async def _visible_array(self, principal: Principal, array_id: str) -> list[Job]:
        """Return the elements of job array ``array_id`` if ``principal`` may read them.

        Returns an empty list both for a missing array and for one the caller may not read.
        """
        elements = await self._lead.store.array_jobs(array_id)
        if not elements or not await self._access.may_see(principal, elements[0]):
            return []
        return elements

    async def _cancel_array(
        self, principal: Principal, request: scheduler_pb2.CancelJobRequest, elements: list[Job]
    ) -> scheduler_pb2.Job:
        """Cancel every open element of a job array; return the array's parent job."""
        # Every element has the same owner and project, so one check covers them all.
        await self._access.check_cancel(principal, elements[0])
        open_ids = [job.job_id for job in elements if not job.terminal]
        if open_ids:
            leader = self._lead.require()
            reason = request.reason or f"cancelled by {principal.subject}"
            cause = f"rpc:CancelJob:{request.request_id or request_id() or ''}"
            loop = asyncio.get_running_loop()
            replies: list[asyncio.Future[Job | None]] = []
            for job_id in open_ids:
                reply: asyncio.Future[Job | None] = loop.create_future()
                await leader.inbox.put(CancelRequested(job_id, reason, cause, reply))
                replies.append(reply)
            await asyncio.wait_for(asyncio.gather(*replies), timeout=remaining_s(10.0))
        return _array_parent(await self._lead.store.array_jobs(elements[0].array_id))

    async def _initial(
        self, request: scheduler_pb2.WatchJobsRequest, scope: ReadScope
    ) -> AsyncIterator[list[Job]]:
        """Yield the watched open jobs in pages, newest first."""
        if request.job_id:
            job = await self._lead.store.get_job(request.job_id)
            found = [job] if job is not None else await self._lead.store.array_jobs(request.job_id)
            yield [job for job in found if scope.matches(job)]
            return
        filters = JobFilter(
            ("pending", "starting", "running", "stopping"), scope.project_id, "", scope.owner
        )
        token = ""
        while True:
            jobs, token = await self._lead.store.list_jobs(filters, INITIAL_PAGE_SIZE, token)
            yield jobs
            if not token:
                return

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
            capacity = leader.capacity_by_region(time.time())
            response.used_millis_by_region.update(capacity.used)
            response.total_millis_by_region.update(capacity.total)
            response.usable_millis_by_region.update(capacity.usable)
            response.recalled_millis_by_region.update(capacity.recalled)
            response.above_cap_millis_by_region.update(capacity.above_cap)
            response.unknown_millis_by_region.update(capacity.unknown)
            response.out_of_service_millis_by_region.update(capacity.out_of_service)
        return response


def _sent_already(change: Job, sent_at: dict[str, float | None]) -> bool:
    """Return True if the initial state sent ``change``'s job as recorded then or later."""
    sent = sent_at.get(change.job_id)
    return sent is not None and change.updated_at is not None and change.updated_at <= sent


def _hold_latest(latest_changes: dict[str, Job], changes: list[Job], limit: int) -> None:
    """Keep the latest of ``changes`` per job, the job last changed last.

    Raises :class:`WatchOverflow` once more than ``limit`` jobs wait, the limit of the
    watcher's own queue.
    """
    for change in changes:
        latest_changes.pop(change.job_id, None)
        latest_changes[change.job_id] = change
    if len(latest_changes) > limit:
        raise WatchOverflow("the watch fell behind; watch again with send_initial")


def _jobs_page(jobs: list[Job], token: str) -> scheduler_pb2.ListJobsResponse:
    """Return a ListJobs page of ``jobs`` that stays within :data:`MAX_PAGE_BYTES`.

    A job may encode to a few hundred kilobytes, so a full page of large jobs is cut short
    and its token continues after the last job it contains.
    """
    page = scheduler_pb2.ListJobsResponse()
    size = 0
    for job in jobs:
        message = job_to_proto(job)
        # Each job also takes a field tag and a length prefix of at most 6 bytes in the page.
        size += message.ByteSize() + 6
        if page.jobs and size > MAX_PAGE_BYTES:
            token = encode_page_token(page.jobs[-1].job_id)
            break
        page.jobs.append(message)
    page.page.next_page_token = token
    return page


def _picked(spec: JobSpec, picked: JobSpec) -> JobSpec:
    """Return ``spec`` drawing on what :meth:`ProjectDirectory.pick_sub_allocation` picked.

    The elements of an array differ in their environment, so each keeps its own spec.
    """
    return evolve(
        spec,
        grant_id=picked.grant_id,
        sub_allocation_id=picked.sub_allocation_id,
        sub_allocation_picked=picked.sub_allocation_picked,
    )


def _waits(jobs: list[Job]) -> tuple[int, int]:
    """Return the jobs of one submission and the jobs each of them waits for."""
    return len(jobs), len(jobs[0].spec.awaited_job_ids)


def _submit_response(
    jobs: list[Job], array_id: str, array_size: int
) -> scheduler_pb2.SubmitJobResponse:
    if not array_id:
        return scheduler_pb2.SubmitJobResponse(job=job_to_proto(jobs[0]))
    # A retried array gets the elements its first call stored, and their array id, instead of
    # the id this call drew.
    parent = job_to_proto(evolve(jobs[0], job_id=jobs[0].array_id or array_id, array_index=0))
    parent.spec.array_size = array_size
    parent.state_message = f"array of {_count_jobs(len(jobs))}"
    return scheduler_pb2.SubmitJobResponse(job=parent, array_job_ids=[job.job_id for job in jobs])


_OPEN_ORDER: Final = ("running", "starting", "stopping", "pending")
"""Open states in the order that decides an array's state: the first that an element has."""
_ENDED_ORDER: Final = ("failed", "timed_out", "cancelled", "completed")
"""Terminal states in the order that decides the state of an array whose elements all ended."""


def _array_parent(elements: list[Job]) -> scheduler_pb2.Job:
    """Return the parent job of a job array, summing up its ``elements``.

    The parent is running while any element runs and ends once every element has ended, as
    failed if any failed. Its state message counts the elements in each state.
    """
    counts: dict[str, int] = {}
    for job in elements:
        counts[job.state] = counts.get(job.state, 0) + 1
    state = next((s for s in _OPEN_ORDER + _ENDED_ORDER if counts.get(s)), "pending")
    first = elements[0]
    ended = [job.ended_at for job in elements if job.ended_at is not None]
    started = [job.started_at for job in elements if job.started_at is not None]
    updated = [job.updated_at for job in elements if job.updated_at is not None]
    parent = evolve(
        first,
        job_id=first.array_id,
        array_index=0,
        state=cast(JobState, state),
        pending_reason=first.pending_reason if state == "pending" else "",
        reason="",
        attempt=1,
        placement=(),
        hold_id="",
        hold_amount=None,
        checkpoint_ref="",
        checkpoint_at=None,
        exit_code=None,
        started_at=min(started) if started else None,
        ended_at=max(ended) if state in _ENDED_ORDER and ended else None,
        updated_at=max(updated) if updated else None,
    )
    proto = job_to_proto(parent)
    proto.spec.array_size = len(elements)
    summary = ", ".join(f"{counts[s]} {s}" for s in _OPEN_ORDER + _ENDED_ORDER if counts.get(s))
    proto.state_message = f"array of {_count_jobs(len(elements))}: {summary}"
    return proto


def _count_jobs(count: int) -> str:
    """Return ``1 job`` or ``N jobs``."""
    return f"{count} job" if count == 1 else f"{count} jobs"
