"""Usage errors of the ``acsp`` command: which usage line they print and that they exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from acsp.cli import _common, main, usage


@pytest.mark.parametrize(
    ("argv", "usage_line"),
    [
        (["jobs", "list", "--bogus"], "usage: acsp jobs list "),
        (["usage", "charges", "--bogus", "x"], "usage: acsp usage charges "),
        (["status", "--bogus"], "usage: acsp status "),
        (["jobs", "--bogus", "list"], "usage: acsp jobs "),
    ],
)
def test_unknown_option_prints_subcommand_usage(
    argv: list[str], usage_line: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == _common.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(usage_line), err
    assert "unrecognized arguments: --bogus" in err
    assert "usage: acsp [-h]" not in err


def test_unknown_top_level_option_prints_top_usage(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--bogus", "status"])
    assert exit_info.value.code == _common.EXIT_USAGE
    assert capsys.readouterr().err.startswith("usage: acsp [-h]")


class _PermissionDeniedError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return "only the program office may list every project's charges"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _DenyingMetering:
    def __getattr__(self, name: str) -> object:
        def call(request: object) -> object:
            raise _PermissionDeniedError()

        return call


@contextmanager
def _open_denying_metering(args: object) -> Iterator[_DenyingMetering]:
    yield _DenyingMetering()


@pytest.mark.parametrize("listing", ["charges", "refunds", "efficiency"])
def test_missing_filter_exits_2(
    listing: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setattr(usage, "open_metering", _open_denying_metering)
    argv = ["usage", listing, "--data-dir", str(tmp_path)]
    code = main.main(argv)
    err = capsys.readouterr().err
    assert "a filter is required" in err
    assert code == _common.EXIT_USAGE
