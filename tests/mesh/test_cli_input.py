"""Command-line input checks and output of the ``acsp`` command, without starting a mesh."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from acsp.cli import _common, job_logs, jobs, main, usage
from acsp.v1 import common_pb2, metering_pb2
from scheduler.service.pledges import MAX_PLEDGE_ACCELERATORS
from scheduler.service.task_output import MAX_OUTPUT_BYTES
from scheduler.service.validation import MAX_TASKS


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["jobs", "submit", "--project", "p", "--tasks", "-3", "--", "true"], "--tasks"),
        (["jobs", "submit", "--project", "p", "--wall-time", "-5", "--", "true"], "--wall-time"),
        (["jobs", "submit", "--project", "p", "--array", "x", "--", "true"], "--array"),
        (["jobs", "list", "--limit", "0"], "--limit"),
        (["grants", "history", "g", "--limit", "-4"], "--limit"),
        (["grants", "history", "g", "--limit", "1001"], "--limit"),
        (["grants", "list", "--limit", "5000"], "--limit"),
        (["usage", "charges", "--page-size", "0"], "--page-size"),
        (["status", "--timeout", "-1"], "--timeout"),
        (["status", "--timeout", "nan"], "--timeout"),
        (["jobs", "list", "--timeout", "1e10"], "--timeout"),
        (["token", "--role", "pi", "--subject", "a", "--ttl", "99999999999999"], "--ttl"),
        (["token", "--role", "pi", "--subject", "a", "--ttl", "inf"], "--ttl"),
        (["token", "--role", "pi", "--subject", "a", "--ttl", "nan"], "--ttl"),
        (
            ["grants", "review", "app-1", "--score", "99999999999999999999", "--comments", "c"],
            "--score",
        ),
        (["grants", "review", "app-1", "--score", "-1", "--comments", "c"], "--score"),
        (["grants", "review", "app-1", "--score", "6", "--comments", "c"], "--score"),
        (["usage", "charges", "--page-size", "1001"], "--page-size"),
    ],
)
def test_out_of_range_option_exits_2_naming_it(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["up", "--agents", "-1"], "--agents"),
        (["up", "--agents", "many"], "--agents"),
        (["up", "--start-timeout", "0"], "--start-timeout"),
        (["up", "--start-timeout", "nan"], "--start-timeout"),
        (["up", "--start-timeout", "inf"], "--start-timeout"),
    ],
)
def test_up_rejects_bad_option_before_start(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
):
    # Parse only: a value that got past the parser would start a mesh.
    with pytest.raises(SystemExit) as exit_info:
        main.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "0.0001", "1.5", "1e30", "abc"])
def test_parse_millis_rejects_bad_share(text: str):
    with pytest.raises(_common.CommandError) as error:
        jobs.parse_millis(text)
    assert error.value.exit_code == _common.EXIT_USAGE
    assert "--accelerators" in str(error.value)


@pytest.mark.parametrize(("text", "millis"), [("1", 1000), ("0.25", 250), ("8", 8000)])
def test_parse_millis_accepts_whole_and_share(text: str, millis: int):
    assert jobs.parse_millis(text) == millis


def test_csv_rows_end_with_newline_only():
    out = io.StringIO()
    _common.print_records([{"a": "x", "b": "y"}], ["a", "b"], output_format="csv", stream=out)
    assert out.getvalue() == "a,b\nx,y\n"


def test_table_to_pipe_keeps_long_ids_whole():
    long_id = "grant-" + "0123456789abcdef" * 8
    out = io.StringIO()
    _common.print_records([{"grant": long_id, "state": "active"}], ["grant", "state"], stream=out)
    assert long_id in out.getvalue()


@pytest.mark.parametrize("name", ["[/bold]", "[/]", "[red]x[/red]", "[link=http://h]y[/link]"])
def test_table_shows_brackets_as_typed(name: str):
    out = io.StringIO()
    _common.print_records([{"name": name}], ["name"], title=name, stream=out)
    lines = out.getvalue().splitlines()
    assert lines[0].strip() == name
    assert lines[-1].strip() == name


def test_table_escapes_control_characters():
    out = io.StringIO()
    _common.print_records([{"name": "a\x1b[2Jb\nc\x9b"}], ["name"], stream=out)
    text = out.getvalue()
    assert "\x1b" not in text
    assert "\x9b" not in text
    assert "a\\x1b[2Jb\\nc\\x9b" in text
    assert len(text.splitlines()) == 3


class _FakeMetering:
    def ExportSettlement(self, request: object) -> argparse.Namespace:
        return argparse.Namespace(csv="provider\n")


@contextmanager
def _open_fake_metering(args: argparse.Namespace) -> Iterator[_FakeMetering]:
    yield _FakeMetering()


def test_export_to_missing_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(usage, "open_metering", _open_fake_metering)
    args = argparse.Namespace(
        provider="p",
        provider_option=None,
        start="2026-01-01",
        end="2026-01-02",
        output=tmp_path / "missing" / "x.csv",
    )
    with pytest.raises(_common.CommandError) as error:
        usage.run_settlement_export(args)
    assert "--output" in str(error.value)
    assert error.value.exit_code == _common.EXIT_USAGE


@pytest.mark.parametrize(
    ("wire", "shown"),
    [
        ("1.0560738425916890E-8", "0.00000001056073842591689"),
        ("0E-12", "0"),
        ("12.5", "12.5"),
        ("", ""),
        ("NaN", "NaN"),
    ],
)
def test_decimal_text_avoids_exponent(wire: str, shown: str):
    assert _common.decimal_text(common_pb2.Decimal(value=wire)) == shown


class _SettlementMetering:
    def GetSettlement(self, request: object) -> metering_pb2.Settlement:
        line = metering_pb2.SettlementLine(
            region_id="r",
            model="P100",
            accelerator_hours=common_pb2.Decimal(value="0.000013553889"),
            pf_days=common_pb2.Decimal(value="1.0560738425916890E-8"),
            pledged_accelerator_hours=common_pb2.Decimal(value="0E-12"),
            recalled_accelerator_hours=common_pb2.Decimal(value="0E-12"),
        )
        return metering_pb2.Settlement(
            provider_id="p", lines=[line], delivered_pf_days=common_pb2.Decimal(value="1E-8")
        )


@contextmanager
def _open_settlement_metering(args: argparse.Namespace) -> Iterator[_SettlementMetering]:
    yield _SettlementMetering()


def test_settlement_show_prints_no_exponent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(usage, "open_metering", _open_settlement_metering)
    args = argparse.Namespace(
        provider="p", provider_option=None, start="2026-01-01", end="2026-01-02", format="csv"
    )
    usage.run_settlement_show(args)
    out = capsys.readouterr().out
    assert "E-" not in out
    assert "0.00000001056073842591689" in out


class _UnauthenticatedError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return "missing credentials"


def test_unauthenticated_error_names_acsp_token():
    message = _common.describe_rpc_error(_UnauthenticatedError())
    assert message.startswith("UNAUTHENTICATED: missing credentials")
    assert "ACSP_TOKEN" in message


@pytest.mark.parametrize(("all_pages", "pages_read"), [(False, 1), (True, 2)])
def test_usage_page_notes_more_rows(
    all_pages: bool,
    pages_read: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    requests: list[metering_pb2.ListChargesRequest] = []

    class Metering:
        def ListCharges(self, request: metering_pb2.ListChargesRequest) -> object:
            requests.append(request)
            token = "" if request.page.page_token else "next"
            charge = metering_pb2.Charge(charge_id=f"c{len(requests)}")
            return metering_pb2.ListChargesResponse(
                charges=[charge], page=common_pb2.PageResponse(next_page_token=token)
            )

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    argv = ["usage", "charges", "--grant", "g", "--page-size", "1", "--format", "csv"]
    code = main.main(argv + (["--all"] if all_pages else []))
    captured = capsys.readouterr()
    assert code == 0
    assert len(requests) == pages_read
    assert len(captured.out.splitlines()) == 1 + pages_read
    if all_pages:
        assert captured.err == ""
    else:
        assert "more rows may exist than the 1 shown; pass --all" in captured.err


def test_usage_headers_read_like_other_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    class Metering:
        def ListCharges(self, request: metering_pb2.ListChargesRequest) -> object:
            charge = metering_pb2.Charge(charge_id="c1", committed=True)
            return metering_pb2.ListChargesResponse(charges=[charge])

    @contextmanager
    def open_metering(args: object) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    code = main.main(["usage", "charges", "--grant", "g"])
    _, header, _, row = capsys.readouterr().out.splitlines()[:4]
    assert code == 0
    assert "_" not in header
    assert "period start" in header
    assert "PF-days" in header
    assert row.split()[-1] == "yes"
    assert "True" not in row


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--task", str(job_logs.LAST_TASK_INDEX + 1), f"at most {MAX_TASKS} tasks"),
        ("--task", str(2**32), f"at most {MAX_TASKS} tasks"),
        ("--task", str(2**64), f"at most {MAX_TASKS} tasks"),
        ("--bytes", str(MAX_OUTPUT_BYTES + 1), f"at most {MAX_OUTPUT_BYTES} bytes"),
        ("--bytes", str(2**64), f"at most {MAX_OUTPUT_BYTES} bytes"),
    ],
)
def test_logs_option_above_maximum_exits_2(
    option: str, value: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    argv = ["jobs", "logs", "job-1", option, value, "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value} is out of range" in err
    assert reason in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option", ["--protected", "--recallable"])
def test_pledge_count_above_cap_exits_2(option: str, capsys: pytest.CaptureFixture[str]):
    window = ["--start", "2026-01-01", "--end", "2026-12-31"]
    pool = ["--provider", "p", "--region", "r", "--model", "P100"]
    count = str(MAX_PLEDGE_ACCELERATORS + 1)
    with pytest.raises(SystemExit) as exit_info:
        main.main(["fleet", "pledge", "set", *pool, option, count, *window])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {count} is out of range" in err
    assert f"from 0 to {MAX_PLEDGE_ACCELERATORS}" in err


def test_pledge_help_names_count_cap(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main.main(["fleet", "pledge", "set", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"cannot be recalled in the window, 0 to {MAX_PLEDGE_ACCELERATORS}" in out
    assert f"recall with notice, 0 to {MAX_PLEDGE_ACCELERATORS}" in out


def test_delegate_help_names_sub_projects(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main.main(["grants", "delegate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "delegate part of a grant to a member or sub-project (PI only)" in out
    assert "a member (not a viewer) of the grant's project" in out
    assert "the id of another project that its PI leads" in out
    assert "jobs of the sub-project, submitted by any of its members" in out


def test_logs_options_accept_their_maximum():
    assert job_logs.task_index(str(MAX_TASKS - 1)) == MAX_TASKS - 1
    assert job_logs.byte_count(str(MAX_OUTPUT_BYTES)) == MAX_OUTPUT_BYTES


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        (["usage", "query", "--from", "2026-12-06", "--to", "2026-12-06"], "--to 2026-12-07"),
        (["usage", "models", "--from", "2026-12-06", "--to", "2026-12-01"], "--to 2026-12-02"),
        (["usage", "query", "--from", "2026-12-06T10:00", "--to", "2026-12-06T09:00"], ""),
        (["usage", "query", "--from", "9999-12-31", "--to", "9999-12-31"], ""),
    ],
)
def test_usage_range_ending_before_start_exits_2(
    command: list[str], hint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # No mesh runs in tmp_path, so a range sent to metering would exit 3 instead.
    code = main.main([*command, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--to {command[-1]} is not after --from {command[-3]}" in err
    assert hint in err
    assert "Traceback" not in err


class _UnavailableError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"

    def trailing_metadata(self) -> tuple[()]:
        return ()


@contextmanager
def _unreachable_scheduler(args: object) -> Iterator[object]:
    class Scheduler:
        def ListJobs(self, request: object) -> object:
            raise _UnavailableError()

    yield Scheduler()


def test_unreachable_hint_names_data_dir_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(jobs, "open_scheduler", _unreachable_scheduler)
    from_env = tmp_path / "from-env"
    monkeypatch.setenv("ACSP_DATA_DIR", str(from_env))
    assert main.main(["jobs", "list"]) == _common.EXIT_NO_MESH
    err = capsys.readouterr().err
    assert "hint: run acsp status to see" in err
    assert str(from_env / "logs" / "scheduler.log") in err
    assert "~/.acsp" not in err

    given = tmp_path / "given"
    assert main.main(["jobs", "list", "--data-dir", str(given)]) == _common.EXIT_NO_MESH
    err = capsys.readouterr().err
    assert f"hint: run acsp status --data-dir {given} to see" in err
    assert str(given / "logs" / "scheduler.log") in err


@pytest.mark.parametrize(("count", "words"), [(0, "0 recalls"), (1, "1 recall"), (2, "2 recalls")])
def test_settlement_title_counts_recalls(
    count: int, words: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    class Metering(_SettlementMetering):
        def GetSettlement(self, request: object) -> metering_pb2.Settlement:
            settlement = super().GetSettlement(request)
            settlement.recall_count = count
            return settlement

    @contextmanager
    def open_metering(args: argparse.Namespace) -> Iterator[Metering]:
        yield Metering()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    args = argparse.Namespace(
        provider="p", provider_option=None, start="2026-01-01", end="2026-01-02", format="table"
    )
    usage.run_settlement_show(args)
    title = capsys.readouterr().out.splitlines()[0]
    assert title.endswith(words)
