"""The ``acsp jobs`` and ``acsp fleet`` commands: argument parsing and rendering."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import status_pb2

from acsp.cli import fleet as fleet_cli
from acsp.cli import jobs as jobs_cli
from acsp.cli._common import STATUS_DETAILS_KEY, CommandError
from acsp.cli.fleet import list_providers, node_row, provider_rows
from acsp.cli.jobs import job_details, job_row_of, parse_millis, spec_from_args, watch_line
from acsp.cli.main import build_parser, main
from acsp.client import AsyncClient
from acsp.mesh.endpoints import MeshInfo
from acsp.v1 import common_pb2, scheduler_pb2
from scheduler.service.errors import InvalidFields
from scheduler.service.model import JobSpec
from scheduler.service.validation import MAX_TASKS, FieldViolation, validate_spec


def parse(*argv: str) -> object:
    return build_parser().parse_args(list(argv))


def test_submit_arguments_become_spec() -> None:
    args = parse(
        "jobs",
        "submit",
        "--project",
        "p1",
        "--tasks",
        "4",
        "--accelerators",
        "2",
        "--priority",
        "interactive",
        "--topology",
        "same-node",
        "--env",
        "A=1",
        "--wall-time",
        "90",
        "--",
        "python",
        "train.py",
        "--lr",
        "3e-4",
    )
    spec = spec_from_args(args)  # type: ignore[arg-type]
    assert spec.project_id == "p1"
    assert spec.task_count == 4
    assert spec.accelerator_millis_per_task == 2000
    assert spec.priority_class == common_pb2.PRIORITY_CLASS_INTERACTIVE
    assert spec.topology == scheduler_pb2.TOPOLOGY_SAME_NODE
    assert list(spec.command) == ["python", "train.py", "--lr", "3e-4"]
    assert dict(spec.environment) == {"A": "1"}
    assert spec.wall_time_seconds == 90
    assert spec.gang


@pytest.mark.parametrize(("text", "millis"), [("1", 1000), ("0.25", 250), ("8", 8000)])
def test_accelerators_option_in_millis(text: str, millis: int) -> None:
    assert parse_millis(text) == millis


@pytest.mark.parametrize("text", ["0", "-1", "abc", "0.0001", "0_5", "\u0665"])
def test_accelerators_option_rejects_bad_values(text: str) -> None:
    with pytest.raises(CommandError):
        parse_millis(text)


@pytest.mark.parametrize(("text", "shown"), [("1e3", "1000"), ("65", "65"), ("64.5", "64.5")])
def test_accelerators_above_maximum_in_option_units(text: str, shown: str) -> None:
    with pytest.raises(CommandError) as error:
        parse_millis(text)
    message = str(error.value)
    assert error.value.exit_code == 2
    assert f"--accelerators {shown} is more than the maximum of 64 per task" in message
    assert "millis" not in message


@pytest.mark.parametrize("text", ["1e999999", "1e99999999999999999"])
def test_accelerators_huge_exponent_is_usage_error(text: str) -> None:
    # 1000 times these overflows the default decimal context, and the plain digits of the
    # second would take 10**17 characters.
    with pytest.raises(CommandError) as error:
        parse_millis(text)
    assert error.value.exit_code == 2
    assert f"--accelerators {text} is more than the maximum of 64 per task" in str(error.value)


def test_accelerators_maximum_is_accepted() -> None:
    assert parse_millis("64") == 64_000


def test_submit_sub_allocation_reaches_spec() -> None:
    args = parse(
        "jobs",
        "submit",
        "--project",
        "p1",
        "--grant",
        "g1",
        "--sub-allocation",
        "sub-1",
        "--",
        "true",
    )
    spec = spec_from_args(args)  # type: ignore[arg-type]
    assert spec.grant_id == "g1"
    assert spec.sub_allocation_id == "sub-1"


@pytest.mark.parametrize(("flags", "allowed"), [([], False), (["--allow-cross-provider"], True)])
def test_submit_cross_provider_reaches_spec(flags: list[str], allowed: bool) -> None:
    args = parse("jobs", "submit", "--project", "p1", "--tasks", "2", *flags, "--", "true")
    spec = spec_from_args(args)  # type: ignore[arg-type]
    assert spec.allow_cross_provider is allowed


def test_submit_help_names_topology_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("jobs", "submit", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: same-provider" in text
    assert "(default: anywhere)" not in text
    assert "--allow-cross-provider" in text


def test_submit_no_gang_is_usage_error() -> None:
    args = parse("jobs", "submit", "--project", "p1", "--tasks", "4", "--no-gang", "--", "true")
    with pytest.raises(CommandError) as caught:
        spec_from_args(args)  # type: ignore[arg-type]
    assert caught.value.exit_code == 2
    assert "all tasks of a job start together" in str(caught.value)
    assert "--array" in str(caught.value)


def test_submit_no_gang_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No mesh runs in an empty data directory, so a call would exit 3. Exit 2 shows that the
    # command stopped before it connected.
    monkeypatch.setenv("ACSP_DATA_DIR", str(tmp_path))
    code = main(["jobs", "submit", "--project", "p1", "--no-gang", "--", "true"])
    assert code == 2
    assert "--no-gang is not supported" in capsys.readouterr().err


def test_submit_help_says_tasks_start_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("jobs", "submit", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "All tasks of a job start together or none of them do" in text
    assert "as a job array, with --array N" in text
    assert "--no-gang" not in text


def test_submit_without_command_is_usage_error() -> None:
    args = parse("jobs", "submit", "--project", "p1")
    with pytest.raises(CommandError) as caught:
        spec_from_args(args)  # type: ignore[arg-type]
    assert caught.value.exit_code == 2


def test_pending_row_shows_reason_code_and_message() -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        state=scheduler_pb2.JOB_STATE_PENDING,
        pending_reason=scheduler_pb2.PENDING_REASON_BUDGET,
        state_message="the grant cannot pay the hold",
        spec=scheduler_pb2.JobSpec(name="train", task_count=2, accelerator_millis_per_task=500),
    )
    row = job_row_of(job)
    assert row["state"] == "pending"
    assert row["reason"] == "budget: the grant cannot pay the hold"
    assert row["accelerators"] == "0.5"


def test_details_show_last_checkpoint() -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        spec=scheduler_pb2.JobSpec(checkpointable=True, checkpoint_reference="s3://c/0"),
        checkpoint_reference="s3://c/200",
    )
    job.checkpoint_time.FromSeconds(1_800_000_000)
    details = dict(job_details(job))
    assert details["checkpointable"] is True
    assert details["first checkpoint"] == "s3://c/0"
    assert details["last checkpoint"] == "s3://c/200"
    assert details["last checkpoint at"] == "2027-01-15T08:00:00+00:00"


def test_details_show_attempt_reason() -> None:
    job = scheduler_pb2.Job(job_id="j1", attempt=2, attempt_reason="node n1 stopped answering")

    assert dict(job_details(job))["attempt reason"] == "node n1 stopped answering"


def test_details_show_rendezvous_port() -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        rendezvous_port=29517,
        placements=[
            scheduler_pb2.TaskPlacement(task_index=1, provider_id="p", region_id="r", node_id="b"),
            scheduler_pb2.TaskPlacement(task_index=0, provider_id="p", region_id="r", node_id="a"),
        ],
    )
    pending = scheduler_pb2.Job(job_id="j2")

    assert dict(job_details(job))["rendezvous"] == "port 29517 on p/r/a, the node of task 0"
    assert dict(job_details(pending))["rendezvous"] == ""


def test_watch_line_counts_started_tasks() -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        state=scheduler_pb2.JOB_STATE_STARTING,
        placements=[
            scheduler_pb2.TaskPlacement(task_index=0, state="started"),
            scheduler_pb2.TaskPlacement(task_index=1, state="assigned"),
        ],
    )
    assert watch_line(job) == "j1  starting  1/2 tasks started"


@pytest.mark.parametrize(
    ("states", "progress"),
    [
        (("stopped", "assigned"), "1/2"),
        (("exited", "timed_out"), "2/2"),
        (("stopped", "stopped"), "2/2"),
        (("lost", "start_failed"), "1/2"),
        (("failed_hardware", "assigned"), "0/2"),
    ],
)
def test_watch_line_counts_ended_tasks(states: tuple[str, str], progress: str) -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        state=scheduler_pb2.JOB_STATE_STOPPING,
        placements=[
            scheduler_pb2.TaskPlacement(task_index=i, state=state) for i, state in enumerate(states)
        ],
    )
    assert watch_line(job) == f"j1  stopping  {progress} tasks started"


def test_watch_line_counts_all_once_job_started() -> None:
    job = scheduler_pb2.Job(
        job_id="j1",
        state=scheduler_pb2.JOB_STATE_FAILED,
        placements=[
            scheduler_pb2.TaskPlacement(task_index=0, state="exited", exit_code=1),
            scheduler_pb2.TaskPlacement(task_index=1, state="lost"),
        ],
    )
    job.start_time.FromSeconds(1_800_000_000)
    assert watch_line(job) == "j1  failed  2/2 tasks started"


def test_provider_rows_list_each_region() -> None:
    provider = scheduler_pb2.Provider(
        provider_id="alibaba",
        display_name="Alibaba",
        regions=[
            scheduler_pb2.Region(region_id="hz-a", display_name="Hangzhou A", jurisdiction="CN"),
            scheduler_pb2.Region(region_id="hz-b", display_name="Hangzhou B"),
        ],
        allow_cross_provider_gangs=True,
    )
    rows = provider_rows(provider)
    assert [row["region"] for row in rows] == ["hz-a", "hz-b"]
    assert [row["jurisdiction"] for row in rows] == ["CN", ""]
    assert rows[0]["cross-provider"] is True


def test_provider_without_regions_gets_one_row() -> None:
    rows = provider_rows(scheduler_pb2.Provider(provider_id="p", display_name="P"))
    assert len(rows) == 1
    assert rows[0]["region"] == ""
    assert rows[0]["cross-provider"] is False


def test_fleet_providers_command_parses() -> None:
    args = parse("fleet", "providers")
    assert args.func is list_providers  # type: ignore[attr-defined]


class FakeWatch:
    """A WatchJobs stream of fixed jobs that records its cancel."""

    def __init__(self, jobs: list[scheduler_pb2.Job]) -> None:
        self.jobs = jobs
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[scheduler_pb2.Job]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[scheduler_pb2.Job]:
        for job in self.jobs:
            yield job

    def cancel(self) -> None:
        self.cancelled = True


async def test_watch_of_one_job_stops_when_it_ends(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    states = [
        scheduler_pb2.JOB_STATE_PENDING,
        scheduler_pb2.JOB_STATE_RUNNING,
        scheduler_pb2.JOB_STATE_COMPLETED,
        scheduler_pb2.JOB_STATE_COMPLETED,
    ]
    stream = FakeWatch([scheduler_pb2.Job(job_id="j1", state=s) for s in states])
    client = SimpleNamespace(scheduler=SimpleNamespace(WatchJobs=lambda *a, **k: stream))

    @contextlib.asynccontextmanager
    async def fake_client(args: argparse.Namespace) -> AsyncIterator[SimpleNamespace]:
        yield client

    monkeypatch.setattr(jobs_cli, "async_client_from_args", fake_client)
    args = argparse.Namespace(job_id="j1", project="")

    code = await jobs_cli.watch_jobs(args)

    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [
        "j1  pending",
        "j1  running",
        "j1  completed",
    ]
    assert stream.cancelled


def _array_jobs(parent_state: int) -> list[scheduler_pb2.Job]:
    """An array ``arr`` of 3 elements, the last one failed, and its parent, elements first."""
    completed, failed = scheduler_pb2.JOB_STATE_COMPLETED, scheduler_pb2.JOB_STATE_FAILED
    elements = [
        scheduler_pb2.Job(job_id=f"arr-{i}", array_job_id="arr", array_index=i, state=state)
        for i, state in enumerate((completed, completed, failed))
    ]
    return [*elements, scheduler_pb2.Job(job_id="arr", array_job_id="arr", state=parent_state)]


class RecordingWatch(FakeWatch):
    """A watch stream that records how many jobs it has sent."""

    sent = 0

    async def _iterate(self) -> AsyncIterator[scheduler_pb2.Job]:
        for job in self.jobs:
            self.sent += 1
            yield job


def fake_array_scheduler(
    monkeypatch: pytest.MonkeyPatch, stream: RecordingWatch, ends_after: int = 0
) -> None:
    """Serve ``stream`` and the array of :func:`_array_jobs` to ``acsp jobs watch``.

    GetJob reports the parent running until the stream has sent ``ends_after`` jobs, and
    failed from then on.
    """
    ended = _array_jobs(scheduler_pb2.JOB_STATE_FAILED)

    async def get_job(request: scheduler_pb2.GetJobRequest) -> scheduler_pb2.Job:
        assert request.job_id == "arr"
        if stream.sent < ends_after:
            return scheduler_pb2.Job(
                job_id="arr", array_job_id="arr", state=scheduler_pb2.JOB_STATE_RUNNING
            )
        return ended[-1]

    async def list_jobs(request: scheduler_pb2.ListJobsRequest) -> scheduler_pb2.ListJobsResponse:
        assert request.array_job_id == "arr"
        # Newest first, as the scheduler lists them, and the parent among its elements.
        return scheduler_pb2.ListJobsResponse(jobs=list(reversed(ended)))

    scheduler = SimpleNamespace(
        WatchJobs=lambda *a, **k: stream, GetJob=get_job, ListJobs=list_jobs
    )

    @contextlib.asynccontextmanager
    async def fake_client(args: argparse.Namespace) -> AsyncIterator[SimpleNamespace]:
        yield SimpleNamespace(scheduler=scheduler)

    monkeypatch.setattr(jobs_cli, "async_client_from_args", fake_client)


@pytest.mark.parametrize("parent_first", [False, True])
async def test_watch_of_ended_array_prints_every_element(
    parent_first: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    initial = _array_jobs(scheduler_pb2.JOB_STATE_FAILED)
    if parent_first:
        initial = initial[-1:] + initial[:-1]
    fake_array_scheduler(monkeypatch, RecordingWatch(initial))
    args = argparse.Namespace(job_id="arr", project="")

    code = await jobs_cli.watch_jobs(args)

    assert code == 1
    lines = [line.split("  ")[1:3] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        ["arr-0", "completed"],
        ["arr-1", "completed"],
        ["arr-2", "failed"],
        ["arr", "failed"],
    ]


async def test_watch_of_live_array_prints_each_end_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    running = scheduler_pb2.JOB_STATE_RUNNING
    ended = _array_jobs(scheduler_pb2.JOB_STATE_FAILED)
    live = [
        scheduler_pb2.Job(job_id=f"arr-{i}", array_job_id="arr", array_index=i, state=running)
        for i in range(3)
    ]
    # The array ends with its last element, the last job that the stream sends.
    fake_array_scheduler(monkeypatch, RecordingWatch([*live, *ended[:3]]), ends_after=6)
    args = argparse.Namespace(job_id="arr", project="")

    assert await jobs_cli.watch_jobs(args) == 1

    lines = [line.split("  ")[1:3] for line in capsys.readouterr().out.splitlines()]
    assert lines[3:] == [
        ["arr-0", "completed"],
        ["arr-1", "completed"],
        ["arr-2", "failed"],
        ["arr", "failed"],
    ]


def fake_scheduler(monkeypatch: pytest.MonkeyPatch, stream: FakeWatch) -> None:
    client = SimpleNamespace(scheduler=SimpleNamespace(WatchJobs=lambda *a, **k: stream))

    @contextlib.asynccontextmanager
    async def fake_client(args: argparse.Namespace) -> AsyncIterator[SimpleNamespace]:
        yield client

    monkeypatch.setattr(jobs_cli, "async_client_from_args", fake_client)


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (scheduler_pb2.JOB_STATE_COMPLETED, 0),
        (scheduler_pb2.JOB_STATE_FAILED, 1),
        (scheduler_pb2.JOB_STATE_CANCELLED, 1),
        (scheduler_pb2.JOB_STATE_TIMED_OUT, 1),
    ],
)
async def test_watch_exit_status_by_end_state(
    monkeypatch: pytest.MonkeyPatch, state: scheduler_pb2.JobState, code: int
) -> None:
    jobs = [
        scheduler_pb2.Job(job_id="j1", state=s) for s in (scheduler_pb2.JOB_STATE_RUNNING, state)
    ]
    fake_scheduler(monkeypatch, FakeWatch(jobs))
    args = argparse.Namespace(job_id="j1", project="")

    assert await jobs_cli.watch_jobs(args) == code


async def test_watch_stream_closed_early_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    job = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_RUNNING)
    fake_scheduler(monkeypatch, FakeWatch([job]))
    args = argparse.Namespace(job_id="j1", project="")

    with pytest.raises(CommandError) as caught:
        await jobs_cli.watch_jobs(args)
    assert caught.value.exit_code == 1
    assert "before job j1 ended" in str(caught.value)


async def test_watch_of_all_jobs_exits_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    job = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_FAILED)
    fake_scheduler(monkeypatch, FakeWatch([job]))
    args = argparse.Namespace(job_id="", project="")

    assert await jobs_cli.watch_jobs(args) == 0


def test_watch_help_states_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("jobs", "watch", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "exit 0 only if it completed" in text
    assert "Exit 1 if it failed, was cancelled or timed out" in text


async def test_watch_prints_each_change_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_PENDING)
    with_hold = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_PENDING, hold_id="h1")
    other = scheduler_pb2.Job(job_id="j2", state=scheduler_pb2.JOB_STATE_PENDING)
    running = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_RUNNING)
    fake_scheduler(monkeypatch, FakeWatch([pending, pending, with_hold, other, running, running]))
    args = argparse.Namespace(job_id="", project="")
    before = datetime.now(UTC).replace(microsecond=0)

    await jobs_cli.watch_jobs(args)

    after = datetime.now(UTC)
    lines = capsys.readouterr().out.splitlines()
    stamps = [datetime.fromisoformat(line.split("  ", 1)[0]) for line in lines]
    assert [line.split("  ", 1)[1] for line in lines] == [
        "j1  pending",
        "j2  pending",
        "j1  running",
    ]
    assert all(stamp.utcoffset() == timedelta(0) for stamp in stamps)
    assert all(before <= stamp <= after for stamp in stamps)


class _RejectedSubmit(grpc.RpcError):
    """The error SubmitJob returns for invalid fields, with their ``BadRequest`` details."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        error = InvalidFields(violations)
        status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
        status.details.extend(error.details())
        self._message = error.message
        self._trailers = ((STATUS_DETAILS_KEY, status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def test_submit_error_names_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    violations = [
        FieldViolation("spec.accelerator_millis_per_task", "is 1000000000; use at most 64000"),
        FieldViolation("spec.accelerators.models[1]", "'NOPE' is not in the accelerator catalog"),
        FieldViolation("spec.environment['']", "is not a valid environment variable name"),
    ]

    class Scheduler:
        def SubmitJob(self, request: object) -> None:
            raise _RejectedSubmit(violations)

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    code = main(["jobs", "submit", "--project", "p1", "--accelerators", "2", "--", "true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "spec.accelerator_millis_per_task is set by --accelerators, in thousandths" in err
    assert "spec.accelerators.models[1] is set by --model" in err
    assert "spec.environment[''] is set by --env" in err
    assert "Traceback" not in err


def test_submit_unknown_region_shows_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    violations = validate_spec(
        JobSpec(name="ok", project_id="p1", command=("true",), allowed_regions=("nope/x",)),
        regions={"cloud-a/west"},
    )

    class Scheduler:
        def SubmitJob(self, request: object) -> None:
            raise _RejectedSubmit(violations)

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    code = main(["jobs", "submit", "--project", "p1", "--region", "nope/x", "--", "true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "spec.allowed_regions[0] is set by --region" in err
    assert "no provider offers region 'nope/x'" in err
    assert "cloud-a/west" in err
    assert "acsp fleet providers" in err


def test_submit_quiet_prints_only_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def SubmitJob(self, request: object) -> scheduler_pb2.SubmitJobResponse:
            job = scheduler_pb2.Job(job_id="j-array", state=scheduler_pb2.JOB_STATE_PENDING)
            return scheduler_pb2.SubmitJobResponse(job=job, array_job_ids=["j-1", "j-2"])

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    code = main(["jobs", "submit", "-q", "--project", "p1", "--array", "2", "--", "true"])

    assert code == 0
    assert capsys.readouterr().out == "j-array\n"


def test_list_notes_jobs_past_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def ListJobs(self, request: scheduler_pb2.ListJobsRequest) -> object:
            jobs = [scheduler_pb2.Job(job_id=f"j{i}") for i in range(request.page.page_size)]
            return scheduler_pb2.ListJobsResponse(
                jobs=jobs, page=common_pb2.PageResponse(next_page_token="more")
            )

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    code = main(["jobs", "list", "--limit", "2", "--format", "csv"])
    captured = capsys.readouterr()
    assert code == 0
    assert [line.split(",")[0] for line in captured.out.splitlines()] == ["job", "j0", "j1"]
    assert "more rows may exist than the 2 shown" in captured.err
    assert "--limit above 2" in captured.err


def test_node_row_heartbeat_in_utc() -> None:
    node = scheduler_pb2.Node(provider_id="p", region_id="r", node_id="n")
    assert node_row(node)["last heartbeat"] == ""
    node.last_heartbeat_time.FromDatetime(datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC))
    # Every other time the CLI prints carries its offset, so this one does too.
    assert node_row(node)["last heartbeat"] == "2026-03-01T12:30:05+00:00"


def test_details_tell_array_parent_from_element() -> None:
    parent = scheduler_pb2.Job(job_id="j1", array_job_id="j1", array_index=0)
    element = scheduler_pb2.Job(job_id="j1-0", array_job_id="j1", array_index=0)
    single = scheduler_pb2.Job(job_id="j2")
    assert dict(job_details(parent))["array"] == (
        "the whole array; list its jobs with acsp jobs list --array j1"
    )
    assert dict(job_details(element))["array"] == "j1[0]"
    assert dict(job_details(single))["array"] == ""


def test_submit_array_zero_is_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The scheduler reads array_size 0 as "no array", so the CLI must reject it itself.
    monkeypatch.setenv("ACSP_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "submit", "--project", "p1", "--array", "0", "--", "true"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "argument --array: 0 is not a valid array size" in err
    assert "leave out --array to submit a single job" in err


def test_submit_without_array_sends_size_zero() -> None:
    spec = spec_from_args(parse("jobs", "submit", "--project", "p1", "--", "true"))  # type: ignore[arg-type]
    assert spec.array_size == 0
    spec = spec_from_args(
        parse("jobs", "submit", "--project", "p1", "--array", "3", "--", "true")  # type: ignore[arg-type]
    )
    assert spec.array_size == 3


def _write_mesh_file(data_dir: Path, scheduler_endpoint: str) -> None:
    ca_cert = data_dir / "ca.pem"
    ca_cert.write_text("not read by the fake client\n")
    endpoints = {"grant": "127.0.0.1:1", "scheduler": scheduler_endpoint, "metering": "127.0.0.1:1"}
    MeshInfo(
        data_dir=data_dir,
        endpoints=endpoints,
        ca_cert=ca_cert,
        token_key=data_dir / "signing.key",
        database_url="postgresql://unused",
        nats_url="nats://unused",
        supervisor_pid=os.getpid(),
    ).write()


async def test_watch_resume_reads_mesh_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first stream fails as it would when its mesh stopped. A new `acsp up` has written a
    # mesh file with other ports meanwhile, so the resume must read it again.
    _write_mesh_file(tmp_path, "127.0.0.1:1111")
    opened: list[str] = []

    first_calls: list[int] = []

    def first_stream() -> AsyncIterator[scheduler_pb2.Job]:
        first_calls.append(1)
        if len(first_calls) > 1:
            # The old mesh is gone: a stream there would never deliver the end.
            return aiter(FakeWatch([]))

        async def fail() -> AsyncIterator[scheduler_pb2.Job]:
            yield scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_RUNNING)
            _write_mesh_file(tmp_path, "127.0.0.1:2222")
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "gone")

        return fail()

    completed = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_COMPLETED)
    streams = {"127.0.0.1:1111": first_stream, "127.0.0.1:2222": lambda: FakeWatch([completed])}

    def fake_init(self: AsyncClient, endpoints: dict[str, str], *args: object, **kw: object):
        endpoint = endpoints["scheduler"]
        opened.append(endpoint)
        self._channels = {}
        self.scheduler = SimpleNamespace(WatchJobs=lambda *a, **k: streams[endpoint]())

    monkeypatch.setattr(AsyncClient, "__init__", fake_init)

    async def no_wait(delay_s: float) -> None:
        return None

    monkeypatch.setattr(jobs_cli.asyncio, "sleep", no_wait)
    args = parse("jobs", "watch", "j1", "--data-dir", str(tmp_path))

    code = await asyncio.wait_for(jobs_cli.watch_jobs(args), 10)  # type: ignore[arg-type]

    assert code == 0
    assert opened == ["127.0.0.1:1111", "127.0.0.1:2222"]
    captured = capsys.readouterr()
    assert "watch interrupted: gone" in captured.err
    assert [line.split("  ", 1)[1] for line in captured.out.splitlines()] == [
        "j1  running",
        "j1  completed",
    ]


async def test_watch_resume_waits_for_missing_mesh_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_mesh_file(tmp_path, "127.0.0.1:1111")
    mesh_file = tmp_path / "mesh.json"
    completed = scheduler_pb2.Job(job_id="j1", state=scheduler_pb2.JOB_STATE_COMPLETED)

    def first_stream() -> AsyncIterator[scheduler_pb2.Job]:
        async def fail() -> AsyncIterator[scheduler_pb2.Job]:
            mesh_file.unlink(missing_ok=True)
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "gone")
            yield completed

        return fail()

    def fake_init(self: AsyncClient, endpoints: dict[str, str], *args: object, **kw: object):
        stream = first_stream if endpoints["scheduler"] == "127.0.0.1:1111" else None
        self._channels = {}
        self.scheduler = SimpleNamespace(
            WatchJobs=lambda *a, **k: stream() if stream else FakeWatch([completed])
        )

    monkeypatch.setattr(AsyncClient, "__init__", fake_init)
    sleeps: list[float] = []

    async def restart_mesh_during_wait(delay_s: float) -> None:
        sleeps.append(delay_s)
        if len(sleeps) == 2:
            _write_mesh_file(tmp_path, "127.0.0.1:2222")

    monkeypatch.setattr(jobs_cli.asyncio, "sleep", restart_mesh_during_wait)
    args = parse("jobs", "watch", "j1", "--data-dir", str(tmp_path))

    code = await asyncio.wait_for(jobs_cli.watch_jobs(args), 10)  # type: ignore[arg-type]

    assert code == 0
    assert len(sleeps) == 2
    assert "no running mesh found" in capsys.readouterr().err


@pytest.mark.parametrize("after", ["", " ", "j1,,j2", "j1,"])
def test_submit_empty_after_id_is_usage_error(after: str) -> None:
    args = parse("jobs", "submit", "--project", "p1", "--after", after, "--", "true")
    with pytest.raises(CommandError) as error:
        spec_from_args(args)  # type: ignore[arg-type]
    assert error.value.exit_code == 2
    assert "--after" in str(error.value)
    assert "empty job id" in str(error.value)
    assert "leave out --after" in str(error.value)


def test_submit_after_ids_lose_spaces() -> None:
    args = parse(
        "jobs", "submit", "--project", "p1", "--after", " j1 , j2", "--after", "j3 ", "--", "true"
    )
    spec = spec_from_args(args)  # type: ignore[arg-type]
    assert list(spec.after_job_ids) == ["j1", "j2", "j3"]


def test_submit_env_without_equals_shows_fix() -> None:
    args = parse("jobs", "submit", "--project", "p1", "--env", "NOEQUALS", "--", "true")
    with pytest.raises(CommandError) as error:
        spec_from_args(args)  # type: ignore[arg-type]
    assert error.value.exit_code == 2
    assert "--env 'NOEQUALS' is not KEY=VALUE" in str(error.value)
    assert "e.g. --env OMP_NUM_THREADS=8" in str(error.value)


@pytest.mark.parametrize("item", ["=x", " =x", "="])
def test_submit_env_without_name_shows_fix(item: str) -> None:
    args = parse("jobs", "submit", "--project", "p1", "--env", item, "--", "true")
    with pytest.raises(CommandError) as error:
        spec_from_args(args)  # type: ignore[arg-type]
    assert error.value.exit_code == 2
    assert f"--env {item!r} has no variable name before =" in str(error.value)
    assert "e.g. --env OMP_NUM_THREADS=8" in str(error.value)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--array", "-2", "give a whole number from 1 to 10000"),
        ("--array", "10001", "give a whole number from 1 to 10000"),
        ("--wall-time", "5184001", "give a whole number from 1 to 5184000"),
        ("--wall-time", "0", "give a whole number from 1 to 5184000"),
        ("--tasks", "4097", "give a whole number from 1 to 4096"),
    ],
)
def test_submit_limits_match_scheduler(
    option: str, value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("jobs", "submit", "--project", "p1", option, value, "--", "true")
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"argument {option}: " in err
    assert expected in err


def test_submit_accepts_largest_limits() -> None:
    args = parse(
        "jobs",
        "submit",
        "--project",
        "p1",
        "--array",
        "10000",
        "--wall-time",
        "5184000",
        "--tasks",
        "4096",
        "--",
        "true",
    )
    spec = spec_from_args(args)  # type: ignore[arg-type]
    assert spec.array_size == 10000
    assert spec.wall_time_seconds == 5184000
    assert spec.task_count == 4096


def test_negative_task_index_names_no_wire_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("jobs", "logs", "j1", "--task", "-1")
    err = capsys.readouterr().err
    assert f"give a whole number from 0 to {MAX_TASKS - 1}" in err
    assert "4294967295" not in err


def test_node_row_counts_failed_accelerators() -> None:
    node = scheduler_pb2.Node(
        provider_id="p",
        region_id="r",
        node_id="n",
        accelerators=[
            scheduler_pb2.Accelerator(accelerator_id="a0"),
            scheduler_pb2.Accelerator(
                accelerator_id="a1", health=scheduler_pb2.HEALTH_STATE_FAILED
            ),
        ],
    )
    row = node_row(node)
    assert row["healthy"] == 1
    assert row["failed"] == 1
    assert row["failures"] == "a1"
    assert node_row(scheduler_pb2.Node())["failed"] == 0


def test_details_checkpointable_is_bool() -> None:
    job = scheduler_pb2.Job(job_id="j1", spec=scheduler_pb2.JobSpec(checkpointable=True))
    assert dict(job_details(job))["checkpointable"] is True
    assert dict(job_details(scheduler_pb2.Job()))["checkpointable"] is False


def _queue_summary() -> scheduler_pb2.GetQueueSummaryResponse:
    return scheduler_pb2.GetQueueSummaryResponse(
        jobs_by_state={"pending": 2},
        pending_by_reason={"no_capacity": 2},
        used_millis_by_region={"p/r": 250},
        total_millis_by_region={"p/r": 19000},
        usable_millis_by_region={"p/r": 4000},
        recalled_millis_by_region={"p/r": 4000},
        above_cap_millis_by_region={"p/r": 3000},
        unknown_millis_by_region={"p/r": 6000},
        out_of_service_millis_by_region={"p/r": 2000},
    )


@pytest.mark.parametrize("output_format", ["json", "csv", "table"])
def test_queue_rows_name_their_table(
    output_format: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def GetQueueSummary(self, request: object) -> scheduler_pb2.GetQueueSummaryResponse:
            return _queue_summary()

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(fleet_cli, "open_scheduler", open_scheduler)
    code = main(["fleet", "queue", "--format", output_format])
    out = capsys.readouterr().out
    assert code == 0
    if output_format == "json":
        rows = [json.loads(line) for line in out.splitlines()]
        assert [row["table"] for row in rows] == ["states", "pending", "accelerators"]
        assert rows[0]["jobs"] == 2
        assert rows[1]["reason"] == "no_capacity"
        assert rows[2]["used"] == 0.25
        assert rows[2]["usable"] == 4
        assert rows[2]["recalled"] == 4
        assert rows[2]["above_cap"] == 3
        assert rows[2]["unknown"] == 6
        assert rows[2]["out_of_service"] == 2
        assert rows[2]["total"] == 19
        split = ("usable", "recalled", "above_cap", "unknown", "out_of_service")
        assert sum(rows[2][column] for column in split) == rows[2]["total"]
    elif output_format == "csv":
        lines = out.splitlines()
        header = (
            "table,state,reason,region,jobs,used,usable,recalled,above cap,unknown,"
            "out of service,total"
        )
        assert lines[0] == header
        assert lines[3] == "accelerators,,,p/r,,0.25,4,4,3,6,2,19"
    else:
        assert "jobs by state" in out
        assert "table" not in out
        row = next(line for line in out.splitlines() if "p/r" in line).replace("│", " ").split()
        assert row == ["p/r", "0.25", "4", "4", "3", "6", "2", "19"]
        columns = ("used", "usable", "recalled", "above cap", "unknown", "out of service", "total")
        for column in columns:
            assert column in out


def test_queue_from_older_scheduler_leaves_split_empty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def GetQueueSummary(self, request: object) -> scheduler_pb2.GetQueueSummaryResponse:
            return scheduler_pb2.GetQueueSummaryResponse(
                used_millis_by_region={"p/r": 1000}, total_millis_by_region={"p/r": 8000}
            )

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(fleet_cli, "open_scheduler", open_scheduler)
    assert main(["fleet", "queue", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "accelerators,,,p/r,,1,,,,,,8"


def test_queue_without_above_cap_count(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def GetQueueSummary(self, request: object) -> scheduler_pb2.GetQueueSummaryResponse:
            summary = _queue_summary()
            summary.ClearField("above_cap_millis_by_region")
            return summary

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(fleet_cli, "open_scheduler", open_scheduler)
    assert main(["fleet", "queue", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[2])
    assert row["above_cap"] is None
    assert row["usable"] == 4


@pytest.mark.parametrize(
    ("state", "noted"),
    [
        (scheduler_pb2.JOB_STATE_FAILED, True),
        (scheduler_pb2.JOB_STATE_COMPLETED, True),
        (scheduler_pb2.JOB_STATE_CANCELLED, False),
        (scheduler_pb2.JOB_STATE_RUNNING, False),
    ],
)
def test_cancel_of_ended_job_notes_it(
    state: int, noted: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def GetJob(self, request: scheduler_pb2.GetJobRequest) -> scheduler_pb2.Job:
            return scheduler_pb2.Job(job_id=request.job_id, state=state)  # type: ignore[arg-type]

        def CancelJob(self, request: scheduler_pb2.CancelJobRequest) -> scheduler_pb2.Job:
            return scheduler_pb2.Job(job_id=request.job_id, state=state)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    code = main(["jobs", "cancel", "j1", "--format", "csv"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.splitlines()[1].startswith("j1,")
    if noted:
        name = scheduler_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]
        assert f"note: job j1 had already ended ({name})" in captured.err
        assert "nothing was cancelled" in captured.err
    else:
        assert captured.err == ""


@pytest.mark.parametrize(
    ("before", "noted"),
    [
        (scheduler_pb2.JOB_STATE_COMPLETED, True),
        (scheduler_pb2.JOB_STATE_CANCELLED, True),
        (scheduler_pb2.JOB_STATE_RUNNING, False),
    ],
)
def test_cancel_of_ended_array_notes_it(
    before: int, noted: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Scheduler:
        def __init__(self) -> None:
            self.state = before

        def GetJob(self, request: scheduler_pb2.GetJobRequest) -> scheduler_pb2.Job:
            return scheduler_pb2.Job(job_id="a1", array_job_id="a1", state=self.state)  # type: ignore[arg-type]

        def CancelJob(self, request: scheduler_pb2.CancelJobRequest) -> scheduler_pb2.Job:
            if self.state not in jobs_cli.ENDED_STATES:
                self.state = scheduler_pb2.JOB_STATE_CANCELLED
            return scheduler_pb2.Job(job_id="a1", array_job_id="a1", state=self.state)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[Scheduler]:
        yield Scheduler()

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    assert main(["jobs", "cancel", "a1"]) == 0
    err = capsys.readouterr().err
    if noted:
        name = scheduler_pb2.JobState.Name(before).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]
        assert f"every element of job array a1 had already ended (array state {name})" in err
        assert "nothing was cancelled" in err
    else:
        assert err == ""
