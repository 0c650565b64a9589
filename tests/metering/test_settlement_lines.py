"""Each settlement line's refunded and net PF-days, exact, in GetSettlement, the CSV and the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from acsp.cli import usage as usage_cli
from acsp.cli.main import main
from acsp.v1 import metering_pb2, metering_pb2_grpc
from services.metering.settlement import CSV_HEADER, SettlementLine, assemble, settlement_csv
from services.runtime.auth import Role
from services.runtime.db import Database
from tests.metering.helpers import T0
from tests.metering.test_service import BlockingStub, _serve, _window

LARGE = Decimal("123456789.123456789012345678901234")
"""An amount of 33 significant digits, more than the default decimal context's 28."""
TINY = Decimal("0.000000000000000000000001")

LINE_COLUMNS = CSV_HEADER[3:11]
"""The columns of the settlement CSV that differ from line to line."""


def line(pf_days: Decimal, refunded: Decimal) -> SettlementLine:
    return SettlementLine(
        region="r1",
        accelerator_model="H800",
        accelerator_hours=Decimal(1),
        pf_days=pf_days,
        refunded_pf_days=refunded,
        pledged_accelerator_hours=Decimal(0),
        recalled_accelerator_hours=Decimal(0),
    )


def test_line_net_is_exact() -> None:
    assert line(LARGE, TINY).net_pf_days == Decimal("123456789.123456789012345678901233")


def test_totals_are_exact() -> None:
    end = T0 + timedelta(days=1)
    delivered = [
        {"region": "r1", "accelerator_model": "H800", "seconds": Decimal(3600), "amount": LARGE},
        {"region": "r2", "accelerator_model": "H800", "seconds": Decimal(3600), "amount": LARGE},
    ]
    refunded = [{"region": "r1", "accelerator_model": "H800", "amount": TINY}]
    settlement = assemble("prov-a", T0, end, delivered, refunded, [], [], [])  # type: ignore[arg-type]
    assert settlement.delivered_pf_days == Decimal("246913578.246913578024691357802468")
    assert settlement.refunded_pf_days == TINY
    assert settlement.net_pf_days == Decimal("246913578.246913578024691357802467")
    rows = list(csv.DictReader(io.StringIO(settlement_csv(settlement))))
    assert rows[0]["net_pf_days"] == "123456789.123456789012345678901233"
    assert rows[-1]["net_pf_days"] == "246913578.246913578024691357802467"


@pytest.mark.timeout(120)
async def test_cli_json_rows_match_csv(
    database_url: str,
    nats_url: str,
    tmp_path: Path,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A refund of 0.125 PF-days on r1 and no charge, so the line's net is below zero.
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO metering.refunds (job_id, attempt, request_id, hold_id, amount, "
            "accelerator_seconds, lost_from, lost_until, reason, cause, state) "
            "VALUES ('job-r', 0, 'refund/job-r/0', 'hold', 0.125, 60, $1, $2, 'xid 79', 'x', "
            "'committed')",
            T0,
            T0 + timedelta(minutes=1),
        )
        await conn.execute(
            "INSERT INTO metering.refund_lines (job_id, attempt, provider, region, "
            "accelerator_model, accelerator_seconds, amount, refund_time) "
            "VALUES ('job-r', 0, 'prov-p', 'r1', 'A100-SXM4-80GB', 60, 0.125, $1)",
            T0 + timedelta(hours=1),
        )
    async with _serve(database_url, nats_url, tmp_path) as (service, client):
        office = client.metadata(Role.PROGRAM_OFFICE)
        settlement = await client.stub.GetSettlement(
            metering_pb2.GetSettlementRequest(provider_id="prov-p", period=_window(24)),
            metadata=office,
            timeout=20,
        )
        exported = await client.stub.ExportSettlement(
            metering_pb2.ExportSettlementRequest(provider_id="prov-p", period=_window(24)),
            metadata=office,
            timeout=20,
        )

        @contextmanager
        def open_metering(args: object) -> Iterator[Any]:
            with grpc.insecure_channel(service.address) as channel:
                yield BlockingStub(metering_pb2_grpc.MeteringServiceStub(channel), office)

        monkeypatch.setattr(usage_cli, "open_metering", open_metering)
        window = ["--from", T0.isoformat(), "--to", (T0 + timedelta(hours=24)).isoformat()]
        show = ["settlement", "show", "--provider", "prov-p", *window, "--format", "json"]
        code = await asyncio.to_thread(main, show)
    out = capsys.readouterr().out

    (reply_line,) = settlement.lines
    assert Decimal(reply_line.refunded_pf_days.value) == Decimal("0.125")
    assert Decimal(reply_line.net_pf_days.value) == Decimal("-0.125")
    assert code == 0
    document = json.loads(out)
    csv_rows = list(csv.DictReader(io.StringIO(exported.csv)))
    assert [row["region"] for row in csv_rows] == ["r1", "TOTAL"]
    (json_row,) = document["rows"]
    assert list(json_row) == list(LINE_COLUMNS)
    assert json_row == {column: csv_rows[0][column] for column in LINE_COLUMNS}
    for column in ("provider", "period_start", "period_end", "pledges_copy_source"):
        assert document[column] == csv_rows[0][column]
    assert (document["pledges_copied_at"] or "") == csv_rows[0]["pledges_copied_at"]
