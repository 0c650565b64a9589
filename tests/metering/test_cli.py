"""The ``acsp usage`` and ``acsp settlement`` command lines."""

from __future__ import annotations

import pytest

from acsp.cli.main import build_parser
from acsp.cli.usage import refund_row, run_query, run_settlement_export
from acsp.v1 import metering_pb2


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


def test_usage_query_rejects_unknown_grouping() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["usage", "query", "--by", "colour", "--from", "2026-12-01", "--to", "2026-12-02"]
        )


@pytest.mark.parametrize(("seconds", "text"), [(39.87269, "39.87269"), (40.0, "40"), (0.0, "0")])
def test_refund_row_keeps_lost_microseconds(seconds: float, text: str) -> None:
    refund = metering_pb2.RefundRecord(refund_id="r1", lost_seconds=seconds)
    assert refund_row(refund)["lost (s)"] == text
