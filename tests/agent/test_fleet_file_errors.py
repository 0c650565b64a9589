"""A bad fleet file or ``--fleet`` option stops the agent with exit status 2, before it starts.

The agent prints one line per problem and no traceback, and writes no state or spool.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.main import add_arguments, build_process, settings_from
from agents.simulated_inputs import SimulatedInputError
from tests.agent.subprocess_agent import REPOSITORY

AGENT_EXIT_S = 60.0
"""Seconds the agent may take to exit: the interpreter's start and the imports, mostly."""
NO_SERVER_URL = "nats://127.0.0.1:1"
"""A NATS URL where nothing listens, so an agent that wrongly starts cannot reach a server."""
COMMANDS = {
    "agents": ("-m", "agents"),
    "acsp": ("-m", "acsp.cli.main", "agent", "run"),
}


def _run_agent(command: tuple[str, ...], fleet: str, state_dir: Path) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
    env.update(ACSP_NATS_URL=NO_SERVER_URL, ACSP_LOG_LEVEL="INFO")
    argv = [sys.executable, *command, "--backend", "simulated", "--fleet", fleet]
    argv += ["--faults", "none", "--utilization", "none", "--state-dir", str(state_dir)]
    result = subprocess.run(
        argv, env=env, cwd=REPOSITORY, capture_output=True, text=True, timeout=AGENT_EXIT_S
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_negative_count_exits_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    fleet = tmp_path / "bad.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nn1,1,1,-3,T4\nn2,1,1,8,NOPE\n")
    state_dir = tmp_path / "state"

    status, error = _run_agent(command, f"{fleet}:acme:eu-1", state_dir)

    assert status == 2, error
    assert "Traceback" not in error
    assert f"fleet file {fleet}, line 2: gpu -3 is negative" in error
    assert "give the node's accelerator count" in error
    assert f"fleet file {fleet}, line 3: model 'NOPE' is not in the catalog" in error
    assert "serving 0 providers" not in error
    assert not (state_dir / "spool").exists()
    assert not (state_dir / "state.json").exists()


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_fleet_without_nodes_exits_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    fleet = tmp_path / "cpu.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\ncpu-1,32000,262144,0,\n")

    status, error = _run_agent(command, f"{fleet}:acme:eu-1", tmp_path / "state")

    assert status == 2, error
    assert "Traceback" not in error
    assert f"fleet file {fleet} lists no node with accelerators" in error
    assert "give at least one row a count above 0" in error


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_fleet_without_provider_exits_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    fleet = tmp_path / "acme.csv"
    fleet.write_text("node,model,accelerators\nn1,T4,8\n")

    status, error = _run_agent(command, str(fleet), tmp_path / "state")

    assert status == 2, error
    assert "Traceback" not in error
    assert f"--fleet {fleet} names no provider and region" in error
    assert f"--fleet {fleet}:PROVIDER:REGION" in error


def _args(tmp_path: Path, fleet: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--backend", "simulated", "--fleet", fleet, "--state-dir", str(tmp_path / "state")]
    return parser.parse_args([*argv, "--faults", "none", "--utilization", "none", *extra])


def test_fleet_without_region_rejected(tmp_path: Path) -> None:
    fleet = tmp_path / "acme.csv"
    fleet.write_text("node,model,accelerators\nn1,T4,8\n")
    args = _args(tmp_path, f"{fleet}:acme")
    with pytest.raises(SimulatedInputError) as caught:
        build_process(settings_from(args), args)
    message = str(caught.value)
    assert message.startswith(f"--fleet {fleet}:acme names no region")
    assert f"--fleet {fleet}:acme:REGION" in message


def test_more_nodes_than_fleet_rejected(tmp_path: Path) -> None:
    fleet = tmp_path / "acme.csv"
    fleet.write_text("node,model,accelerators\nn1,T4,8\n")
    args = _args(tmp_path, f"{fleet}:acme:eu-1", "--nodes", "3")
    with pytest.raises(SimulatedInputError, match=r"^--nodes 3 is more than the 1 nodes"):
        build_process(settings_from(args), args)
