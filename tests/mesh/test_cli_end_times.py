"""End times of windows in ``acsp`` output: a date typed to --end comes back as typed."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from acsp.cli import pledges
from acsp.cli._common import (
    END_OF_DAY,
    EXIT_USAGE,
    CommandError,
    format_end_time,
    format_time,
    parse_end_time,
    print_records,
)
from acsp.v1 import scheduler_pb2


def printed(row: dict[str, object], columns: tuple[str, ...], output_format: str) -> str:
    out = io.StringIO()
    print_records([row], columns, output_format=output_format, stream=out)
    return out.getvalue()


@pytest.mark.parametrize("typed", ["2027-03-31", "2028-02-29", "2027-12-31", "2026-01-01"])
def test_end_date_shown_as_typed(typed: str):
    assert format_end_time(parse_end_time(typed, "--end")) == f"{typed}{END_OF_DAY}"


def test_end_time_not_at_midnight_shown_exactly():
    end = parse_end_time("2027-03-31T12:30Z", "--end")
    assert format_end_time(end) == "2027-03-31T12:30:00+00:00"
    assert format_end_time(scheduler_pb2.Recall().end_time) == ""


def test_end_date_on_last_day_rejected():
    with pytest.raises(CommandError) as error:
        parse_end_time("9999-12-31", "--end")
    assert error.value.exit_code == EXIT_USAGE
    assert "--end '9999-12-31'" in str(error.value)
    assert "9999-12-31T23:59:59Z" in str(error.value)


def pledge_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "pledge_id": "",
        "provider": "eu",
        "region": "reg",
        "model": "A100-SXM4-80GB",
        "protected": 1,
        "recallable": 0,
        "start": "2027-01-01",
        "end": "2027-03-31",
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_pledge_end_date_includes_day():
    pledge = pledges.pledge_from_args(pledge_args())
    assert format_time(pledge.window.end_time) == "2027-04-01T00:00:00+00:00"
    # A window of one day, the day that both options name.
    one_day = pledges.pledge_from_args(pledge_args(start="2027-03-31"))
    assert format_time(one_day.window.end_time) == "2027-04-01T00:00:00+00:00"


def test_pledge_end_table_and_machine_output():
    row = pledges.pledge_row(pledges.pledge_from_args(pledge_args()))
    table = printed(row, pledges.PLEDGE_COLUMNS, "table")
    assert f"2027-03-31{END_OF_DAY}" in table
    assert "2027-04-01" not in table
    (document,) = map(json.loads, printed(row, pledges.PLEDGE_COLUMNS, "json").splitlines())
    assert document["end"] == "2027-04-01T00:00:00+00:00"
    csv_rows = printed(row, pledges.PLEDGE_COLUMNS, "csv").splitlines()
    assert csv_rows[1].endswith(",2027-04-01T00:00:00+00:00")


def test_recall_end_date_includes_day():
    args = argparse.Namespace(
        pledge="pl-1",
        count=1,
        effective="2027-03-01",
        notice=None,
        end="2027-03-31",
        duration=None,
        reason="peak",
    )
    recall = pledges.recall_from_args(args, now=0)
    assert format_time(recall.end_time) == "2027-04-01T00:00:00+00:00"
    row = pledges.recall_row(recall)
    assert f"2027-03-31{END_OF_DAY}" in printed(row, pledges.RECALL_COLUMNS, "table")
    (document,) = map(json.loads, printed(row, pledges.RECALL_COLUMNS, "json").splitlines())
    assert document["end"] == "2027-04-01T00:00:00+00:00"


def test_recall_without_end_shows_empty():
    row = pledges.recall_row(scheduler_pb2.Recall(recall_id="r-1"))
    (document,) = map(json.loads, printed(row, pledges.RECALL_COLUMNS, "json").splitlines())
    assert document["end"] == ""
