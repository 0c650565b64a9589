"""Usage errors of the ``acsp`` command: which usage line they print and that they exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from acsp.cli import _common, grants, main, usage, usage_arrays
from acsp.v1 import grant_pb2, metering_pb2, scheduler_pb2


@pytest.mark.parametrize(
    ("argv", "usage_line"),
    [
        (["jobs", "list", "--bogus"], "usage: acsp jobs list "),
        (["usage", "charges", "--bogus", "x"], "usage: acsp usage charges "),
        (["status", "--bogus"], "usage: acsp status "),
        (["jobs", "--bogus", "list"], "usage: acsp jobs "),
    ],
)
def test_unknown_option_prints_subcommand_usage(
    argv: list[str], usage_line: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == _common.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(usage_line), err
    assert "unrecognized arguments: --bogus" in err
    assert "usage: acsp [-h]" not in err


def test_unknown_top_level_option_prints_top_usage(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--bogus", "status"])
    assert exit_info.value.code == _common.EXIT_USAGE
    assert capsys.readouterr().err.startswith("usage: acsp [-h]")


class _PermissionDeniedError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return "only the program office may list every project's charges"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _DenyingMetering:
    def __getattr__(self, name: str) -> object:
        def call(request: object) -> object:
            raise _PermissionDeniedError()

        return call


@contextmanager
def _open_denying_metering(args: object) -> Iterator[_DenyingMetering]:
    yield _DenyingMetering()


@pytest.mark.parametrize("listing", ["charges", "refunds", "efficiency"])
def test_missing_filter_exits_2(
    listing: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setattr(usage, "open_metering", _open_denying_metering)
    argv = ["usage", listing, "--data-dir", str(tmp_path)]
    code = main.main(argv)
    err = capsys.readouterr().err
    assert "a filter is required" in err
    assert code == _common.EXIT_USAGE


class _NotFoundError(grpc.RpcError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return f"job {self.job_id!r} not found"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _ArrayScheduler:
    """Array ``arr`` with elements 0 and 1 that ran, and 2 that never started."""

    def GetJob(self, request: scheduler_pb2.GetJobRequest) -> scheduler_pb2.Job:
        if request.job_id != "arr":
            raise _NotFoundError(request.job_id)
        return scheduler_pb2.Job(job_id="arr", array_job_id="arr")

    def ListJobs(self, request: scheduler_pb2.ListJobsRequest) -> scheduler_pb2.ListJobsResponse:
        jobs = [
            scheduler_pb2.Job(job_id=f"arr-{i}", array_job_id="arr", array_index=i)
            for i in (2, 1, 0)
        ]
        for job in jobs[1:]:
            job.start_time.FromSeconds(1_800_000_000)
        return scheduler_pb2.ListJobsResponse(jobs=jobs)


class _ElementMetering:
    """Charges and refunds of ``arr-0`` and ``arr-1``; any other job id is not found."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def ListCharges(
        self, request: metering_pb2.ListChargesRequest
    ) -> metering_pb2.ListChargesResponse:
        self.asked.append(request.job_id)
        if request.job_id not in ("arr-0", "arr-1"):
            raise _NotFoundError(request.job_id)
        charge = metering_pb2.Charge(charge_id=f"c-{request.job_id}", job_id=request.job_id)
        return metering_pb2.ListChargesResponse(charges=[charge])

    def ListRefunds(
        self, request: metering_pb2.ListRefundsRequest
    ) -> metering_pb2.ListRefundsResponse:
        self.asked.append(request.job_id)
        if request.job_id not in ("arr-0", "arr-1"):
            raise _NotFoundError(request.job_id)
        refund = metering_pb2.RefundRecord(refund_id=f"r-{request.job_id}", job_id=request.job_id)
        return metering_pb2.ListRefundsResponse(refunds=[refund])


def _stubs(monkeypatch: pytest.MonkeyPatch) -> _ElementMetering:
    metering = _ElementMetering()

    @contextmanager
    def open_metering(args: object) -> Iterator[_ElementMetering]:
        yield metering

    @contextmanager
    def open_scheduler(args: object) -> Iterator[_ArrayScheduler]:
        yield _ArrayScheduler()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    monkeypatch.setattr(usage_arrays, "open_scheduler", open_scheduler)
    return metering


def test_charges_of_array_list_elements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    metering = _stubs(monkeypatch)
    argv = ["usage", "charges", "--job", "arr", "--format", "csv", "--data-dir", str(tmp_path)]
    code = main.main(argv)
    out, err = capsys.readouterr()
    assert code == _common.EXIT_OK
    assert metering.asked == ["arr", "arr-0", "arr-1"]
    assert "c-arr-0,arr-0" in out
    assert "c-arr-1,arr-1" in out
    assert "arr is a job array" in err


def test_refunds_of_array_list_elements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    metering = _stubs(monkeypatch)
    argv = ["usage", "refunds", "--job", "arr", "--format", "csv", "--data-dir", str(tmp_path)]
    code = main.main(argv)
    out, err = capsys.readouterr()
    assert code == _common.EXIT_OK
    assert metering.asked == ["arr", "arr-0", "arr-1"]
    assert "r-arr-0,arr-0" in out
    assert "r-arr-1,arr-1" in out
    assert "arr is a job array; listing the refunds of its 2 elements that started" in err
    assert "acsp jobs list --array arr lists every element" in err


def test_refunds_of_unknown_job_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    _stubs(monkeypatch)
    code = main.main(["usage", "refunds", "--job", "nope", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != _common.EXIT_OK
    assert "job 'nope' not found" in err
    assert "job array" not in err


def test_charges_of_unknown_job_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    _stubs(monkeypatch)
    code = main.main(["usage", "charges", "--job", "nope", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != _common.EXIT_OK
    assert "job 'nope' not found" in err


class _RateCardNotFoundError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "rate card version '999' not found"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _RateCardMetering:
    def GetRateCard(self, request: metering_pb2.GetRateCardRequest) -> metering_pb2.RateCard:
        if request.version == 0:
            return metering_pb2.RateCard(version=3)
        raise _RateCardNotFoundError()


@contextmanager
def _open_rate_card_metering(args: object) -> Iterator[_RateCardMetering]:
    yield _RateCardMetering()


def test_missing_rate_card_version_names_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(usage, "open_metering", _open_rate_card_metering)
    code = main.main(["usage", "rates", "--version", "999", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == _common.EXIT_FAILURE
    assert "rate card version '999' not found" in err
    assert "the current version is 3" in err
    assert "leave out --version" in err


class _UnavailableError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _DownScheduler:
    def GetJob(self, request: scheduler_pb2.GetJobRequest) -> scheduler_pb2.Job:
        raise _UnavailableError()


class _UnchargedMetering:
    """Job ``j-1`` is metered but has no charges yet; any other job id is not found."""

    def ListCharges(
        self, request: metering_pb2.ListChargesRequest
    ) -> metering_pb2.ListChargesResponse:
        if request.job_id != "j-1":
            raise _NotFoundError(request.job_id)
        return metering_pb2.ListChargesResponse()


@pytest.mark.parametrize(("job", "listed"), [("j-1", True), ("nope", False)])
def test_charges_with_scheduler_down(
    job: str,
    listed: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    @contextmanager
    def open_metering(args: object) -> Iterator[_UnchargedMetering]:
        yield _UnchargedMetering()

    @contextmanager
    def open_scheduler(args: object) -> Iterator[_DownScheduler]:
        yield _DownScheduler()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    monkeypatch.setattr(usage_arrays, "open_scheduler", open_scheduler)
    code = main.main(["usage", "charges", "--job", job, "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    if listed:
        # Metering answered for the job, so a scheduler that is down only costs the array check.
        assert code == _common.EXIT_OK
        assert "charges" in out
        assert f"could not check whether {job} is a job array" in err
        assert "connection refused" in err
    else:
        assert code != _common.EXIT_OK
        assert "connection refused" in err


def test_institution_filter_alone_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(usage, "open_metering", _open_denying_metering)
    window = ["--from", "2026-12-06", "--to", "2026-12-07"]
    argv = ["usage", "query", "--by", "institution", *window, "--institution", "uni-a"]
    code = main.main([*argv, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == _common.EXIT_FAILURE
    assert "a filter is required" not in err
    assert "permission denied" in err
    assert "--institution uni-a" in err
    assert "may filter by --project PROJECT or --grant GRANT" in err


class _EmptyMetering:
    def QueryUsage(self, request: object) -> metering_pb2.QueryUsageResponse:
        return metering_pb2.QueryUsageResponse()


class _Institutions:
    """The grant service with the one institution ``uni-a``."""

    def GetInstitution(self, request: grant_pb2.GetInstitutionRequest) -> grant_pb2.Institution:
        if request.institution_id != "uni-a":
            raise _NotFoundError(request.institution_id)
        return grant_pb2.Institution(institution_id="uni-a")


@pytest.mark.parametrize(("institution", "expected"), [("nope", 1), ("uni-a", 0)])
def test_unknown_institution_not_found(
    institution: str,
    expected: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    @contextmanager
    def open_metering(args: object) -> Iterator[_EmptyMetering]:
        yield _EmptyMetering()

    @contextmanager
    def open_grants(args: object) -> Iterator[_Institutions]:
        yield _Institutions()

    monkeypatch.setattr(usage, "open_metering", open_metering)
    monkeypatch.setattr(grants, "open_grants", open_grants)
    window = ["--from", "2026-12-06", "--to", "2026-12-07"]
    argv = ["usage", "query", "--by", "institution", *window, "--institution", institution]
    code = main.main([*argv, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == expected
    if expected:
        assert "--institution nope: institution not found" in err
