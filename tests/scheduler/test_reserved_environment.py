"""A job may not set the environment variables that acsp sets for its tasks."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from acsp._channel import Credentials
from acsp.cli import jobs as jobs_cli
from acsp.cli.main import main
from acsp.client import Client
from acsp.task_environment import RESERVED_VARIABLES
from scheduler.service.model import JobSpec
from scheduler.service.validation import validate_spec
from services.runtime.auth import Role

from .harness import Stack, fund_grant


def test_each_reserved_variable_is_rejected() -> None:
    for name in RESERVED_VARIABLES:
        spec = JobSpec(name="ok", project_id="p1", command=("true",), env=((name, "x"),))
        (violation,) = validate_spec(spec)
        assert violation.field == f"spec.environment[{name!r}]"
        assert violation.reason.startswith("is reserved, because acsp sets it to ")
        assert "leave it out, or pass the value under another name" in violation.reason


def test_other_acsp_variables_are_accepted() -> None:
    # A job's own settings for played tasks, which the agent reads and does not set.
    spec = JobSpec(
        name="ok",
        project_id="p1",
        command=("true",),
        env=(("ACSP_SIMULATED_CHECKPOINT_S", "60"), ("OMP_NUM_THREADS", "8")),
    )
    assert validate_spec(spec) == []


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


@pytest.mark.timeout(240)
async def test_submit_with_reserved_variable_exits_2(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    token = stack.token(pi, Role.PI)

    @contextlib.contextmanager
    def open_scheduler(args: object) -> Iterator[object]:
        endpoints = {"grant": address, "scheduler": address, "metering": address}
        with Client(endpoints, Credentials(token=token), wait_for_ready=False) as client:
            yield client.scheduler

    monkeypatch.setattr(jobs_cli, "open_scheduler", open_scheduler)
    submit = ["jobs", "submit", "--project", project, "--grant", grant]
    code = main([*submit, "--env", "ACSP_JOB_ID=mine", "--env", "A=1", "--", "true"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "INVALID_ARGUMENT" in captured.err
    assert "spec.environment['ACSP_JOB_ID'] is reserved" in captured.err
    assert "acsp sets it to the job's id" in captured.err
    assert "pass the value under another name" in captured.err
    assert "spec.environment['ACSP_JOB_ID'] is set by --env" in captured.err

    # The same job without the reserved variable is accepted.
    assert main([*submit, "-q", "--env", "A=1", "--", "true"]) == 0
    assert capsys.readouterr().out.strip()
