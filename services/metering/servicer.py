"""The MeteringService gRPC handlers: protobuf in, metering's values inside, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

import grpc
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as JetStreamNotFound

from acsp.subjects import RATE_CARD_BUCKET
from acsp.v1 import common_pb2, metering_pb2, metering_pb2_grpc
from services.metering import convert
from services.metering.access import check_provider_access, usage_project
from services.metering.efficiency import job_efficiency, model_report
from services.metering.ingest import UsageIngest
from services.metering.pledges import PledgeSync
from services.metering.priced_usage import priced_usage
from services.metering.queries import Grouping, UsageFilter, query_usage
from services.metering.ratecard_store import RateCardCache, publish_version, put_in_bucket
from services.metering.samples import micros_to_seconds
from services.metering.settings import MeteringSettings
from services.metering.settlement import (
    PledgeCopySource,
    Settlement,
    build_settlement,
    has_provider_records,
    settlement_csv,
)
from services.metering.settlement_copy import copy_for_settlement
from services.runtime.auth import Principal, Role, current_principal, require_roles
from services.runtime.db import Database
from services.runtime.errors import InvalidArgument, NotFound, Unavailable
from services.runtime.grant_directory import ProjectDirectory

_GROUPINGS = {
    metering_pb2.USAGE_GROUPING_UNSPECIFIED: Grouping.GRANT,
    metering_pb2.USAGE_GROUPING_GRANT: Grouping.GRANT,
    metering_pb2.USAGE_GROUPING_PROJECT: Grouping.PROJECT,
    metering_pb2.USAGE_GROUPING_INSTITUTION: Grouping.INSTITUTION,
    metering_pb2.USAGE_GROUPING_PROVIDER: Grouping.PROVIDER,
    metering_pb2.USAGE_GROUPING_REGION: Grouping.REGION,
    metering_pb2.USAGE_GROUPING_MODEL: Grouping.MODEL,
}

_PLEDGE_COPY_SOURCES: dict[PledgeCopySource, metering_pb2.PledgeCopySource] = {
    "fresh": metering_pb2.PLEDGE_COPY_SOURCE_FRESH,
    "stored": metering_pb2.PLEDGE_COPY_SOURCE_STORED,
}

logger = logging.getLogger(__name__)


@dataclass
class MeteringApp:
    """State the handlers share, set by the service's start hook."""

    settings: MeteringSettings
    cache: RateCardCache | None = None
    db: Database | None = None
    js: JetStreamContext | None = None
    ingest: UsageIngest | None = None
    projects: ProjectDirectory | None = None
    pledge_sync: PledgeSync | None = None
    """Copier of the scheduler's pledges; None when ACSP_SCHEDULER_ADDRESS is not set."""

    def database(self) -> Database:
        if self.db is None:
            raise Unavailable("the metering service is still starting; retry")
        return self.db

    def rate_cards(self) -> RateCardCache:
        if self.cache is None:
            raise Unavailable("the metering service is still starting; retry")
        return self.cache

    def project_directory(self) -> ProjectDirectory:
        if self.projects is None:
            raise Unavailable("the metering service is still starting; retry")
        return self.projects


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    def __init__(self, app: MeteringApp) -> None:
        self._app = app

    async def GetRateCard(
        self, request: metering_pb2.GetRateCardRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RateCard:
        current_principal()
        history = self._app.rate_cards().history()
        if request.version == 0:
            return convert.rate_card_out(history.current)
        try:
            return convert.rate_card_out(history.get(request.version))
        except LookupError:
            raise NotFound("rate card version", str(request.version)) from None

    async def ListRateCards(
        self, request: metering_pb2.ListRateCardsRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListRateCardsResponse:
        current_principal()
        limit, token = convert.page_in(request.page)
        after = convert.number_token(token)
        cards = [c for c in self._app.rate_cards().history().versions if c.version > after]
        page = cards[:limit]
        last = str(page[-1].version) if page else None
        return metering_pb2.ListRateCardsResponse(
            rate_cards=[convert.rate_card_out(card) for card in page],
            page=convert.page_out(last, len(page), limit),
        )

    async def PublishRateCard(
        self, request: metering_pb2.PublishRateCardRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RateCard:
        principal = require_roles(Role.PROGRAM_OFFICE)
        if not request.request_id:
            raise InvalidArgument("request_id", "is missing", "give an idempotency key")
        models = convert.models_in(request.rate_card)
        effective = convert.effective_time_in(request.rate_card, datetime.now(UTC))
        cause = f"rpc:PublishRateCard:{request.request_id} by {principal.subject}"
        cache = self._app.rate_cards()
        async with self._app.database().acquire() as conn:
            card = await publish_version(
                conn,
                models,
                effective,
                cause,
                effective_stated=request.rate_card.HasField("effective_time"),
            )
        history = await cache.load()
        if self._app.js is not None:
            await put_in_bucket(await self._app.js.key_value(RATE_CARD_BUCKET), history.current)
        return convert.rate_card_out(card)

    async def ListCharges(
        self, request: metering_pb2.ListChargesRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListChargesResponse:
        job_id = convert.job_filter_in("job_id", request.job_id)
        project_id = await self._usage_project(
            current_principal(),
            ("grant_id", "job_id"),
            grant_id=request.grant_id,
            job_id=job_id,
        )
        limit, token = convert.page_in(request.page)
        after = convert.number_token(token)
        async with self._app.database().acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT c.*, j.grant_id,
                       (SELECT coalesce(sum(sample_count), 0) FROM metering.usage_periods u
                        WHERE u.job_id = c.job_id AND u.attempt = c.attempt
                          AND u.period_start = c.period_start) AS samples
                FROM metering.charges c
                JOIN metering.jobs j ON j.job_id = c.job_id AND j.attempt = c.attempt
                WHERE c.charge_id > $1 AND ($2 = '' OR c.job_id = $2)
                  AND ($3 = '' OR j.grant_id = $3) AND ($5 = '' OR j.project_id = $5)
                ORDER BY c.charge_id LIMIT $4
                """,
                after,
                job_id,
                request.grant_id,
                limit,
                project_id,
            )
        period = self._app.settings.period_s
        charges = [
            metering_pb2.Charge(
                charge_id=row["request_id"],
                job_id=row["job_id"],
                hold_id=row["hold_id"],
                grant_id=row["grant_id"],
                period_start_time=convert.time_out(row["period_start"]),
                period_end_time=convert.time_out(
                    datetime.fromtimestamp(row["period_start"].timestamp() + period, UTC)
                ),
                accelerator_seconds=convert.decimal_out(row["accelerator_seconds"]),
                amount_pf_days=convert.decimal_out(row["amount"]),
                rate_card_version=row["rate_card_version"],
                sample_count=int(row["samples"]),
                committed=row["state"] == "committed",
            )
            for row in rows
        ]
        last = str(rows[-1]["charge_id"]) if rows else None
        return metering_pb2.ListChargesResponse(
            charges=charges, page=convert.page_out(last, len(rows), limit)
        )

    async def ListRefunds(
        self, request: metering_pb2.ListRefundsRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListRefundsResponse:
        job_id = convert.job_filter_in("job_id", request.job_id)
        project_id = ""
        if request.provider_id:
            check_provider_access(request.provider_id, "refunds")
        else:
            project_id = await self._usage_project(current_principal(), ("job_id",), job_id=job_id)
        limit, token = convert.page_in(request.page)
        async with self._app.database().acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT r.*, (SELECT min(provider) FROM metering.refund_lines l
                             WHERE l.job_id = r.job_id AND l.attempt = r.attempt) AS provider
                FROM metering.refunds r
                WHERE r.request_id > $1 AND ($2 = '' OR r.job_id = $2)
                  AND ($3 = '' OR EXISTS (SELECT 1 FROM metering.refund_lines l
                       WHERE l.job_id = r.job_id AND l.attempt = r.attempt AND l.provider = $3))
                  AND ($5 = '' OR EXISTS (SELECT 1 FROM metering.jobs j
                       WHERE j.job_id = r.job_id AND j.attempt = r.attempt
                         AND j.project_id = $5))
                ORDER BY r.request_id LIMIT $4
                """,
                token,
                job_id,
                request.provider_id,
                limit,
                project_id,
            )
        refunds = [
            metering_pb2.RefundRecord(
                refund_id=row["request_id"],
                job_id=row["job_id"],
                hold_id=row["hold_id"],
                provider_id=row["provider"] or "",
                amount_pf_days=convert.decimal_out(row["amount"]),
                lost_seconds=(row["lost_until"] - row["lost_from"]).total_seconds(),
                reason=row["reason"],
                create_time=convert.time_out(row["created_at"]),
                committed=row["state"] == "committed",
            )
            for row in rows
        ]
        last = rows[-1]["request_id"] if rows else None
        return metering_pb2.ListRefundsResponse(
            refunds=refunds, page=convert.page_out(last, len(rows), limit)
        )

    async def QueryUsage(
        self, request: metering_pb2.QueryUsageRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.QueryUsageResponse:
        principal = current_principal()
        grouping = _GROUPINGS.get(request.grouping)
        if grouping is None:
            choices = ", ".join(
                metering_pb2.UsageGrouping.Name(value)
                for value in _GROUPINGS
                if value != metering_pb2.USAGE_GROUPING_UNSPECIFIED
            )
            raise InvalidArgument(
                "grouping",
                f"{request.grouping} is unknown",
                f"use one of {choices}, or leave it unset to group by grant",
            )
        start, end = convert.window_in("range", request.range)
        limit, token = convert.page_in(request.page)
        project_id = await self._usage_project(
            principal,
            ("project_id", "grant_id"),
            project_id=request.project_id,
            grant_id=request.grant_id,
        )
        filters = UsageFilter(
            request.grant_id, project_id, request.institution_id, request.provider_id
        )
        async with self._app.database().acquire() as conn:
            rows = await query_usage(conn, grouping, start, end, filters, after=token, limit=limit)
        return metering_pb2.QueryUsageResponse(
            rows=[
                metering_pb2.UsageRow(
                    key=row.key,
                    accelerator_hours=convert.decimal_out(row.accelerator_hours),
                    charged_pf_days=convert.decimal_out(row.charged_pf_days),
                    refunded_pf_days=convert.decimal_out(row.refunded_pf_days),
                    mean_utilization=row.mean_utilization,
                    sample_count=row.sample_count,
                )
                for row in rows
            ],
            page=convert.page_out(rows[-1].key if rows else None, len(rows), limit),
        )

    async def _usage_project(
        self,
        principal: Principal,
        fields: Sequence[str],
        *,
        project_id: str = "",
        grant_id: str = "",
        job_id: str = "",
    ) -> str:
        return await usage_project(
            principal,
            self._app.project_directory(),
            self._app.database(),
            fields,
            project_id=project_id,
            grant_id=grant_id,
            job_id=job_id,
        )

    async def _settlement(self, provider: str, window: common_pb2.TimeWindow) -> Settlement:
        if not provider:
            raise InvalidArgument("provider_id", "is missing", "name the provider")
        check_provider_access(provider, "settlement")
        start, end = convert.window_in("period", window)
        database = self._app.database()
        # Without a scheduler address metering copies nothing and settles from what it stored.
        source: PledgeCopySource = "stored"
        if self._app.pledge_sync is not None:
            stored_at = await copy_for_settlement(
                self._app.pledge_sync,
                database,
                provider,
                end,
                self._app.settings.pledge_copy_wait_s,
            )
            if stored_at is None:
                source = "fresh"
        async with database.acquire() as conn:
            known = await has_provider_records(conn, provider)
        if not known:
            raise NotFound(
                "provider",
                provider,
                "metering has no node, pledge, charge or refund of it; "
                "pass a provider id that ListPledges returns",
            )
        async with database.acquire() as conn:
            settlement = await build_settlement(conn, provider, start, end)
        return replace(settlement, pledges_copy_source=source)

    async def GetSettlement(
        self, request: metering_pb2.GetSettlementRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.Settlement:
        settlement = await self._settlement(request.provider_id, request.period)
        return metering_pb2.Settlement(
            provider_id=settlement.provider,
            period=common_pb2.TimeWindow(
                start_time=convert.time_out(settlement.period_start),
                end_time=convert.time_out(settlement.period_end),
            ),
            lines=[
                metering_pb2.SettlementLine(
                    region_id=line.region,
                    model=line.accelerator_model,
                    accelerator_hours=convert.decimal_out(line.accelerator_hours),
                    pf_days=convert.decimal_out(line.pf_days),
                    pledged_accelerator_hours=convert.decimal_out(line.pledged_accelerator_hours),
                    recalled_accelerator_hours=convert.decimal_out(line.recalled_accelerator_hours),
                    refunded_pf_days=convert.decimal_out(line.refunded_pf_days),
                    net_pf_days=convert.decimal_out(line.net_pf_days),
                )
                for line in settlement.lines
            ],
            delivered_pf_days=convert.decimal_out(settlement.delivered_pf_days),
            refunded_pf_days=convert.decimal_out(settlement.refunded_pf_days),
            net_pf_days=convert.decimal_out(settlement.net_pf_days),
            pledge_kept=settlement.pledge_kept,
            recall_count=settlement.recall_count,
            short_pledge_ids=settlement.short_pledges,
            uncounted_pledge_ids=settlement.uncounted_pledges,
            pledges_copy_time=(
                convert.time_out(settlement.pledges_copied_at)
                if settlement.pledges_copied_at is not None
                else None
            ),
            pledges_copy_source=_PLEDGE_COPY_SOURCES[settlement.pledges_copy_source],
        )

    async def ExportSettlement(
        self, request: metering_pb2.ExportSettlementRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ExportSettlementResponse:
        settlement = await self._settlement(request.provider_id, request.period)
        return metering_pb2.ExportSettlementResponse(csv=settlement_csv(settlement))

    async def ListJobEfficiency(
        self, request: metering_pb2.ListJobEfficiencyRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.ListJobEfficiencyResponse:
        project_id = await self._usage_project(
            current_principal(), ("project_id",), project_id=request.project_id
        )
        limit, token = convert.page_in(request.page)
        after: tuple[str, int] | None = None
        if token:
            job_id, _, attempt = token.rpartition("/")
            digits = attempt.isascii() and attempt.isdigit()
            if not job_id or not digits or int(attempt) > convert.MAX_ATTEMPT:
                raise InvalidArgument("page.page_token", "is malformed", "pass a token as given")
            after = (job_id, int(attempt))
        settings = self._app.settings
        async with self._app.database().acquire() as conn:
            rows = await job_efficiency(
                conn,
                project_id=project_id,
                after=after,
                limit=limit,
                threshold=settings.waste_threshold,
                sustained_s=settings.waste_sustained_s,
            )
        shown = [row for row in rows if row.flagged_waste or not request.flagged_only]
        last = f"{rows[-1].job_id}/{rows[-1].attempt}" if rows else None
        return metering_pb2.ListJobEfficiencyResponse(
            jobs=[
                metering_pb2.JobEfficiency(
                    job_id=row.job_id,
                    project_id=row.project_id,
                    mean_utilization=row.mean_utilization,
                    median_utilization=row.median_utilization,
                    flagged_waste=row.flagged_waste,
                    low_utilization_seconds=row.low_utilization_seconds,
                    accelerator_hours=convert.decimal_out(
                        row.accelerator_hours.quantize(Decimal("1e-12"))
                    ),
                )
                for row in shown
            ],
            page=convert.page_out(last, len(rows), limit),
        )

    async def GetModelReport(
        self, request: metering_pb2.GetModelReportRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetModelReportResponse:
        current_principal()
        start, end = convert.window_in("range", request.range)
        async with self._app.database().acquire() as conn:
            reports = await model_report(conn, start, end)
        return metering_pb2.GetModelReportResponse(
            models=[
                metering_pb2.ModelReport(
                    model=report.accelerator_model,
                    accelerator_hours=convert.decimal_out(
                        report.accelerator_hours.quantize(Decimal("1e-12"))
                    ),
                    fatal_events=report.fatal_events,
                    failures_per_thousand_hours=report.failures_per_thousand_hours,
                    mean_utilization=report.mean_utilization,
                )
                for report in reports
            ]
        )

    async def GetIngestStatus(
        self, request: metering_pb2.GetIngestStatusRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.GetIngestStatusResponse:
        current_principal()
        history = self._app.rate_cards().history()
        async with self._app.database().acquire() as conn:
            counts = await conn.fetchrow(
                """
                SELECT (SELECT coalesce(sum(sample_count), 0) FROM metering.usage_periods)
                           AS samples,
                       (SELECT count(*) FROM metering.dead_letters) AS dead,
                       (SELECT count(*) FROM metering.dead_events) AS dead_events,
                       (SELECT count(*) FROM metering.charges WHERE state <> 'committed')
                           AS uncommitted,
                       (SELECT coalesce(sum(accelerator_micros), 0) FROM metering.usage_periods)
                           AS micros,
                       (SELECT coalesce(sum(amount), 0) FROM metering.charges) AS charged
                """
            )
            priced = await priced_usage(conn, history)
        assert counts is not None
        pending = 0
        ingest = self._app.ingest
        if self._app.js is not None and ingest is not None:
            try:
                info = await self._app.js.consumer_info(ingest.config.stream, ingest.config.durable)
                pending = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except JetStreamNotFound:
                pending = 0
        return metering_pb2.GetIngestStatusResponse(
            samples_ingested=int(counts["samples"]),
            duplicates_ignored=ingest.counters.duplicates if ingest is not None else 0,
            dead_lettered=int(counts["dead"]),
            dead_events=int(counts["dead_events"]),
            pending_messages=pending,
            uncommitted_charges=int(counts["uncommitted"]),
            accelerator_seconds=convert.decimal_out(micros_to_seconds(int(counts["micros"]))),
            charged_pf_days=convert.decimal_out(counts["charged"]),
            priced_usage_pf_days=convert.decimal_out(priced),
        )
