"""Set up the demo through the services' own RPCs: providers, pledges, grants.

Every call carries an idempotency key derived from the seed, so a retried step changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc

from acsp import decimals
from acsp.client import AsyncClient
from acsp.demo.fleet import FleetPlan
from acsp.demo.workload import ProjectPlan
from acsp.v1 import common_pb2, grant_pb2, scheduler_pb2

logger = logging.getLogger(__name__)

TokenFactory = Callable[..., str]
"""``token(role, subject, institution=None, provider=None)``, as :meth:`LocalMesh.token`."""

_TIERS = {
    "exploratory": grant_pb2.GRANT_TIER_EXPLORATORY,
    "standard": grant_pb2.GRANT_TIER_STANDARD,
    "flagship": grant_pb2.GRANT_TIER_FLAGSHIP,
}
RECALLABLE_SHARE = Decimal("0.25")
"""Share of each pledge that its provider may recall, except for spot capacity."""
SPOT_PROVIDER = "spot"
"""The provider of spot capacity, which pledges all of it as recallable."""


@dataclass(slots=True)
class FleetSetup:
    """Outcome of the provider, pledge and recall calls, by call."""

    calls: list[dict[str, str]] = field(default_factory=list)
    """One entry per call: ``rpc``, ``target``, ``status`` (OK or the gRPC code) and detail."""
    pledge_ids: dict[str, str] = field(default_factory=dict)
    """Server-assigned pledge id per ``provider/region/model``."""
    pledged: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Protected and recallable accelerators per ``provider/region/model``."""

    def record(self, rpc: str, target: str, error: grpc.aio.AioRpcError | None) -> None:
        if error is None:
            self.calls.append({"rpc": rpc, "target": target, "status": "OK", "detail": ""})
            return
        self.calls.append(
            {
                "rpc": rpc,
                "target": target,
                "status": error.code().name,
                "detail": error.details() or "",
            }
        )

    @property
    def unimplemented(self) -> list[str]:
        return sorted({c["rpc"] for c in self.calls if c["status"] == "UNIMPLEMENTED"})

    @property
    def failed(self) -> list[dict[str, str]]:
        return [c for c in self.calls if c["status"] not in ("OK", "UNIMPLEMENTED")]


def _window(start: datetime, duration: timedelta) -> common_pb2.TimeWindow:
    window = common_pb2.TimeWindow()
    window.start_time.FromDatetime(start)
    window.end_time.FromDatetime(start + duration)
    return window


async def register_fleet(
    client: AsyncClient, fleet: FleetPlan, seed: int, token: TokenFactory
) -> FleetSetup:
    """Register each provider with its regions and pledge every model of each region."""
    outcome = FleetSetup()
    now = datetime.now(UTC)
    for provider in fleet.providers:
        regions = [r for r in fleet.regions if r.provider == provider]
        metadata = _metadata(token("provider_operator", f"operator@{provider}", provider=provider))
        message = scheduler_pb2.Provider(
            provider_id=provider,
            display_name=provider,
            regions=[
                scheduler_pb2.Region(
                    region_id=r.region, display_name=r.display_name, jurisdiction=r.jurisdiction
                )
                for r in regions
            ],
        )
        error = await _call(
            client.scheduler.RegisterProvider(
                scheduler_pb2.RegisterProviderRequest(
                    request_id=f"demo-{seed}-provider-{provider}", provider=message
                ),
                metadata=metadata,
            )
        )
        outcome.record("RegisterProvider", provider, error)
        for region in regions:
            for model, count in sorted(region.accelerators_by_model().items()):
                recallable = recallable_count(provider, count)
                pledge = scheduler_pb2.Pledge(
                    provider_id=provider,
                    region_id=region.region,
                    model=model,
                    window=_window(now - timedelta(minutes=5), timedelta(days=30)),
                    protected_count=count - recallable,
                    recallable_count=recallable,
                )
                stored, error = await _call_for(
                    client.scheduler.SetPledge(
                        scheduler_pb2.SetPledgeRequest(
                            request_id=f"demo-{seed}-pledge-{region.key}/{model}", pledge=pledge
                        ),
                        metadata=metadata,
                    )
                )
                outcome.record("SetPledge", f"{region.key}/{model}", error)
                outcome.pledged[f"{region.key}/{model}"] = (count - recallable, recallable)
                if stored is not None:
                    outcome.pledge_ids[f"{region.key}/{model}"] = stored.pledge_id
    return outcome


def recallable_count(provider: str, count: int) -> int:
    """Return how many of ``count`` accelerators ``provider`` pledges as recallable."""
    if provider == SPOT_PROVIDER:
        return count
    return int(count * RECALLABLE_SHARE)


def pick_recall_pool(
    used_millis: Mapping[str, int], pledged: Mapping[str, tuple[int, int]]
) -> tuple[str, int] | None:
    """Return the busiest pool (``provider/region/model``) that a recall can preempt in.

    ``pledged`` maps each pool to its protected and recallable accelerators. A recall lowers
    the pool's cap, but never below the protected part, so running jobs are preempted only
    where more than the protected part is in use. The count returned recalls every
    accelerator that no job uses plus one, so the recall preempts about one accelerator's
    worth of jobs and the live run stays comparable with the simulated one.
    """
    best: tuple[str, int, int] | None = None
    for key, (protected, recallable) in sorted(pledged.items()):
        used = used_millis.get(key, 0)
        over = used - protected * 1000
        if recallable == 0 or over <= 0 or (best is not None and over <= best[2]):
            continue
        unused = protected + recallable - math.ceil(used / 1000)
        best = (key, min(recallable, unused + 1), over)
    return None if best is None else (best[0], best[1])


async def used_millis_by_pool(
    client: AsyncClient, fleet: FleetPlan, metadata: tuple[tuple[str, str], ...]
) -> dict[str, int]:
    """Return the milli-accelerators running jobs use per ``provider/region/model``."""
    nodes = fleet.node_index()
    used: dict[str, int] = {}
    token = ""
    while True:
        response = await client.scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(
                states=[scheduler_pb2.JOB_STATE_RUNNING],
                page=common_pb2.PageRequest(page_size=1000, page_token=token),
            ),
            metadata=metadata,
            timeout=30,
        )
        for job in response.jobs:
            for placement in job.placements:
                node = nodes.get((placement.provider_id, placement.region_id, placement.node_id))
                if node is None:
                    continue
                key = f"{node.provider}/{node.region}/{node.model}"
                used[key] = used.get(key, 0) + sum(a.millis for a in placement.accelerators)
        token = response.page.next_page_token
        if not token:
            return used


async def recall_capacity(
    client: AsyncClient,
    outcome: FleetSetup,
    fleet: FleetPlan,
    seed: int,
    token: TokenFactory,
    duration_s: float,
    search_s: float,
) -> None:
    """Recall capacity of one pledge for a window of ``duration_s``.

    For up to ``search_s`` seconds the demo looks every second for a pool busy enough that the
    recall preempts running jobs. Without one, it recalls the largest pledge of the spot
    provider, which then preempts no job.
    """
    office = _metadata(token("program_office", "office@program"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + search_s
    chosen = None
    while chosen is None:
        used = await used_millis_by_pool(client, fleet, office)
        chosen = pick_recall_pool(used, outcome.pledged)
        if chosen is not None or loop.time() >= deadline:
            break
        await asyncio.sleep(1.0)
    if chosen is None:
        spot = [r for r in fleet.regions if r.provider == SPOT_PROVIDER]
        if not spot:
            return
        model, count = max(spot[0].accelerators_by_model().items(), key=lambda item: item[1])
        chosen = (f"{spot[0].key}/{model}", recallable_count(SPOT_PROVIDER, count))
    key, count = chosen
    pledge_id = outcome.pledge_ids.get(key)
    if pledge_id is None:
        logger.warning("no pledge of %s to recall from", key)
        return
    provider = key.split("/", 1)[0]
    recall = scheduler_pb2.Recall(count=count, reason="commercial peak (demo recall window)")
    now = datetime.now(UTC)
    recall.effective_time.FromDatetime(now + timedelta(seconds=2))
    recall.end_time.FromDatetime(now + timedelta(seconds=2 + duration_s))
    recall.pledge_id = pledge_id
    metadata = _metadata(token("provider_operator", f"operator@{provider}", provider=provider))
    error = await _call(
        client.scheduler.RecallCapacity(
            scheduler_pb2.RecallCapacityRequest(request_id=f"demo-{seed}-recall", recall=recall),
            metadata=metadata,
        )
    )
    outcome.record("RecallCapacity", key, error)


async def _call(call: object) -> grpc.aio.AioRpcError | None:
    _, error = await _call_for(call)
    return error


async def _call_for(call: object) -> tuple[Any, grpc.aio.AioRpcError | None]:
    """Await an RPC; return its response, or None and the error (UNIMPLEMENTED included)."""
    try:
        return await call, None  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            logger.warning("%s: %s", error.code().name, error.details())
        return None, error


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True, slots=True)
class AwardedGrant:
    project_id: str
    institution_id: str
    tier: str
    grant_id: str
    awarded_pf_days: Decimal
    reviewed: bool


async def award_grants(
    client: AsyncClient, projects: Sequence[ProjectPlan], seed: int, token: TokenFactory
) -> list[AwardedGrant]:
    """Create institutions and projects, apply for one grant each, review and decide.

    Exploratory applications are awarded on submission; standard and flagship ones get a
    reviewer from another institution, a review and an award by the program office.
    """
    office = _metadata(token("program_office", "office@program"))
    institutions = sorted({p.institution_id for p in projects})
    for institution in institutions:
        await _create_once(
            client.grants.CreateInstitution(
                grant_pb2.CreateInstitutionRequest(
                    request_id=f"demo-{seed}-{institution}",
                    institution=grant_pb2.Institution(
                        institution_id=institution,
                        display_name=f"University {institution[-2:]}",
                        country_code="NO",
                    ),
                ),
                metadata=office,
            )
        )
    validity = _window(datetime.now(UTC) - timedelta(hours=1), timedelta(days=90))
    awarded = []
    for plan in projects:
        await _create_once(
            client.grants.CreateProject(
                grant_pb2.CreateProjectRequest(
                    request_id=f"demo-{seed}-{plan.project_id}",
                    project=grant_pb2.Project(
                        project_id=plan.project_id,
                        institution_id=plan.institution_id,
                        display_name=f"Trace project {plan.project_id}",
                        pi_subject=plan.pi_subject,
                    ),
                ),
                metadata=office,
            )
        )
        pi = _metadata(token("pi", plan.pi_subject, institution=plan.institution_id))
        application = await client.grants.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=f"demo-{seed}-application-{plan.project_id}",
                application=grant_pb2.Application(
                    project_id=plan.project_id,
                    tier=_TIERS[plan.tier],
                    requested_pf_days=decimals.to_proto(plan.requested_pf_days),
                    validity=validity,
                    justification="replay of the Alibaba openb trace",
                ),
            ),
            metadata=pi,
        )
        grant_id = application.grant_id
        reviewed = not grant_id
        if reviewed:
            grant_id = await _review_and_award(client, plan, application, seed, token, office)
        awarded.append(
            AwardedGrant(
                plan.project_id,
                plan.institution_id,
                plan.tier,
                grant_id,
                plan.requested_pf_days,
                reviewed,
            )
        )
    return awarded


async def _review_and_award(
    client: AsyncClient,
    plan: ProjectPlan,
    application: grant_pb2.Application,
    seed: int,
    token: TokenFactory,
    office: tuple[tuple[str, str], ...],
) -> str:
    application_id = application.application_id
    await client.grants.AssignReviewer(
        grant_pb2.AssignReviewerRequest(
            request_id=f"demo-{seed}-assign-{plan.project_id}",
            application_id=application_id,
            reviewer_subject=plan.reviewer_subject,
            reviewer_institution_id=plan.reviewer_institution_id,
        ),
        metadata=office,
    )
    reviewer = _metadata(
        token("reviewer", plan.reviewer_subject, institution=plan.reviewer_institution_id)
    )
    await client.grants.SubmitReview(
        grant_pb2.SubmitReviewRequest(
            request_id=f"demo-{seed}-review-{plan.project_id}",
            application_id=application_id,
            score=4,
            comments="sound plan for the trace replay",
        ),
        metadata=reviewer,
    )
    decided = await client.grants.DecideApplication(
        grant_pb2.DecideApplicationRequest(
            request_id=f"demo-{seed}-decide-{plan.project_id}",
            application_id=application_id,
            decision=grant_pb2.Decision(
                outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="reviewed and within the tier"
            ),
        ),
        metadata=office,
    )
    return decided.grant_id


async def _create_once(call: object) -> None:
    """Await a create call; ALREADY_EXISTS counts as done (a rerun on the same database)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
