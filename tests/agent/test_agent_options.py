"""Command-line options of the agent are checked like the environment variables they override."""

from __future__ import annotations

import argparse
import errno
import tempfile
from pathlib import Path

import pynvml
import pytest

from acsp.cli.main import main as acsp_main
from agents.main import add_arguments, settings_from
from agents.main import main as agent_main
from services.runtime.settings import SettingsError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speed", "0"], r"^--speed \(ACSP_AGENT_SPEED\): 0.0 is below the minimum"),
        (["--heartbeat-s", "0"], r"^--heartbeat-s \(ACSP_AGENT_HEARTBEAT_S\): .* minimum"),
        (["--usage-s", "-1"], r"^--usage-s \(ACSP_AGENT_USAGE_S\): .* minimum"),
        (["--read-s", "0"], r"^--read-s \(ACSP_AGENT_READ_S\): .* minimum"),
        (["--nats-url", "http://127.0.0.1:1"], r"^--nats-url \(ACSP_NATS_URL\): .*nats://"),
        (["--nats-url", "nats://127.0.0.1:port"], r"^--nats-url .*port that is not a number"),
        (["--nats-url", "nats://127.0.0.1:70000"], r"^--nats-url .*port that is not a number"),
        (
            ["--provider", "a.b"],
            r"^--provider \(ACSP_AGENT_PROVIDER\): 'a.b' is not a subject token",
        ),
    ],
)
def test_bad_option_rejected(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.delenv("ACSP_NATS_URL", raising=False)
    with pytest.raises(SettingsError, match=message):
        settings_from(_parse(*argv))


def test_options_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACSP_AGENT_SPEED", "2")
    monkeypatch.setenv("ACSP_NATS_URL", "nats://127.0.0.1:1")
    settings = settings_from(
        _parse("--speed", "30", "--nats-url", "tls://127.0.0.1:2", "--state-dir", str(tmp_path))
    )
    assert settings.speed == 30.0
    assert settings.nats_url == "tls://127.0.0.1:2"
    assert settings.agent_state_dir == tmp_path


@pytest.mark.parametrize("count", ["0", "-3", "many"])
def test_node_count_below_one_rejected(capsys: pytest.CaptureFixture[str], count: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse("--nodes", count)
    assert exit_info.value.code == 2
    assert "argument --nodes" in capsys.readouterr().err


def test_cli_run_reports_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    status = acsp_main(["agent", "run", "--backend", "simulated", "--speed", "0"])
    assert status == 2
    error = capsys.readouterr().err
    assert "--speed (ACSP_AGENT_SPEED): 0.0 is below the minimum" in error
    assert "Traceback" not in error


def test_state_dir_that_is_a_file_rejected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "state"
    path.write_text("")
    argv = ["--backend", "simulated", "--faults", "none", "--utilization", "none"]
    status = agent_main([*argv, "--state-dir", str(path)])
    assert status == 2
    error = capsys.readouterr().err
    assert f"ACSP_AGENT_STATE_DIR: {path} is not a folder" in error


def test_damaged_state_file_stops_agent(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"version": 1, "nod')
    argv = ["--backend", "simulated", "--faults", "none", "--utilization", "none"]
    status = agent_main([*argv, "--state-dir", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err
    assert f"agent: state file {tmp_path / 'state.json'}: damaged (invalid JSON" in error
    assert "Traceback" not in error


def test_cli_health_reports_damaged_state(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "state.json").write_text("[]")
    status = acsp_main(["agent", "health", "--state-dir", str(tmp_path)])
    assert status == 1
    assert "damaged (not a JSON object)" in capsys.readouterr().err


def test_cli_run_reports_nvml_failure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    argv = ["agent", "run", "--backend", "nvml", "--nats-url", "nats://127.0.0.1:1"]
    status = acsp_main([*argv, "--state-dir", str(tmp_path)])
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("error: NVML initialisation failed")
    assert "--backend simulated" in error
    assert "Traceback" not in error


def test_unwritable_state_dir_rejected(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def denied(**_options: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    argv = ["--backend", "simulated", "--faults", "none", "--utilization", "none"]
    status = agent_main([*argv, "--state-dir", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err
    assert f"no file can be created in folder {tmp_path}: Permission denied" in error
    assert "fix: give the agent's user write and search access" in error
