"""Input checks of ``acsp demo``, which reject bad options before any mesh starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from acsp.cli import main


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--jobs", "0"),
        ("--jobs", "-1"),
        ("--speed", "nan"),
        ("--speed", "inf"),
        ("--speed", "0"),
        ("--max-nodes", "0"),
        ("--kill-metering-at", "-1"),
        ("--kill-metering-at", "nan"),
    ],
)
def test_demo_rejects_bad_option(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.main(["demo", "--out", str(tmp_path / "out"), option, value])

    assert exit_info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.csv"
    out.write_text("")

    status = main.main(["demo", "--out", str(out)])

    assert status == 2
    assert "--out" in capsys.readouterr().err
