"""The checkpoint file paths that the agent gives its tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.checkpoints import FILE_ENV, CheckpointFiles


def test_file_path_absolute_for_relative_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task runs in the tasks folder, so a path relative to the agent's folder would point
    # below it, where the agent never looks.
    monkeypatch.chdir(tmp_path)
    files = CheckpointFiles(Path("agent") / "tasks")

    path = Path(dict(files.environment("j1/1/0", ""))[FILE_ENV])

    assert path.is_absolute()
    assert path.parent == tmp_path / "agent" / "tasks"
