"""Read the final figures of a live run from the services and the agents' stats file."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc

from acsp.client import AsyncClient
from acsp.decimals import exact_sum, format_decimal
from acsp.demo.fleet import FleetPlan
from acsp.demo.live import BalanceSample, LiveRun
from acsp.demo.setup import AwardedGrant
from acsp.v1 import common_pb2, grant_pb2, metering_pb2, scheduler_pb2
from agents.process import STATS_FILE_NAME

logger = logging.getLogger(__name__)

JOB_STATE_NAMES = {
    value: name.removeprefix("JOB_STATE_").lower() for name, value in scheduler_pb2.JobState.items()
}
PENDING_REASON_NAMES = {
    value: name.removeprefix("PENDING_REASON_").lower()
    for name, value in scheduler_pb2.PendingReason.items()
}


def _decimal(message: common_pb2.Decimal) -> Decimal:
    return Decimal(message.value or "0")


def _amount(message: common_pb2.Decimal) -> str:
    """Write an exact amount for the report in plain notation, e.g. ``0.00000008`` for 8E-8."""
    return format_decimal(_decimal(message))


async def grant_balances(client: AsyncClient, grant_ids: Iterable[str]) -> dict[str, BalanceSample]:
    """Return the balance of each grant."""
    result = {}
    for grant_id in grant_ids:
        balance = await client.grants.GetBalance(
            grant_pb2.GetBalanceRequest(grant_id=grant_id), timeout=10
        )
        result[grant_id] = BalanceSample(
            _decimal(balance.available_pf_days),
            _decimal(balance.held_pf_days),
            _decimal(balance.charged_pf_days),
        )
    return result


def read_agent_stats(agents_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((agents_dir / STATS_FILE_NAME).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(slots=True)
class Settlement:
    """Whether every usage sample the agents made reached metering and was charged."""

    settled: bool
    agent_stats: dict[str, Any] | None
    ingest: dict[str, Any] = field(default_factory=dict)
    waited_s: float = 0.0


def _ingest_dict(status: metering_pb2.GetIngestStatusResponse) -> dict[str, Any]:
    return {
        "samples_ingested": status.samples_ingested,
        "duplicates_ignored": status.duplicates_ignored,
        "dead_lettered": status.dead_lettered,
        "pending_messages": status.pending_messages,
        "uncommitted_charges": status.uncommitted_charges,
        "accelerator_seconds": _amount(status.accelerator_seconds),
        "charged_pf_days": _amount(status.charged_pf_days),
        "priced_usage_pf_days": _amount(status.priced_usage_pf_days),
    }


async def wait_settled(
    client: AsyncClient, agents_dir: Path, grant_ids: Sequence[str], timeout_s: float
) -> Settlement:
    """Poll until metering ingested and charged every sample the agents made, or time out.

    Settled means: the agents' outbox is empty, the samples they made equal the samples
    metering stored, nothing waits in the consumer, every charge reached the ledger, and no
    budget is held any more because metering settled every ended attempt's hold. All of this
    must be true on two polls in a row, so that a last usage report cannot slip in between.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    matched_before = False
    stats: dict[str, Any] | None = None
    ingest: dict[str, Any] = {}
    while loop.time() - start < timeout_s:
        stats = read_agent_stats(agents_dir)
        try:
            status = await client.metering.GetIngestStatus(
                metering_pb2.GetIngestStatusRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            logger.info("ingest status call failed: %s", error.code().name)
            await asyncio.sleep(1.0)
            continue
        ingest = _ingest_dict(status)
        held = await _held_total(client, grant_ids)
        ingest["held_pf_days"] = format_decimal(held)
        matched = held == 0 and (
            stats is not None
            and stats["outbox_pending"] == 0
            and stats["usage_samples"] == status.samples_ingested
            and status.pending_messages == 0
            and status.uncommitted_charges == 0
        )
        if matched and matched_before:
            return Settlement(True, stats, ingest, loop.time() - start)
        matched_before = matched
        await asyncio.sleep(2.0)
    return Settlement(False, stats, ingest, loop.time() - start)


async def _held_total(client: AsyncClient, grant_ids: Sequence[str]) -> Decimal:
    total = Decimal(0)
    for grant_id in grant_ids:
        balance = await client.grants.GetBalance(
            grant_pb2.GetBalanceRequest(grant_id=grant_id), timeout=10
        )
        total = exact_sum((total, _decimal(balance.held_pf_days)))
    return total


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One submitted job as the scheduler reports it at the end."""

    name: str
    job_id: str
    state: str
    pending_reason: str
    state_message: str
    submit_time: float | None
    start_time: float | None
    end_time: float | None
    attempt: int
    placements: tuple[tuple[str, str, str, int], ...]
    """(provider, region, node, milli-shares) per accelerator share of the last attempt."""


def _seconds(message: Any, name: str) -> float | None:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return float(stamp.seconds + stamp.nanos / 1e9)


async def list_jobs(client: AsyncClient, run: LiveRun) -> list[JobRecord]:
    """Return every submitted job's final record (ListJobs pages, matched by job id)."""
    by_id = {job_id: name for name, job_id in run.job_ids.items()}
    records = []
    token = ""
    while True:
        response = await client.scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(
                page=common_pb2.PageRequest(page_size=1000, page_token=token)
            ),
            timeout=30,
        )
        for job in response.jobs:
            name = by_id.get(job.job_id)
            if name is None:
                continue
            placements = tuple(
                (p.provider_id, p.region_id, p.node_id, share.millis)
                for p in job.placements
                for share in p.accelerators
            )
            records.append(
                JobRecord(
                    name=name,
                    job_id=job.job_id,
                    state=JOB_STATE_NAMES.get(job.state, str(job.state)),
                    pending_reason=PENDING_REASON_NAMES.get(job.pending_reason, ""),
                    state_message=job.state_message,
                    submit_time=_seconds(job, "submit_time"),
                    start_time=_seconds(job, "start_time"),
                    end_time=_seconds(job, "end_time"),
                    attempt=job.attempt,
                    placements=placements,
                )
            )
        token = response.page.next_page_token
        if not token:
            return records


@dataclass(slots=True)
class LiveFigures:
    jobs: list[JobRecord]
    ledger: dict[str, Any]
    balances: dict[str, dict[str, str]]
    """Per grant id: credited, held, charged, refunded, available PF-days."""
    settlements: dict[str, dict[str, Any]]
    refunds: dict[str, Any]
    usage_by_region: dict[str, dict[str, str]]
    usage_by_model: dict[str, dict[str, str]]
    ingest: dict[str, Any]
    """Metering's ingest status, read after everything else."""
    agent_stats: dict[str, Any] | None
    """The agents' counters, read last."""


async def collect(
    client: AsyncClient,
    fleet: FleetPlan,
    grants: Sequence[AwardedGrant],
    run: LiveRun,
    agents_dir: Path,
) -> LiveFigures:
    """Read jobs, ledger, balances, settlements, refunds and usage once the run settled."""
    jobs = await list_jobs(client, run)
    summary = await client.grants.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest(), timeout=30)
    ledger = {
        "postings_sum_pf_days": _amount(summary.postings_sum_pf_days),
        "entry_count": summary.entry_count,
        "negative_grant_ids": list(summary.negative_grant_ids),
        "program_pool_pf_days": _amount(summary.program_pool_pf_days),
    }
    balances = {}
    for grant in grants:
        balance = await client.grants.GetBalance(
            grant_pb2.GetBalanceRequest(grant_id=grant.grant_id), timeout=10
        )
        balances[grant.grant_id] = {
            "credited": _amount(balance.credited_pf_days),
            "held": _amount(balance.held_pf_days),
            "charged": _amount(balance.charged_pf_days),
            "refunded": _amount(balance.refunded_pf_days),
            "available": _amount(balance.available_pf_days),
        }
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(int(run.started_at) - 600)
    window.end_time.FromSeconds(int(run.started_at + run.drained_by) + 3600)
    settlements = {}
    for provider in fleet.providers:
        settlements[provider] = await _settlement(client, provider, window)
    refunds = await _refunds(client)
    refunds["by_job"] = await refunds_by_job(client, [g.grant_id for g in grants])
    by_region = await _usage(client, metering_pb2.USAGE_GROUPING_REGION, window)
    by_model = await _usage(client, metering_pb2.USAGE_GROUPING_MODEL, window)
    status = await client.metering.GetIngestStatus(
        metering_pb2.GetIngestStatusRequest(), timeout=10
    )
    return LiveFigures(
        jobs,
        ledger,
        balances,
        settlements,
        refunds,
        by_region,
        by_model,
        _ingest_dict(status),
        read_agent_stats(agents_dir),
    )


async def _settlement(
    client: AsyncClient, provider: str, window: common_pb2.TimeWindow
) -> dict[str, Any]:
    try:
        settlement = await client.metering.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id=provider, period=window), timeout=30
        )
    except grpc.aio.AioRpcError as error:
        return {"error": f"{error.code().name}: {error.details()}"}
    return {
        "delivered_pf_days": _amount(settlement.delivered_pf_days),
        "refunded_pf_days": _amount(settlement.refunded_pf_days),
        "net_pf_days": _amount(settlement.net_pf_days),
        "pledge_kept": settlement.pledge_kept,
        "recall_count": settlement.recall_count,
        "lines": [
            {
                "region": line.region_id,
                "model": line.model,
                "accelerator_hours": _amount(line.accelerator_hours),
                "pf_days": _amount(line.pf_days),
            }
            for line in settlement.lines
        ],
    }


async def _refunds(client: AsyncClient) -> dict[str, Any]:
    total = Decimal(0)
    count = 0
    by_reason: dict[str, int] = {}
    token = ""
    while True:
        response = await client.metering.ListRefunds(
            metering_pb2.ListRefundsRequest(
                page=common_pb2.PageRequest(page_size=1000, page_token=token)
            ),
            timeout=30,
        )
        for refund in response.refunds:
            total = exact_sum((total, _decimal(refund.amount_pf_days)))
            count += 1
            by_reason[refund.reason] = by_reason.get(refund.reason, 0) + 1
        token = response.page.next_page_token
        if not token:
            return {"count": count, "pf_days": format_decimal(total), "by_reason": by_reason}


async def _ledger_entries(
    client: AsyncClient, grant_id: str, kind: int
) -> list[grant_pb2.LedgerEntry]:
    entries = []
    token = ""
    while True:
        response = await client.grants.ListLedgerEntries(
            grant_pb2.ListLedgerEntriesRequest(
                grant_id=grant_id,
                kind=kind,  # type: ignore[arg-type]
                page=common_pb2.PageRequest(page_size=1000, page_token=token),
            ),
            timeout=30,
        )
        entries.extend(response.entries)
        token = response.page.next_page_token
        if not token:
            return entries


async def refunds_by_job(client: AsyncClient, grant_ids: Sequence[str]) -> list[dict[str, str]]:
    """Return, for each refunded job, what the grant ledgers charged and refunded it.

    Charges and refunds name the hold of one attempt, and the hold names the job. So the sums
    are per job over all its attempts.
    """
    charged: dict[str, Decimal] = {}
    refunded: dict[str, Decimal] = {}
    for grant_id in grant_ids:
        refunds = await _ledger_entries(client, grant_id, common_pb2.LEDGER_ENTRY_KIND_REFUND)
        if not refunds:
            continue
        holds = await _ledger_entries(client, grant_id, common_pb2.LEDGER_ENTRY_KIND_HOLD)
        job_of_hold = {entry.hold_id: entry.job_id for entry in holds}
        charges = await _ledger_entries(client, grant_id, common_pb2.LEDGER_ENTRY_KIND_CHARGE)
        for entries, sums in ((charges, charged), (refunds, refunded)):
            for entry in entries:
                job = job_of_hold.get(entry.hold_id) or entry.job_id or f"hold {entry.hold_id}"
                value = _decimal(entry.amount_pf_days)
                sums[job] = exact_sum((sums.get(job, Decimal(0)), value))
    return [
        {
            "job_id": job,
            "charged_pf_days": format_decimal(charged.get(job, Decimal(0))),
            "refunded_pf_days": format_decimal(amount),
        }
        for job, amount in sorted(refunded.items())
    ]


async def _usage(
    client: AsyncClient, grouping: int, window: common_pb2.TimeWindow
) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    token = ""
    while True:
        response = await client.metering.QueryUsage(
            metering_pb2.QueryUsageRequest(
                grouping=grouping,  # type: ignore[arg-type]
                range=window,
                page=common_pb2.PageRequest(page_size=1000, page_token=token),
            ),
            timeout=30,
        )
        for row in response.rows:
            rows[row.key] = {
                "accelerator_hours": _amount(row.accelerator_hours),
                "charged_pf_days": _amount(row.charged_pf_days),
                "refunded_pf_days": _amount(row.refunded_pf_days),
                "mean_utilization": f"{row.mean_utilization:.4f}",
                "samples": str(row.sample_count),
            }
        token = response.page.next_page_token
        if not token:
            return rows
