"""The README's recipe for a node agent of one's own, run by root and by other users."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def recipe_lines() -> list[str]:
    """Return the lines of the README's bash block that starts an agent with a fleet file."""
    blocks = README.read_text().split("```bash\n")[1:]
    recipe = next(block.split("```")[0] for block in blocks if "acsp agent run" in block)
    return recipe.splitlines()


@pytest.mark.parametrize(("uid", "expected"), [("0", "acsp_mesh_task"), ("1000", "(unset)")])
def test_task_user_set_only_as_root(tmp_path: Path, uid: str, expected: str) -> None:
    # An agent that is not root cannot switch users and fails at start with a task user set.
    [line] = [line for line in recipe_lines() if "ACSP_AGENT_TASK_USER" in line]
    fake_id = tmp_path / "id"
    fake_id.write_text(f"#!/bin/sh\necho {uid}\n")
    fake_id.chmod(0o755)
    script = f'{line}\nprintf %s "${{ACSP_AGENT_TASK_USER-(unset)}}"\n'
    environment = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    environment.pop("ACSP_AGENT_TASK_USER", None)

    result = subprocess.run(
        ["bash", "-c", script], env=environment, capture_output=True, text=True, timeout=10
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
