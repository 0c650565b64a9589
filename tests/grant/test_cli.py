"""``acsp grants`` against a running grant service, through a token-carrying blocking stub."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from acsp.cli import grants as grants_cli
from acsp.cli._common import END_OF_DAY, format_time, parse_end_time
from acsp.cli.main import main
from acsp.v1 import grant_pb2_grpc
from services.runtime.auth import mint_token
from tests.grant.service_helpers import RunningGrant, running_grant

TODAY = datetime.now(UTC).date()

START = TODAY.isoformat()
END = (TODAY + timedelta(days=365)).isoformat()


class _TokenStub:
    def __init__(self, stub: grant_pb2_grpc.GrantServiceStub, token: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=20)


def use_identity(
    monkeypatch: pytest.MonkeyPatch, svc: RunningGrant, subject: str, roles: list[str]
) -> None:
    token = mint_token(svc.key, subject, roles)

    @contextmanager
    def open_grants(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(svc.address) as channel:
            yield _TokenStub(grant_pb2_grpc.GrantServiceStub(channel), token)

    monkeypatch.setattr(grants_cli, "open_grants", open_grants)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["grants", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_cli_apply_and_balance(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, _, err = await run_cli(
            capsys, "institution", "uni-a", "University A", "--country", "DE"
        )
        assert code == 0, err
        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, out, err = await run_cli(
            capsys, "project", "proj-a", "--institution", "uni-a", "--pi", "alice"
        )
        assert code == 0, err
        assert "alice" in out
        code, out, err = await run_cli(
            capsys,
            "apply",
            "--project",
            "proj-a",
            "--tier",
            "exploratory",
            "--pf-days",
            "2.5",
            "--start",
            START,
            "--end",
            END,
            "--justification",
            "pilot",
            "--format",
            "json",
        )
        assert code == 0, err
        fields = json.loads(out)
        assert fields["state"] == "awarded"
        grant_id = fields["grant"]
        code, out, err = await run_cli(capsys, "balance", grant_id, "--format", "csv")
        assert code == 0, err
        assert "available PF-days,2.5" in out
        code, out, err = await run_cli(capsys, "history", grant_id, "--format", "json")
        award = json.loads(out.splitlines()[0])
        assert award["kind"] == "award"
        assert award["from"] == "program:pool"
        assert award["to"] == f"grant:{grant_id}:available"
        first_entry = json.loads(out.splitlines()[0])["entry"]
        # An entry id is a count, so JSON writes it as a number.
        assert isinstance(first_entry, int)
        code, out, err = await run_cli(capsys, "history", grant_id, "--after", str(first_entry))
        assert code == 0, err
        assert "award" not in out
        bad_after = {
            "-1": "argument --after: -1 is out of range",
            "abc": "argument --after: 'abc' is not a whole number",
            "²": "argument --after: '²' is not a whole number",
        }
        for after, message in bad_after.items():
            with pytest.raises(SystemExit) as exited:
                await run_cli(capsys, "history", grant_id, "--after", after)
            err = capsys.readouterr().err
            assert exited.value.code == 2
            assert message in err
            assert "page_token" not in err
        code, _, err = await run_cli(
            capsys,
            "apply",
            "--project",
            "proj-a",
            "--tier",
            "standard",
            "--pf-days",
            "-3",
            "--start",
            START,
            "--end",
            END,
            "--justification",
            "x",
        )
        assert code == 2
        assert "INVALID_ARGUMENT" in err
        assert "application.requested_pf_days" in err
        code, _, err = await run_cli(
            capsys,
            "apply",
            "--project",
            "proj-a",
            "--tier",
            "standard",
            "--pf-days",
            "0.00",
            "--start",
            START,
            "--end",
            END,
            "--justification",
            "x",
        )
        assert code == 2
        assert "invalid application.requested_pf_days: 0.00 is zero" in err
        assert "PF-day amounts must be above zero" in err
        assert "give a positive number of PF-days" in err
        code, out, err = await run_cli(capsys, "applications", "--format", "json")
        assert code == 0, err
        assert len(out.splitlines()) == 1
        code, _, err = await run_cli(
            capsys,
            "apply",
            "--project",
            "proj-a",
            "--tier",
            "standard",
            "--pf-days",
            "3",
            "--start",
            "0001-01-01",
            "--end",
            END,
            "--justification",
            "x",
        )
        assert code == 2
        assert "INVALID_ARGUMENT" in err
        assert "application.validity.start_time" in err
        assert "2000..2199" in err
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, out, err = await run_cli(capsys, "summary", "--format", "json")
        assert code == 0, err
        fields = {row["field"]: row["value"] for row in map(json.loads, out.splitlines())}
        assert fields["net awarded from the program pool PF-days"] == "2.5"
        assert fields["postings sum PF-days"] == "0"


async def test_cli_assign_unregistered_institution(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        for institution in ("uni-a", "uni-b"):
            code, _, err = await run_cli(
                capsys, "institution", institution, institution, "--country", "DE"
            )
            assert code == 0, err
        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, _, err = await run_cli(
            capsys, "project", "proj-a", "--institution", "uni-a", "--pi", "alice"
        )
        assert code == 0, err
        code, out, err = await run_cli(
            capsys,
            "apply",
            "--project",
            "proj-a",
            "--tier",
            "standard",
            "--pf-days",
            "20",
            "--start",
            START,
            "--end",
            END,
            "--justification",
            "reviewed",
            "--format",
            "json",
        )
        assert code == 0, err
        application = json.loads(out)["application"]

        use_identity(monkeypatch, svc, "office", ["program_office"])
        assign = ("assign", application, "--reviewer", "rita")
        code, out, err = await run_cli(capsys, *assign, "--institution", "uni-x")
        assert code == 1
        assert out == ""
        assert "NOT_FOUND" in err
        assert "institution 'uni-x' not found" in err
        assert "reviewer_institution_id" in err
        assert "register it with acsp grants institution" in err

        # The rejected assignment changed nothing.
        code, out, err = await run_cli(capsys, "applications", application, "--format", "json")
        assert code == 0, err
        fields = json.loads(out)
        assert fields["state"] == "submitted"
        assert fields["reviewers"] == []

        code, out, err = await run_cli(capsys, *assign, "--institution", "uni-b")
        assert code == 0, err
        assert "rita" in out


async def test_cli_shows_limits_and_history(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        for institution in ("uni-a", "uni-b"):
            code, _, err = await run_cli(
                capsys, "institution", institution, institution, "--country", "DE"
            )
            assert code == 0, err
        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, _, err = await run_cli(
            capsys, "project", "proj-a", "--institution", "uni-a", "--pi", "alice"
        )
        assert code == 0, err
        code, out, err = await run_cli(
            capsys,
            *("apply", "--project", "proj-a", "--tier", "standard", "--pf-days", "20"),
            *("--start", START, "--end", END, "--justification", "j", "--format", "json"),
        )
        assert code == 0, err
        application = json.loads(out)["application"]
        use_identity(monkeypatch, svc, "office", ["program_office"])
        assign = ("assign", application, "--reviewer", "rita", "--institution", "uni-b")
        code, _, err = await run_cli(capsys, *assign)
        assert code == 0, err
        use_identity(monkeypatch, svc, "rita", ["reviewer"])
        for score in ("4", "5"):
            code, _, err = await run_cli(
                capsys, "review", application, "--score", score, "--comments", "fine"
            )
            assert code == 0, err
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, out, err = await run_cli(
            capsys,
            *("award", application, "--reason", "ok", "--provider", "openb"),
            *("--region", "openb/east", "--model", "A100-SXM4-80GB", "--format", "json"),
        )
        assert code == 0, err
        decided = json.loads(out)
        grant_id = decided["grant"]
        assert decided["decision"]["outcome"] == "award"
        assert len(decided["reviews"]) == 1
        assert decided["reviews"][0]["reviewer"] == "rita"
        assert decided["reviews"][0]["score"] == 5
        history = decided["history"]
        assert [step["event"] for step in history] == [
            "submitted",
            "reviewer_assigned",
            "reviewed",
            "review_revised",
            "awarded",
        ]
        assert set(history[0]) == {"time", "event", "actor", "detail"}
        assert history[1]["actor"] == "office"
        assert history[3]["detail"] == "score 4 -> 5"

        code, out, err = await run_cli(capsys, "applications", application)
        assert code == 0, err
        assert "review_revised by rita: score 4 -> 5" in out

        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, out, err = await run_cli(capsys, "show", grant_id, "--format", "csv")
        assert code == 0, err
        assert "providers,openb" in out
        assert "regions,openb/east" in out
        assert "accelerator models,A100-SXM4-80GB" in out
        assert "available PF-days,20" in out
        code, out, err = await run_cli(capsys, "show", grant_id, "--format", "json")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["providers"] == ["openb"]
        assert shown["regions"] == ["openb/east"]
        assert shown["accelerator_models"] == ["A100-SXM4-80GB"]
        assert shown["available_pf_days"] == "20"


async def test_cli_errors_name_the_option(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, _, err = await run_cli(capsys, "institution", "uni-a", " ", "--country", "DE")
        assert code == 2
        assert "institution.display_name is set by the name argument" in err
        for country, reason in (("", "is missing"), ("UK", "use GB")):
            code, _, err = await run_cli(
                capsys, "institution", "uni-a", "University A", "--country", country
            )
            assert code == 2
            assert "institution.country_code is set by --country" in err
            assert reason in err
        code, _, err = await run_cli(
            capsys, "institution", "uni-a", "University A", "--country", "DE"
        )
        assert code == 0, err

        use_identity(monkeypatch, svc, "alice", ["pi"])
        project = ("project", "proj-a", "--institution", "uni-a", "--pi", "alice")
        code, _, err = await run_cli(capsys, *project, "--member", ":viewer")
        assert code == 2
        assert "project.members[0].subject is set by --member" in err
        code, _, err = await run_cli(capsys, *project, "--member", "bad name")
        assert code == 2
        assert "project.members[0].subject is set by --member" in err
        assert "'bad name' is not a valid principal name" in err
        code, _, err = await run_cli(capsys, *project)
        assert code == 0, err

        apply = ("apply", "--project", "proj-a", "--tier", "standard", "--justification", "j")
        window = ("--start", START, "--end", END)
        code, _, err = await run_cli(capsys, *apply, "--pf-days", "-3", *window)
        assert code == 2
        assert "application.requested_pf_days is set by --pf-days" in err
        # A window longer than five years; the service checks its length.
        too_late = (TODAY + timedelta(days=6 * 366)).isoformat()
        code, _, err = await run_cli(
            capsys, *apply, "--pf-days", "3", "--start", START, "--end", too_late
        )
        assert code == 2
        assert "application.validity.end_time is set by --end" in err

        # The rejected applications were not stored.
        code, out, err = await run_cli(capsys, "applications", "--format", "json")
        assert code == 0, err
        assert out == ""


async def test_cli_list_notes_rows_past_limit(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, _, err = await run_cli(
            capsys, "institution", "uni-a", "University A", "--country", "DE"
        )
        assert code == 0, err
        use_identity(monkeypatch, svc, "alice", ["pi"])
        for project in ("proj-a", "proj-b", "proj-c"):
            code, _, err = await run_cli(
                capsys, "project", project, "--institution", "uni-a", "--pi", "alice"
            )
            assert code == 0, err
            code, _, err = await run_cli(
                capsys,
                *("apply", "--project", project, "--tier", "standard", "--pf-days", "5"),
                *("--start", START, "--end", END, "--justification", "j"),
            )
            assert code == 0, err

        code, out, err = await run_cli(capsys, "applications", "--limit", "2", "--format", "csv")
        assert code == 0, err
        assert len(out.splitlines()) == 3
        assert "more rows may exist than the 2 shown" in err
        assert "--limit above 2" in err

        code, out, err = await run_cli(capsys, "applications", "--limit", "5", "--format", "csv")
        assert code == 0, err
        assert len(out.splitlines()) == 4
        assert err == ""


def test_end_date_includes_whole_day() -> None:
    day_end = parse_end_time("2027-12-31", "--end")
    exact = parse_end_time("2027-12-31T12:00:00", "--end")

    assert format_time(day_end) == "2028-01-01T00:00:00+00:00"
    assert format_time(exact) == "2027-12-31T12:00:00+00:00"


@pytest.mark.parametrize("text", ["20271231", "2027-W52-5", "2027W525"])
def test_end_date_other_forms_include_day(text: str) -> None:
    # Other ISO 8601 forms of 2027-12-31 that datetime.fromisoformat accepts.
    assert format_time(parse_end_time(text, "--end")) == "2028-01-01T00:00:00+00:00"


def test_end_with_hour_is_exact() -> None:
    assert format_time(parse_end_time("2027-12-31T12", "--end")) == "2027-12-31T12:00:00+00:00"


async def test_cli_shows_end_date_as_typed(
    schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    typed = (TODAY + timedelta(days=90)).isoformat()
    stored = (TODAY + timedelta(days=91)).isoformat() + "T00:00:00+00:00"
    extended = (TODAY + timedelta(days=120)).isoformat()
    async with running_grant(schema, tmp_path) as svc:
        use_identity(monkeypatch, svc, "office", ["program_office"])
        code, _, err = await run_cli(
            capsys, "institution", "uni-a", "University A", "--country", "DE"
        )
        assert code == 0, err
        use_identity(monkeypatch, svc, "alice", ["pi"])
        code, _, err = await run_cli(
            capsys, "project", "proj-a", "--institution", "uni-a", "--pi", "alice"
        )
        assert code == 0, err
        apply = ("apply", "--project", "proj-a", "--tier", "exploratory", "--pf-days", "1")
        window = ("--start", START, "--end", typed, "--justification", "pilot")

        code, out, err = await run_cli(capsys, *apply, *window)
        assert code == 0, err
        assert f"{START}T00:00:00+00:00 to {typed}{END_OF_DAY}" in out

        code, out, err = await run_cli(capsys, "list")
        assert code == 0, err
        assert f"{typed}{END_OF_DAY}" in out
        assert stored not in out

        # Scripts get the exact, exclusive end.
        code, out, err = await run_cli(capsys, "list", "--format", "json")
        assert code == 0, err
        (grant,) = map(json.loads, out.splitlines())
        assert grant["ends"] == stored
        assert grant["starts"] == f"{START}T00:00:00+00:00"
        code, out, err = await run_cli(capsys, "list", "--format", "csv")
        assert code == 0, err
        assert out.splitlines()[1].endswith(f",{stored}")

        use_identity(monkeypatch, svc, "office", ["program_office"])
        extend = ("extend", grant["grant"], "--end", extended, "--reason", "more time")
        code, out, err = await run_cli(capsys, *extend)
        assert code == 0, err
        assert f"{extended}{END_OF_DAY}" in out

        # The service names the midnight after the typed date, so the CLI adds a note.
        earlier = (TODAY + timedelta(days=30)).isoformat()
        extend = ("extend", grant["grant"], "--end", earlier, "--reason", "less time")
        code, out, err = await run_cli(capsys, *extend)
        assert code == 2
        assert out == ""
        assert "invalid new_end_time" in err
        next_midnight = (TODAY + timedelta(days=31)).isoformat() + "T00:00:00+00:00"
        assert (
            f"note: --end {earlier} is a date alone, so the window ends at {next_midnight}" in err
        )


async def test_cli_apply_end_before_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextmanager
    def no_service(args: object) -> Iterator[Any]:
        raise AssertionError("the window must be checked before any call")
        yield

    monkeypatch.setattr(grants_cli, "open_grants", no_service)
    apply = ("apply", "--project", "proj-a", "--tier", "exploratory", "--pf-days", "1")
    window = ("--start", "2027-01-01", "--end", "2026-12-31", "--justification", "pilot")
    code, out, err = await run_cli(capsys, *apply, *window)
    assert code == 2
    assert out == ""
    assert "--end 2026-12-31 is not after --start 2027-01-01" in err

    # A date alone in both options is a window of that one day.
    one_day = ("--start", "2027-01-01", "--end", "2027-01-01", "--justification", "pilot")
    with pytest.raises(AssertionError, match="before any call"):
        await run_cli(capsys, *apply, *one_day)
