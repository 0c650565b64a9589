"""MeteringService over gRPC: rate cards, settlements, usage queries and ingest status."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.cli import usage as usage_cli
from acsp.cli.main import main
from acsp.subjects import RATE_CARD_BUCKET, usage_subject
from acsp.v1 import common_pb2, metering_pb2, metering_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.metering.pledges import PledgeRecord, store_pledges
from services.metering.ratecard import default_rate_card
from services.metering.service import build_service
from services.metering.settings import MeteringSettings
from services.metering.waste_events import SUBJECT, waste_message_id
from services.runtime.auth import Role, generate_signing_key, load_signing_key, mint_token
from services.runtime.channel import open_channel
from services.runtime.db import Database
from services.runtime.dead_events import DeadEvent, insert_dead_events
from services.runtime.server import Service
from tests.metering.conftest import free_port
from tests.metering.helpers import (
    T0,
    Clock,
    LedgerDouble,
    admit,
    assert_priced,
    drain,
    exact_price,
    insert_charge_lines,
    make_charger,
    report,
    wait_until,
)
from tests.metering.helpers import sample as usage_sample

CARD = default_rate_card()


class Client:
    def __init__(self, channel: grpc.aio.Channel, key_path: Path) -> None:
        self.stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self._key = load_signing_key(key_path)

    def metadata(self, *roles: Role, provider: str | None = None) -> list[tuple[str, str]]:
        token = mint_token(self._key, "tester", list(roles), provider=provider)
        return [("authorization", f"Bearer {token}")]


@pytest.fixture
async def running(
    database_url: str, nats_url: str, tmp_path: Path, db: Database
) -> AsyncIterator[tuple[Service, Client]]:
    async with _serve(database_url, nats_url, tmp_path) as served:
        yield served


@asynccontextmanager
async def _serve(
    database_url: str, nats_url: str, tmp_path: Path, **extra_env: str
) -> AsyncIterator[tuple[Service, Client]]:
    """Run the metering service with ``extra_env`` added to its settings."""
    private, public = generate_signing_key(tmp_path)
    env = {
        "ACSP_DATABASE_URL": database_url,
        "ACSP_NATS_URL": nats_url,
        "ACSP_GRPC_LISTEN": "127.0.0.1:0",
        "ACSP_TOKEN_PUBLIC_KEY": str(public),
        "ACSP_DATA_DIR": str(tmp_path),
        "ACSP_METERING_LATENESS_S": "3600",
        # Nothing listens there: the service's own charger leaves charges pending, and the
        # test commits them through its ledger double.
        "ACSP_GRANT_ADDRESS": f"127.0.0.1:{free_port()}",
        **extra_env,
    }
    service = build_service(MeteringSettings.from_env(env))
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    channel = open_channel(service.address)
    try:
        yield service, Client(channel, private)
    finally:
        await channel.close()
        service.stop(grace_s=1.0)
        await asyncio.wait_for(task, 30)


def _window(hours: int) -> common_pb2.TimeWindow:
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(T0)
    end.FromDatetime(T0 + timedelta(hours=hours))
    return common_pb2.TimeWindow(start_time=start, end_time=end)


async def test_rate_card_lists_every_trace_model(running: tuple[Service, Client]) -> None:
    _, client = running
    card = await client.stub.GetRateCard(
        metering_pb2.GetRateCardRequest(), metadata=client.metadata(Role.RESEARCHER)
    )
    names = {rate.model.name for rate in card.rates}
    trace_models = {"G2", "T4", "P100", "V100M16", "V100M32", "G3", "A10"}
    trace_models |= {"A100-SXM4-80GB", "A800-SXM4-80GB", "H800", "GPU-series-1", "GPU-series-2"}
    assert trace_models <= names
    by_name = {rate.model.name: rate for rate in card.rates}
    assert by_name["A100-SXM4-80GB"].pf_days_per_accelerator_hour.value == "0.013"
    for rate in card.rates:
        hourly = Decimal(rate.pf_days_per_accelerator_hour.value)
        assert hourly == CARD.rate_per_hour(rate.model.name)
        assert "E" not in rate.pf_days_per_accelerator_second.value


async def test_publish_rate_card_needs_program_office(running: tuple[Service, Client]) -> None:
    service, client = running
    current = await client.stub.GetRateCard(
        metering_pb2.GetRateCardRequest(), metadata=client.metadata(Role.RESEARCHER)
    )
    request = metering_pb2.PublishRateCardRequest(request_id="rc-2", rate_card=current)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await client.stub.PublishRateCard(request, metadata=client.metadata(Role.PI))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    office = client.metadata(Role.PROGRAM_OFFICE)
    published = await client.stub.PublishRateCard(request, metadata=office)
    again = await client.stub.PublishRateCard(request, metadata=office)
    assert published.version == 2
    assert again.version == 2
    # The scheduler prices holds from the bucket's "current" entry.
    assert service.runtime is not None and service.runtime.js is not None
    bucket = await service.runtime.js.key_value(RATE_CARD_BUCKET)
    entry = await bucket.get("current")
    assert metering_pb2.RateCard.FromString(entry.value or b"").version == 2


async def test_settlement_and_usage_over_grpc(
    running: tuple[Service, Client], db: Database, ledger: LedgerDouble
) -> None:
    service, client = running
    assert service.runtime is not None and service.runtime.js is not None
    items = [usage_sample(f"node-1/{i}", "job-s", T0 + timedelta(minutes=i)) for i in range(60)]
    await service.runtime.js.publish(usage_subject("prov-a", "r1", "node-1"), report(items))

    async def stored() -> bool:
        async with db.acquire() as conn:
            return bool(await conn.fetchval("SELECT count(*) = 60 FROM metering.usage_samples"))

    await wait_until(stored)
    await admit(db, "job-s", ended_at=T0 + timedelta(hours=1), end_reason="completed")
    await drain(make_charger(db, ledger, Clock(T0 + timedelta(hours=2))))
    expected = Decimal(ledger.total_charged())
    assert_priced(expected, exact_price("A100-SXM4-80GB", 3600), charges=60)

    operator = client.metadata(Role.PROVIDER_OPERATOR, provider="prov-a")
    settlement = await client.stub.GetSettlement(
        metering_pb2.GetSettlementRequest(provider_id="prov-a", period=_window(24)),
        metadata=operator,
    )
    assert Decimal(settlement.delivered_pf_days.value) == expected
    assert Decimal(settlement.lines[0].accelerator_hours.value) == 1
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await client.stub.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="prov-b", period=_window(24)),
            metadata=operator,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    usage = await client.stub.QueryUsage(
        metering_pb2.QueryUsageRequest(
            grouping=metering_pb2.USAGE_GROUPING_MODEL, range=_window(24)
        ),
        metadata=client.metadata(Role.PROGRAM_OFFICE),
    )
    assert [row.key for row in usage.rows] == ["A100-SXM4-80GB"]
    assert Decimal(usage.rows[0].charged_pf_days.value) == expected
    assert usage.rows[0].sample_count == 60

    status = await client.stub.GetIngestStatus(
        metering_pb2.GetIngestStatusRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )
    assert status.samples_ingested == 60
    # Each of the twelve 5-minute charge lines rounds on its own, and the priced figure
    # follows that rule, so the two are equal to the last quantum.
    assert Decimal(status.charged_pf_days.value) == expected
    assert Decimal(status.priced_usage_pf_days.value) == expected

    missing = functools.partial(
        client.stub.QueryUsage,
        metering_pb2.QueryUsageRequest(grouping=metering_pb2.USAGE_GROUPING_MODEL),
        metadata=client.metadata(Role.PROGRAM_OFFICE),
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await missing()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_settlement_of_unknown_provider(
    running: tuple[Service, Client],
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    with pytest.raises(grpc.aio.AioRpcError) as shown:
        await client.stub.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="pl-missing", period=_window(24)),
            metadata=office,
        )
    assert shown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "provider 'pl-missing' not found" in (shown.value.details() or "")
    assert "ListPledges" in (shown.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as exported:
        await client.stub.ExportSettlement(
            metering_pb2.ExportSettlementRequest(provider_id="pl-missing", period=_window(24)),
            metadata=office,
        )
    assert exported.value.code() == grpc.StatusCode.NOT_FOUND

    # A provider with records in metering gets a statement, empty when the period has none.
    before = T0 - timedelta(days=2)
    pledge = PledgeRecord("pl-1", "prov-p", "r1", "A100-SXM4-80GB", 1, 1, before, T0, before)
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge], [])
    settlement = await client.stub.GetSettlement(
        metering_pb2.GetSettlementRequest(provider_id="prov-p", period=_window(24)),
        metadata=office,
    )
    assert settlement.provider_id == "prov-p"
    assert list(settlement.lines) == []
    assert settlement.delivered_pf_days.value == "0"

    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(service.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            yield BlockingStub(stub, office)

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    window = ["--from", T0.isoformat(), "--to", (T0 + timedelta(hours=24)).isoformat()]
    code = await asyncio.to_thread(main, ["settlement", "show", "pl-missing", *window])
    captured = capsys.readouterr()
    assert code == 1
    assert "NOT_FOUND: provider 'pl-missing' not found" in captured.err
    assert captured.out == ""


async def test_rates_cli_shows_effective_time(
    running: tuple[Service, Client],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    card = await client.stub.GetRateCard(metering_pb2.GetRateCardRequest(), metadata=office)
    card.effective_time.FromDatetime(T0 - timedelta(days=1))
    request = metering_pb2.PublishRateCardRequest(request_id="rc-cli", rate_card=card)
    await client.stub.PublishRateCard(request, metadata=office)

    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(service.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            yield BlockingStub(stub, office)

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    expected = {"1": "2026-01-01T00:00:00+00:00", "2": "2026-11-30T00:00:00+00:00"}
    for version, effective in expected.items():
        code = await asyncio.to_thread(
            main, ["usage", "rates", "--version", version, "--format", "csv"]
        )
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert code == 0
        assert len(rows) == len(card.rates)
        assert {row["effective time"] for row in rows} == {effective}


class BlockingStub:
    """A blocking metering stub that sends ``metadata`` and a deadline with each call."""

    def __init__(self, stub: metering_pb2_grpc.MeteringServiceStub, metadata: Any) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=20)


async def test_ingest_status_counts_dead_events(
    running: tuple[Service, Client],
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    dead = [
        DeadEvent(
            waste_message_id(f"job-{n}", 0),
            f"job-{n}/0",
            SUBJECT,
            b"x",
            "message size exceeds maximum allowed",
            5,
            T0,
        )
        for n in range(2)
    ]
    async with db.acquire() as conn:
        await insert_dead_events(conn, "metering.dead_events", dead)
        await conn.execute(
            "INSERT INTO metering.dead_letters (dedupe_key, subject, stream_sequence, reason)"
            " VALUES ('usage/1', 'acsp.usage.prov.reg.n0', 1, 'malformed usage report')"
        )

    status = await client.stub.GetIngestStatus(
        metering_pb2.GetIngestStatusRequest(), metadata=office
    )

    assert status.dead_events == 2
    assert status.dead_lettered == 1

    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(service.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            yield BlockingStub(stub, office)

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    code = await asyncio.to_thread(main, ["usage", "status", "--format", "csv"])
    rows = {
        row["field"]: row["value"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))
    }
    assert code == 0
    assert rows["dead events"] == "2"
    assert rows["dead letters"] == "1"


async def test_ingest_status_reads_no_row_per_line(
    running: tuple[Service, Client], db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each line has its own time, as partial periods do, so pricing in the service would
    # read one row per line on the event loop that also serves ingest.
    _service, client = running
    lines = [
        (1, "A100-SXM4-80GB", Decimal(7 + index * 1_000_003).scaleb(-6)) for index in range(300)
    ]
    await insert_charge_lines(db, lines)
    rows_read: list[int] = []
    real_fetch = asyncpg.connection.Connection.fetch
    real_fetchrow = asyncpg.connection.Connection.fetchrow

    async def fetch(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> list[Any]:
        rows = await real_fetch(self, *args, **kwargs)
        rows_read.append(len(rows))
        return rows

    async def fetchrow(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        row = await real_fetchrow(self, *args, **kwargs)
        rows_read.append(0 if row is None else 1)
        return row

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)
    monkeypatch.setattr(asyncpg.connection.Connection, "fetchrow", fetchrow)
    status = await client.stub.GetIngestStatus(
        metering_pb2.GetIngestStatusRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )

    expected = sum(CARD.charge(model, seconds) for _, model, seconds in lines)
    assert Decimal(status.priced_usage_pf_days.value) == expected
    assert sum(rows_read) < 10, rows_read


async def test_refund_list_shows_committed(running: tuple[Service, Client], db: Database) -> None:
    """A refund the ledger has not accepted is listed as not committed."""
    _, client = running
    async with db.acquire() as conn:
        for job_id, state in (("job-c", "committed"), ("job-f", "failed")):
            await conn.execute(
                "INSERT INTO metering.refunds (job_id, attempt, request_id, hold_id, amount, "
                "accelerator_seconds, lost_from, lost_until, reason, cause, state) "
                "VALUES ($1, 0, $2, 'hold', 1, 60, $3, $4, 'xid 79', 'x', $5)",
                job_id,
                f"refund/{job_id}/0",
                T0,
                T0 + timedelta(minutes=1),
                state,
            )
    listed = await client.stub.ListRefunds(
        metering_pb2.ListRefundsRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )
    assert [(r.job_id, r.committed) for r in listed.refunds] == [
        ("job-c", True),
        ("job-f", False),
    ]


async def test_settlement_without_scheduler_copy_time(
    database_url: str, nats_url: str, tmp_path: Path, db: Database
) -> None:
    # Nothing listens at the scheduler's address, so the settlement uses the copy on hand.
    copied_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    pledge = PledgeRecord(
        "pl-1", "prov-p", "r1", "A100-SXM4-80GB", 1, 1, T0, T0 + timedelta(hours=2), T0
    )
    async with db.acquire() as conn:
        await store_pledges(conn, [pledge], [])
        await conn.execute(
            "INSERT INTO metering.pledge_copies (provider, copied_at) VALUES ('', $1)", copied_at
        )
    scheduler = f"127.0.0.1:{free_port()}"
    async with _serve(database_url, nats_url, tmp_path, ACSP_SCHEDULER_ADDRESS=scheduler) as (
        _,
        client,
    ):
        settlement = await client.stub.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="prov-p", period=_window(24)),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
            timeout=20,
        )
        exported = await client.stub.ExportSettlement(
            metering_pb2.ExportSettlementRequest(provider_id="prov-p", period=_window(24)),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
            timeout=20,
        )
    (line,) = settlement.lines
    assert Decimal(line.pledged_accelerator_hours.value) == 2 * 2
    assert settlement.pledges_copy_time.ToDatetime(tzinfo=UTC) == copied_at
    assert settlement.pledges_copy_source == metering_pb2.PLEDGE_COPY_SOURCE_STORED
    rows = list(csv.DictReader(io.StringIO(exported.csv)))
    assert [row["region"] for row in rows] == ["r1", "TOTAL"]
    for row in rows:
        assert row["pledges_copied_at"] == copied_at.isoformat()
        assert row["pledges_copy_source"] == "stored"


class ListingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """A scheduler that lists one pledge of prov-p, with counts, as its leader lists them."""

    async def ListPledges(
        self, request: scheduler_pb2.ListPledgesRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListPledgesResponse:
        pledge = scheduler_pb2.Pledge(
            pledge_id="pl-1",
            provider_id="prov-p",
            region_id="r1",
            model="A100-SXM4-80GB",
            protected_count=1,
            recallable_count=1,
        )
        pledge.window.start_time.FromDatetime(T0)
        pledge.window.end_time.FromDatetime(T0 + timedelta(hours=2))
        pledge.create_time.FromDatetime(T0)
        return scheduler_pb2.ListPledgesResponse(pledges=[pledge], fleet_counted=True)

    async def ListRecalls(
        self, request: scheduler_pb2.ListRecallsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListRecallsResponse:
        return scheduler_pb2.ListRecallsResponse()


async def test_settlement_names_fresh_copy(
    database_url: str, nats_url: str, tmp_path: Path, db: Database
) -> None:
    scheduler = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
        ListingScheduler(),  # type: ignore[abstract]
        scheduler,
    )
    port = scheduler.add_insecure_port("127.0.0.1:0")
    await scheduler.start()

    try:
        async with _serve(
            database_url, nats_url, tmp_path, ACSP_SCHEDULER_ADDRESS=f"127.0.0.1:{port}"
        ) as (_, client):
            requested_at = datetime.now(UTC)
            settlement = await client.stub.GetSettlement(
                metering_pb2.GetSettlementRequest(provider_id="prov-p", period=_window(24)),
                metadata=client.metadata(Role.PROGRAM_OFFICE),
                timeout=20,
            )
            exported = await client.stub.ExportSettlement(
                metering_pb2.ExportSettlementRequest(provider_id="prov-p", period=_window(24)),
                metadata=client.metadata(Role.PROGRAM_OFFICE),
                timeout=20,
            )
    finally:
        await scheduler.stop(None)

    (line,) = settlement.lines
    assert Decimal(line.pledged_accelerator_hours.value) == 2 * 2
    assert settlement.pledges_copy_source == metering_pb2.PLEDGE_COPY_SOURCE_FRESH
    assert settlement.pledges_copy_time.ToDatetime(tzinfo=UTC) >= requested_at
    rows = list(csv.DictReader(io.StringIO(exported.csv)))
    assert [row["region"] for row in rows] == ["r1", "TOTAL"]
    for row in rows:
        assert datetime.fromisoformat(row["pledges_copied_at"]) >= requested_at
        assert row["pledges_copy_source"] == "fresh"
