"""``acsp agent`` subcommands that read the agent's state on the node."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from acsp.cli.main import main
from agents.state import StateStore
from agents.state_lock import StateFolderLock

KEY = "acme.eu-1.node-1"


def write_state(directory: Path) -> None:
    state = StateStore(directory / "state.json")
    state.set_health(KEY, {"GPU-a": ["xid:79", "row_remap_failure"], "GPU-b": ["xid:79"]})


def test_health_lists_persistent_conditions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path)
    assert main(["agent", "health", "--state-dir", str(tmp_path), "--format", "json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["uuid"], r["cause"]) for r in rows} == {
        ("GPU-a", "xid:79"),
        ("GPU-a", "row_remap_failure"),
        ("GPU-b", "xid:79"),
    }


def test_clear_health_removes_one_cause(tmp_path: Path) -> None:
    write_state(tmp_path)
    argv = ["agent", "clear-health", "GPU-a", "--cause", "xid:79", "--state-dir", str(tmp_path)]
    assert main(argv) == 0
    health = StateStore(tmp_path / "state.json").node(KEY).health
    assert health == {"GPU-a": ["row_remap_failure"], "GPU-b": ["xid:79"]}


def test_clear_health_refuses_while_agent_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path)
    lock = StateFolderLock.acquire(tmp_path)
    try:
        assert main(["agent", "clear-health", "GPU-b", "--state-dir", str(tmp_path)]) == 1
    finally:
        lock.release()
    error = capsys.readouterr().err
    assert f"in use by the agent (pid {os.getpid()})" in error
    assert "stop the agent first" in error
    assert StateStore(tmp_path / "state.json").node(KEY).health["GPU-b"] == ["xid:79"]


@pytest.mark.parametrize(("uuid", "cause"), [("GPU-x", None), ("GPU-b", "xid:48")])
def test_clear_health_unknown_condition_exits_2(
    uuid: str, cause: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_state(tmp_path)
    argv = ["agent", "clear-health", uuid, "--state-dir", str(tmp_path)]
    if cause is not None:
        argv += ["--cause", cause]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"accelerator {uuid} has no" in err
    assert f"acsp agent health --state-dir {tmp_path}" in err
    assert StateStore(tmp_path / "state.json").node(KEY).health["GPU-b"] == ["xid:79"]


def test_discover_lists_simulated_accelerators(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["agent", "discover", "--backend", "simulated", "--nodes", "2", "--format", "json"])
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4
    assert {r["model"] for r in rows} == {"P100"}
    assert len({r["uuid"] for r in rows}) == 4


def test_discover_nvml_without_library_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["agent", "discover", "--backend", "nvml", "--format", "json"])

    captured = capsys.readouterr()
    if status == 0:
        # NVML loaded, so this machine has an NVIDIA driver: every row names a device.
        rows = [json.loads(line) for line in captured.out.splitlines()]
        assert all(row["uuid"] for row in rows)
    else:
        assert status == 1
        assert captured.err.startswith("error: NVML")
        assert "--backend simulated" in captured.err
        assert "Traceback" not in captured.err


@pytest.mark.parametrize("count", ["0", "-1"])
def test_discover_rejects_node_count_below_one(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "discover", "--backend", "simulated", "--nodes", count])

    assert exit_info.value.code == 2
    assert "argument --nodes:" in capsys.readouterr().err
