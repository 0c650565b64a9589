"""The agent's and the leaf node's systemd units: accepted by systemd-analyze and hardened."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agents.task_cgroups import TASK_CGROUP_ENV, parse_task_cgroup
from agents.task_user import NON_ROOT_CAPABILITIES, POOL_LAUNCHER_CAPABILITIES
from agents.task_users import parse_task_users
from tests.deploy.nats_processes import nats_server_binary

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = SYSTEMD_DIR / "acsp-agent.service"
TASK_USER_DROP_IN = SYSTEMD_DIR / "acsp-agent-task-user.conf"
TASK_USERS_DROP_IN = SYSTEMD_DIR / "acsp-agent-task-users.conf"
TASK_CGROUP_DROP_IN = SYSTEMD_DIR / "acsp-agent-task-cgroup.conf"
LEAF_UNIT = SYSTEMD_DIR / "acsp-nats-leaf.service"
# The program each unit starts, and the local executable that replaces it for verify.
INSTALLED_BINARIES = {
    UNIT.name: ("/opt/acsp/venv/bin/python", sys.executable),
    LEAF_UNIT.name: ("/usr/local/bin/nats-server", nats_server_binary() or "/bin/true"),
}
UNITS = [UNIT, LEAF_UNIT]
# systemd-analyze security rates 0 (locked down) to 10 (unprotected); 2.0 and below is "OK".
MAX_EXPOSURE = 2.0


def _settings(unit: Path) -> dict[str, list[str]]:
    """Return each [Service] key with all its values (keys may repeat in unit files)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def _unit_for_this_host(unit: Path, tmp_path: Path) -> Path:
    """Copy the unit with ExecStart pointing at an executable of this host."""
    installed, local = INSTALLED_BINARIES[unit.name]
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(installed, local))
    return copy


def _systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze not installed: apt-get install systemd")
    return binary


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(_unit_for_this_host(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify reports unknown keys and sections as warnings with exit status 0.
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_unit_exposure_score_is_ok(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            _systemd_analyze(),
            "security",
            "--offline=true",
            "--no-pager",
            str(_unit_for_this_host(unit, tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {result.stderr}")
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_agent_unit_runs_without_privileges() -> None:
    settings = _settings(UNIT)
    assert settings["User"] == ["acsp-agent"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["ReadWritePaths"] == ["/var/lib/acsp-agent"]
    assert settings["StateDirectory"] == ["acsp-agent"]
    assert settings["DevicePolicy"] == ["closed"]


DROP_INS = [TASK_USER_DROP_IN, TASK_USERS_DROP_IN, TASK_CGROUP_DROP_IN]


@pytest.mark.parametrize("drop_in", DROP_INS, ids=[drop_in.name for drop_in in DROP_INS])
def test_task_user_drop_in_passes_verify(tmp_path: Path, drop_in: Path) -> None:
    # A drop-in's [Service] section merges into the unit's, as a second section of one file does.
    unit = _unit_for_this_host(UNIT, tmp_path)
    unit.write_text(unit.read_text() + "\n" + drop_in.read_text())
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_task_user_drop_in_grants_what_agent_checks() -> None:
    settings = _settings(TASK_USER_DROP_IN)
    assert settings["AmbientCapabilities"] == [" ".join(NON_ROOT_CAPABILITIES)]
    assert settings["CapabilityBoundingSet"] == [" ".join(NON_ROOT_CAPABILITIES)]
    assert settings["StateDirectoryMode"] == ["0711"]
    assert settings["Environment"] == ["ACSP_AGENT_TASK_USER=acsp-task"]


def test_task_users_drop_in_grants_what_agent_checks() -> None:
    settings = _settings(TASK_USERS_DROP_IN)
    assert settings["AmbientCapabilities"] == [" ".join(NON_ROOT_CAPABILITIES)]
    assert set(POOL_LAUNCHER_CAPABILITIES) <= set(NON_ROOT_CAPABILITIES)
    assert settings["CapabilityBoundingSet"] == [" ".join(NON_ROOT_CAPABILITIES)]
    assert settings["StateDirectoryMode"] == ["0711"]
    assert settings["Environment"] == ["ACSP_AGENT_TASK_USERS=60000-60063:acsp-tasks"]
    # The group need not exist here: a stand-in gid checks the rest of the value.
    users = parse_task_users("60000-60063:4242")
    assert [user.uid for user in users] == list(range(60000, 60064))


def test_task_cgroup_drop_in_delegates_unit_cgroup() -> None:
    settings = _settings(TASK_CGROUP_DROP_IN)
    assert settings["Delegate"] == ["yes"]
    assert settings["ProtectControlGroups"] == ["no"]
    assert _settings(UNIT)["ProtectControlGroups"] == ["yes"]
    variable, _, value = settings["Environment"][0].partition("=")
    assert variable == TASK_CGROUP_ENV
    # systemd puts a system service's cgroup at system.slice/<unit name>.
    assert parse_task_cgroup(value) == Path("/sys/fs/cgroup/system.slice") / UNIT.name


def test_agent_unit_stop_leaves_tasks_running() -> None:
    # The agent leaves its tasks running for adoption on restart unless
    # ACSP_AGENT_STOP_TASKS_ON_EXIT is set, so systemd must signal the agent alone.
    settings = _settings(UNIT)
    assert settings["KillMode"] == ["process"]
    assert settings["KillSignal"] == ["SIGTERM"]


def test_leaf_unit_has_no_writable_path() -> None:
    settings = _settings(LEAF_UNIT)
    assert settings["User"] == ["acsp-nats"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["PrivateDevices"] == ["yes"]
    assert "ReadWritePaths" not in settings
    assert "StateDirectory" not in settings


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_unit_file_parses_as_ini(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"
