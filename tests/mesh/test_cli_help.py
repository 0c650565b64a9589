"""The ``acsp`` help texts, JSON keys and the names that options accept."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator

import pytest

from acsp.cli import _common
from acsp.cli.jobs import STATES, job_row_of
from acsp.cli.main import build_parser
from acsp.v1 import scheduler_pb2

AMOUNTS_HELP = "A table rounds amounts to 6 decimal places"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Yield every command that runs something, by its words after ``acsp``."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield " ".join(path), parser
    for group in groups:
        for name, child in group.choices.items():
            yield from commands(child, (*path, name))


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_positional_has_help() -> None:
    missing = [
        f"{name} {action.dest}"
        for name, parser in commands(build_parser())
        for action in parser._actions
        if not action.option_strings and not action.help
    ]
    assert missing == []


@pytest.mark.parametrize("command", ["status", "jobs show", "jobs cancel", "jobs list"])
def test_command_has_description(command: str) -> None:
    parsers = dict(commands(build_parser()))
    assert parsers[command].description


@pytest.mark.parametrize(
    "argv", [["status"], ["jobs", "cancel"], ["jobs", "list"], ["fleet", "delete"]]
)
def test_format_help_short_without_amounts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(argv, capsys)
    assert "--format {table,csv,json}" in text
    assert AMOUNTS_HELP not in text
    assert "A window's end is exclusive" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["usage", "query"],
        ["settlement", "show"],
        ["grants", "balance"],
        ["fleet", "pledge", "list"],
        ["fleet", "models"],
    ],
)
def test_format_help_explains_amounts(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(argv, capsys)
    assert AMOUNTS_HELP in text
    assert "A window's end is exclusive" in text


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["demo"], "output folder (default: demo-out)"),
        (["demo"], "(default: 0)"),
        (["grants", "list"], "(default: 100)"),
        (["grants", "applications"], "(default: 100)"),
        (["jobs", "submit"], "such as 0.25 (default: 1)"),
    ],
)
def test_help_shows_defaults(
    argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shown in help_text(argv, capsys)


@pytest.mark.parametrize(
    ("column", "key"),
    [
        ("accelerator hours", "accelerator_hours"),
        ("PF-days", "pf_days"),
        ("refunded PF-days", "refunded_pf_days"),
        ("lost (s)", "lost_s"),
        ("memory (GiB)", "memory_gib"),
        ("peak TFLOP/s", "peak_tflop_s"),
        ("per 1000 hours", "per_1000_hours"),
        ("sub-allocation", "sub_allocation"),
        ("job", "job"),
        ("task_id", "task_id"),
    ],
)
def test_json_key_is_snake_case(column: str, key: str) -> None:
    assert _common.json_key(column) == key


def test_json_records_use_snake_case_keys() -> None:
    records = [{"job": "j-1", "PF-days": 1, "accelerator hours": 2}]
    stream = io.StringIO()
    _common.print_records(
        records, ["job", "PF-days", "accelerator hours"], output_format="json", stream=stream
    )
    assert json.loads(stream.getvalue()) == {"job": "j-1", "pf_days": 1, "accelerator_hours": 2}


def test_csv_keeps_column_labels() -> None:
    stream = io.StringIO()
    _common.print_records([{"PF-days": 1}], ["PF-days"], output_format="csv", stream=stream)
    assert stream.getvalue() == "PF-days\n1\n"


def test_state_option_takes_printed_names() -> None:
    for number in scheduler_pb2.JobState.values():
        if not number:
            continue
        printed = job_row_of(scheduler_pb2.Job(state=number))["state"]
        args = build_parser().parse_args(["jobs", "list", "--state", printed])
        assert args.state == [printed]
        assert STATES[printed] == number


def test_state_option_takes_hyphenated_names() -> None:
    args = build_parser().parse_args(["jobs", "list", "--state", "timed-out"])
    assert args.state == ["timed_out"]


def test_state_option_rejects_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["jobs", "list", "--state", "finished"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'finished'" in capsys.readouterr().err
