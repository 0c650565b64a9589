"""The ``acsp usage`` and ``acsp settlement`` command lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from acsp.cli import main, usage
from acsp.cli.main import build_parser
from acsp.cli.usage import refund_row, run_query, run_settlement_export
from acsp.v1 import metering_pb2
from services.metering.settlement import CSV_HEADER as SETTLEMENT_CSV_HEADER


def test_usage_query_parses_grouping_and_window() -> None:
    window = ["--from", "2026-12-01", "--to", "2026-12-02"]
    args = build_parser().parse_args(
        ["usage", "query", "--by", "model", *window, "--format", "csv", "--all"]
    )
    assert args.func is run_query
    assert args.by == "model"
    assert args.format == "csv"
    assert args.all


def test_settlement_export_takes_provider_and_output() -> None:
    window = ["--from", "2026-12-01", "--to", "2026-12-02"]
    args = build_parser().parse_args(["settlement", "export", "prov-a", *window, "-o", "out.csv"])
    assert args.func is run_settlement_export
    assert args.provider == "prov-a"
    assert str(args.output) == "out.csv"


@pytest.mark.parametrize("command", ["show", "export"])
@pytest.mark.parametrize(
    ("provider", "message"),
    [
        (["prov-a", "--provider", "prov-b"], "names provider prov-a, but --provider names prov-b"),
        ([], "--provider is required"),
    ],
)
def test_settlement_provider_usage_errors(
    command: str,
    provider: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No mesh runs in an empty data directory, so a call would exit 3. Exit 2 shows that the
    # command stopped before it connected.
    window = ["--from", "2026-12-01", "--to", "2026-12-02", "--data-dir", str(tmp_path)]
    code = main.main(["settlement", command, *provider, *window])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err


@pytest.mark.parametrize("command", ["show", "export"])
def test_settlement_help_deprecates_positional(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main.main(["settlement", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--provider PROVIDER" in text
    assert "deprecated: use --provider" in text


def test_usage_query_rejects_unknown_grouping() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["usage", "query", "--by", "colour", "--from", "2026-12-01", "--to", "2026-12-02"]
        )


@pytest.mark.parametrize(("seconds", "text"), [(39.87269, "39.87269"), (40.0, "40"), (0.0, "0")])
def test_refund_row_keeps_lost_microseconds(seconds: float, text: str) -> None:
    refund = metering_pb2.RefundRecord(refund_id="r1", lost_seconds=seconds)
    assert refund_row(refund)["lost (s)"] == text


class _Metering:
    """One usage row and one settlement line of 0.5 accelerator-hours."""

    def QueryUsage(
        self, request: metering_pb2.QueryUsageRequest
    ) -> metering_pb2.QueryUsageResponse:
        row = metering_pb2.UsageRow(key="prov-a")
        row.accelerator_hours.value = "0.5"
        return metering_pb2.QueryUsageResponse(rows=[row])

    def GetSettlement(self, request: metering_pb2.GetSettlementRequest) -> metering_pb2.Settlement:
        line = metering_pb2.SettlementLine(region_id="r1", model="A100-SXM4-80GB")
        line.accelerator_hours.value = "0.5"
        return metering_pb2.Settlement(provider_id="prov-a", lines=[line])


@pytest.mark.parametrize(
    ("argv", "counted"),
    [
        (["usage", "query", "--by", "provider", "--project", "p"], "charged or not"),
        (["settlement", "show", "prov-a"], "charged usage only"),
    ],
)
def test_usage_and_settlement_say_what_hours_count(
    argv: list[str],
    counted: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    @contextmanager
    def open_metering(args: object) -> Iterator[_Metering]:
        yield _Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07", "--data-dir", str(tmp_path)]
    code = main.main([*argv, *window])
    out, err = capsys.readouterr()
    assert code == 0
    assert "0.5" in out
    assert counted in err


def test_settlement_names_short_and_uncounted_pledges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Metering:
        def GetSettlement(
            self, request: metering_pb2.GetSettlementRequest
        ) -> metering_pb2.Settlement:
            return metering_pb2.Settlement(
                provider_id="prov-a",
                pledge_kept=False,
                short_pledge_ids=["pl-h100"],
                uncounted_pledge_ids=["pl-old"],
            )

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07", "--data-dir", str(tmp_path)]
    code = main.main(["settlement", "show", "prov-a", *window])
    out, err = capsys.readouterr()
    assert code == 0
    assert "pledge broken" in out
    assert "fewer healthy accelerators than protected in pledges pl-h100" in err
    assert "pledges pl-old in the period" in err


@pytest.mark.parametrize(("age", "noted"), [(timedelta(minutes=5), True), (timedelta(0), False)])
def test_settlement_notes_old_pledges(
    age: timedelta,
    noted: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copied = datetime.now(UTC).replace(microsecond=0) - age

    class Metering:
        def GetSettlement(
            self, request: metering_pb2.GetSettlementRequest
        ) -> metering_pb2.Settlement:
            settlement = metering_pb2.Settlement(provider_id="prov-a", pledge_kept=True)
            settlement.pledges_copy_time.FromDatetime(copied)
            return settlement

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07", "--data-dir", str(tmp_path)]
    code = main.main(["settlement", "show", "prov-a", *window])
    _, err = capsys.readouterr()
    assert code == 0
    note = f"note: pledges as of {copied:%Y-%m-%d %H:%M:%S} UTC"
    assert (note in err) is noted


def test_settlement_json_is_one_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Metering:
        def GetSettlement(
            self, request: metering_pb2.GetSettlementRequest
        ) -> metering_pb2.Settlement:
            settlement = metering_pb2.Settlement(
                provider_id="prov-a",
                period=request.period,
                pledge_kept=False,
                recall_count=2,
                short_pledge_ids=["pl-h100"],
                uncounted_pledge_ids=["pl-old"],
            )
            settlement.delivered_pf_days.value = "1.5"
            settlement.refunded_pf_days.value = "0.25"
            settlement.net_pf_days.value = "1.25"
            settlement.pledges_copy_time.FromDatetime(datetime(2026, 12, 7, 0, 10, tzinfo=UTC))
            settlement.pledges_copy_source = metering_pb2.PLEDGE_COPY_SOURCE_STORED
            line = settlement.lines.add(region_id="r1", model="A100-SXM4-80GB")
            line.accelerator_hours.value = "0.5"
            line.pf_days.value = "1.5"
            line.refunded_pf_days.value = "0.25"
            line.net_pf_days.value = "1.25"
            line.pledged_accelerator_hours.value = "48"
            line.recalled_accelerator_hours.value = "2"
            return settlement

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07", "--data-dir", str(tmp_path)]
    code = main.main(["settlement", "show", "prov-a", *window, "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    document = json.loads(out)
    assert document["provider"] == "prov-a"
    assert document["delivered_pf_days"] == "1.5"
    assert document["refunded_pf_days"] == "0.25"
    assert document["net_pf_days"] == "1.25"
    assert document["pledge_kept"] is False
    assert document["recall_count"] == 2
    assert document["short_pledge_ids"] == ["pl-h100"]
    assert document["uncounted_pledge_ids"] == ["pl-old"]
    assert document["pledges_copied_at"] == "2026-12-07T00:10:00+00:00"
    assert document["pledges_copy_source"] == "stored"
    assert document["period_start"] == "2026-12-06T00:00:00+00:00"
    assert document["period_end"] == "2026-12-07T00:00:00+00:00"
    assert document["rows"] == [
        {
            "region": "r1",
            "accelerator_model": "A100-SXM4-80GB",
            "accelerator_hours": "0.5",
            "pf_days": "1.5",
            "refunded_pf_days": "0.25",
            "net_pf_days": "1.25",
            "pledged_accelerator_hours": "48",
            "recalled_accelerator_hours": "2",
        }
    ]
    # The summary and the rows together carry every column of acsp settlement export.
    assert set(SETTLEMENT_CSV_HEADER) <= set(document) | set(document["rows"][0])


def test_settlement_json_without_line_refunds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A metering version that predates a line's refunded and net PF-days leaves them null."""

    class Metering:
        def GetSettlement(
            self, request: metering_pb2.GetSettlementRequest
        ) -> metering_pb2.Settlement:
            settlement = metering_pb2.Settlement(provider_id="prov-a")
            settlement.lines.add(region_id="r1", model="A100-SXM4-80GB").pf_days.value = "1"
            return settlement

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07", "--data-dir", str(tmp_path)]
    code = main.main(["settlement", "show", "prov-a", *window, "--format", "json"])
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert code == 0
    assert row["pf_days"] == "1"
    assert row["refunded_pf_days"] is None
    assert row["net_pf_days"] is None


def test_settlement_help_says_csv_is_rows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["settlement", "show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--format csv writes the lines only, without the summary" in text
