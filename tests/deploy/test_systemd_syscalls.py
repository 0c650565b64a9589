"""The system calls that the agent's unit and its pool drop-in let the agent make.

systemd merges the ``SystemCallFilter=`` lines of a unit and its drop-ins in order. The first
line's kind, allow list or ``~`` deny list, sets the default. Each later line adds to the
allowed calls, or with ``~`` removes from them (systemd.exec(5)). The groups come from
``systemd-analyze syscall-filter``. A call outside the result fails with EPERM
(``SystemCallErrorNumber=EPERM``).
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = SYSTEMD_DIR / "acsp-agent.service"
TASK_USERS_DROP_IN = SYSTEMD_DIR / "acsp-agent-task-users.conf"

# The scratch sweep switches one thread's file system ids (agents/scratch_sweep.py), and the
# launcher switches a task's ids before it starts the task's program.
POOL_SYSCALLS = ("setfsuid", "setfsgid", "setresuid", "setresgid", "setgroups", "capset")


def _filter_lines(*files: Path) -> list[str]:
    lines = []
    for file in files:
        for line in file.read_text().splitlines():
            key, separator, value = line.strip().partition("=")
            if separator and key == "SystemCallFilter":
                lines.append(value)
    return lines


@cache
def _group(name: str) -> frozenset[str]:
    """Return the system calls of ``name``, a group like @setuid, nested groups expanded."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze not installed: apt-get install systemd")
    result = subprocess.run(
        [binary, "syscall-filter", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    calls: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= _group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def _names(value: str) -> set[str]:
    calls: set[str] = set()
    for name in value.split():
        calls |= _group(name) if name.startswith("@") else {name}
    return calls


def _allowed(lines: list[str]) -> set[str]:
    """Return the calls that an allow list merged from ``lines`` lets through."""
    assert lines, "no SystemCallFilter line"
    assert not lines[0].startswith("~"), "the first SystemCallFilter line is a deny list"
    allowed: set[str] = set()
    for value in lines:
        if value.startswith("~"):
            allowed -= _names(value[1:])
        else:
            allowed |= _names(value)
    return allowed


def test_agent_unit_denies_setfsuid() -> None:
    # Checks the merge itself: the unit alone keeps the agent from switching users.
    allowed = _allowed(_filter_lines(UNIT))
    assert "setfsuid" not in allowed
    assert "setresuid" not in allowed


@pytest.mark.parametrize("syscall", POOL_SYSCALLS)
def test_pool_drop_in_allows_syscall(syscall: str) -> None:
    allowed = _allowed(_filter_lines(UNIT, TASK_USERS_DROP_IN))
    assert syscall in allowed
