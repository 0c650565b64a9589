"""Service messages as the ``acsp`` command prints them: CLI commands and options in place of
RPC names and request fields."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from acsp.cli import _common, grants, jobs
from acsp.cli.main import main
from acsp.v1 import grant_pb2, scheduler_pb2
from scheduler.engine.catalog import Catalog
from scheduler.service.pledges import pledge_from_proto


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(
    ("details", "rpc_term", "cli_term"),
    [
        (
            "pledge_id: 'pl-nope' not found; leave pledge_id empty to create a pledge, or "
            "pass an id that ListPledges returns",
            "ListPledges",
            "acsp fleet pledge list",
        ),
        (
            "job array 'jnope' not found; pass the id that SubmitJob returned for the array",
            "SubmitJob",
            "acsp jobs submit",
        ),
        (
            "job_id: a1 is a job array, whose tasks belong to its elements; pass the id of one "
            "element (array_job_ids of SubmitJob)",
            "array_job_ids",
            "acsp jobs list --array",
        ),
        (
            "decision.awarded_pf_days: is set for award; leave the amount out, or use the "
            "outcome award_less to grant less than requested",
            "award_less",
            "--outcome award-less",
        ),
    ],
)
def test_rpc_terms_become_commands(details: str, rpc_term: str, cli_term: str) -> None:
    text = _common.describe_rpc_error(_Error(grpc.StatusCode.INVALID_ARGUMENT, details))
    assert rpc_term not in text
    assert cli_term in text


def test_fields_in_message_name_options() -> None:
    details = (
        "spec.wall_time_seconds: the job's hold is more than the sub-allocation was ever "
        "credited; lower spec.wall_time_seconds, spec.task_count or "
        "spec.accelerator_millis_per_task, or set spec.sub_allocation_id for a larger "
        "sub-allocation."
    )
    with pytest.raises(_common.CommandError) as caught:
        with _common.naming_options(jobs.SUBMIT_OPTIONS):
            raise _Error(grpc.StatusCode.FAILED_PRECONDITION, details)
    message = str(caught.value)
    assert "spec.task_count is set by --tasks" in message
    assert "spec.accelerator_millis_per_task is set by --accelerators" in message
    assert "spec.sub_allocation_id is set by --sub-allocation" in message
    assert "spec.wall_time_seconds is set by --wall-time" in message
    assert message.count("spec.wall_time_seconds is set by") == 1
    assert "spec.grant_id is set by" not in message


def test_sub_allocation_without_grant_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No mesh runs in an empty data directory, so a call would exit 3. Exit 2 shows that the
    # command stopped before it connected.
    argv = ["jobs", "submit", "--project", "p1", "--sub-allocation", "sub-1", "--", "true"]
    code = main([*argv, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == _common.EXIT_USAGE
    assert "--sub-allocation sub-1 needs --grant" in err


def test_submit_help_says_grant_needed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "submit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required with --sub-allocation" in text


@pytest.mark.parametrize(("grant_id", "hinted"), [("sub-0123abcd", True), ("grant-nope", False)])
def test_grants_show_hints_sub_allocation(
    grant_id: str,
    hinted: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Grants:
        def GetGrant(self, request: grant_pb2.GetGrantRequest) -> grant_pb2.Grant:
            raise _Error(grpc.StatusCode.NOT_FOUND, f"grant {request.grant_id!r} not found")

    @contextmanager
    def open_grants(args: object) -> Iterator[Grants]:
        yield Grants()

    monkeypatch.setattr(grants, "open_grants", open_grants)
    code = main(["grants", "show", grant_id, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == _common.EXIT_FAILURE
    assert "not found" in err
    if hinted:
        assert f"acsp grants balance GRANT_ID --sub-allocation {grant_id}" in err
    else:
        assert "sub-allocation id" not in err


def test_pledge_model_error_lists_catalog() -> None:
    pledge = scheduler_pb2.Pledge(provider_id="eu", region_id="r1", model="Z9")
    _, violations = pledge_from_proto(pledge)
    (problem,) = [v for v in violations if v.field == "pledge.model"]
    assert "'Z9' is not in the catalog; use one of" in problem.reason
    for name in Catalog().names():
        assert name in problem.reason


def test_each_option_named_once() -> None:
    # The status details name a list entry and the message names the list: one option.
    field = "spec.accelerators.models[0]"
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description="unknown")
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=3, details=[packed]).SerializeToString()

    class _Rejected(_Error):
        def trailing_metadata(self) -> tuple[tuple[str, bytes]]:  # type: ignore[override]
            return ((_common.STATUS_DETAILS_KEY, status),)

    details = f"{field}: 'x y' is not a catalog model name; list names in spec.accelerators.models"
    with pytest.raises(_common.CommandError) as caught:
        with _common.naming_options(jobs.SUBMIT_OPTIONS):
            raise _Rejected(grpc.StatusCode.INVALID_ARGUMENT, details)
    message = str(caught.value)
    assert message.count("--model") == 1, message
    assert f"{field} is set by --model" in message
