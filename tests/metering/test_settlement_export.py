"""The settlement CSV names the pledge copy that the settlement was built from."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.metering.settlement import (
    CSV_HEADER,
    PledgeCopySource,
    Settlement,
    SettlementLine,
    settlement_csv,
)

START = datetime(2026, 12, 1, tzinfo=UTC)
COPIED_AT = datetime(2026, 12, 2, 0, 10, 30, 250000, tzinfo=UTC)


def _settlement(copied_at: datetime | None, source: PledgeCopySource) -> Settlement:
    line = SettlementLine(
        region="r1",
        accelerator_model="H800",
        accelerator_hours=Decimal("2"),
        pf_days=Decimal("0.5"),
        refunded_pf_days=Decimal("0"),
        pledged_accelerator_hours=Decimal("24"),
        recalled_accelerator_hours=Decimal("0"),
    )
    return Settlement(
        provider="prov-a",
        period_start=START,
        period_end=START + timedelta(days=1),
        lines=(line,),
        delivered_pf_days=line.pf_days,
        refunded_pf_days=Decimal(0),
        net_pf_days=line.pf_days,
        pledge_kept=True,
        recall_count=0,
        pledges_copied_at=copied_at,
        pledges_copy_source=source,
    )


def _rows(settlement: Settlement) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(settlement_csv(settlement))))


def test_csv_header_ends_with_copy_columns() -> None:
    header = next(csv.reader(io.StringIO(settlement_csv(_settlement(COPIED_AT, "fresh")))))
    assert header == list(CSV_HEADER)
    assert header[:5] == ["provider", "period_start", "period_end", "region", "accelerator_model"]
    assert header[-2:] == ["pledges_copied_at", "pledges_copy_source"]


@pytest.mark.parametrize("source", ["fresh", "stored"])
def test_csv_names_copy_on_every_row(source: PledgeCopySource) -> None:
    rows = _rows(_settlement(COPIED_AT, source))
    assert [row["region"] for row in rows] == ["r1", "TOTAL"]
    for row in rows:
        assert row["pledges_copied_at"] == "2026-12-02T00:10:30.250000+00:00"
        assert row["pledges_copy_source"] == source


def test_csv_without_copy_leaves_time_empty() -> None:
    rows = _rows(_settlement(None, "stored"))
    for row in rows:
        assert row["pledges_copied_at"] == ""
        assert row["pledges_copy_source"] == "stored"
