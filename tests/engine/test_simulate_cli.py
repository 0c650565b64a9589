"""``acsp simulate`` end to end on small files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acsp.cli.main import main

DATA = Path(__file__).parent / "data"


def test_simulate_swf_on_custom_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--trace", str(DATA / "tiny.swf"), "--fleet", str(DATA / "two_regions.csv")]

    status = main([*args, "--out", str(tmp_path), "--no-plots"])

    assert status == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"]["completed"] == 4
    assert summary["inputs"]["accelerators"] == 24
    assert set(summary["utilization"]["by_region"]) == {"cloud-a/east", "cloud-a/west"}
    assert "PF-days delivered" in capsys.readouterr().out
    assert not (tmp_path / "utilization.png").exists()


def test_simulate_rejects_missing_trace(tmp_path: Path) -> None:
    status = main(["simulate", "--trace", str(tmp_path / "absent.csv"), "--out", str(tmp_path)])

    assert status == 2
    assert not (tmp_path / "summary.json").exists()


def test_simulate_rejects_bad_time_scale(tmp_path: Path) -> None:
    status = main(["simulate", "--time-scale", "0", "--out", str(tmp_path)])

    assert status == 2
