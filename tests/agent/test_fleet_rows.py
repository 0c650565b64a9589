"""Rows of a fleet file: every invalid row is named with its line, column, reason and fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from acsp.node_lists import parse_accelerator_count
from agents.backends.fleet import MAX_REPORTED_ROWS, load_fleet

OPENB_HEADER = "sn,cpu_milli,memory_mib,gpu,model\n"
SPOT_HEADER = "gpu_model,gpu_capacity_num,cpu_num,node_name\n"
OWN_HEADER = "node,model,accelerators\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.csv"
    path.write_text(text)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ValueError) as caught:
        load_fleet(path, "acme", "eu-1")
    return str(caught.value).splitlines()


@pytest.mark.parametrize(
    ("text", "count"),
    [("8", 8), (" 2 ", 2), ("0", 0), ("+4", 4)],
)
def test_count_parsed(text: str, count: int) -> None:
    assert parse_accelerator_count("gpu", text) == count


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-3", "gpu -3 is negative"),
        ("2.5", "gpu '2.5' is not a whole number"),
        ("eight", "gpu 'eight' is not a whole number"),
        ("", "gpu '' is not a whole number"),
        ("1_000", "gpu '1_000' is not a whole number"),
    ],
)
def test_count_rejected(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_accelerator_count("gpu", text)
    message = str(caught.value)
    assert message.startswith(reason)
    assert "give the node's accelerator count, e.g. 8" in message
    assert "or 0 for a node without accelerators" in message


@pytest.mark.parametrize(
    ("text", "column", "value"),
    [
        (OPENB_HEADER + "n1,1,1,-3,T4\n", "gpu", "-3"),
        (SPOT_HEADER + "T4,-1,8,7\n", "gpu_capacity_num", "-1"),
        (OWN_HEADER + "n1,T4,-8\n", "accelerators", "-8"),
    ],
)
def test_negative_count_rejected(tmp_path: Path, text: str, column: str, value: str) -> None:
    path = _write(tmp_path, text)
    (problem,) = _problems(path)
    assert problem.startswith(f"fleet file {path}, line 2: {column} {value} is negative")
    assert "or 0 for a node without accelerators, which is skipped" in problem


def test_count_not_whole_number_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, OWN_HEADER + "n1,T4,x\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"fleet file {path}, line 2: accelerators 'x' is not a whole")
    assert "invalid literal" not in problem


def test_zero_count_is_node_without_accelerators(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The openb full node list gives its CPU-only nodes gpu 0 and no model.
    path = _write(tmp_path, OPENB_HEADER + "cpu-1,32000,262144,0,\nn1,1,1,2,T4\n")
    with caplog.at_level(logging.INFO, logger="agents.backends.fleet"):
        nodes = load_fleet(path, "acme", "eu-1")
    assert [node.node for node in nodes] == ["n1"]
    assert "skipped 1 row without accelerators" in caplog.text


def test_model_outside_catalog_names_column(tmp_path: Path) -> None:
    path = _write(tmp_path, SPOT_HEADER + "NOPE,2,8,7\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"fleet file {path}, line 2: gpu_model 'NOPE' is not in the catalog")
    assert "use one of A10," in problem
    assert "add it to acsp.catalog.MODELS" in problem


@pytest.mark.parametrize(
    ("text", "column"),
    [(OPENB_HEADER + " ,1,1,2,T4\n", "sn"), (OWN_HEADER + ",T4,2\n", "node")],
)
def test_empty_node_name_rejected(tmp_path: Path, text: str, column: str) -> None:
    path = _write(tmp_path, text)
    (problem,) = _problems(path)
    assert problem == f"fleet file {path}, line 2: {column} is empty; give each node a name"


def test_every_invalid_row_reported(tmp_path: Path) -> None:
    rows = [
        "n1,1,1,-3,T4",
        "n2,1,1,8,T4",
        "n3,1,1,8,NOPE",
        "n4,1,1,many,T4",
        "n5,1,1",
        "n2,1,1,2,T4",
    ]
    path = _write(tmp_path, OPENB_HEADER + "\n".join(rows) + "\n")
    problems = _problems(path)
    assert len(problems) == 5
    assert problems[0].startswith(f"fleet file {path}, line 2: gpu -3 is negative")
    assert problems[1].startswith(f"fleet file {path}, line 4: model 'NOPE' is not in")
    assert problems[2].startswith(f"fleet file {path}, line 5: gpu 'many' is not a whole")
    assert problems[3].startswith(f"fleet file {path}, line 6: the row has no value for gpu")
    assert problems[4].startswith(f"fleet file {path}, line 7: node n2 of acme/eu-1 is already")


def test_invalid_rows_listed_up_to_maximum(tmp_path: Path) -> None:
    extra = 7
    rows = [f"n{i},1,1,-1,T4" for i in range(MAX_REPORTED_ROWS + extra)]
    path = _write(tmp_path, OPENB_HEADER + "\n".join(rows) + "\n")
    problems = _problems(path)
    assert len(problems) == MAX_REPORTED_ROWS + 1
    assert problems[-1] == (
        f"fleet file {path}: {extra} more invalid rows are not listed; fix the rows above and "
        "run again to see them"
    )
