"""Damaged or missing input files of the simulated backend give one clear line, not a traceback."""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import pytest

from agents.backends.fleet import load_fault_trace, load_fleet, load_utilization_trace
from agents.main import add_arguments, build_process, settings_from
from agents.simulated_inputs import SimulatedInputError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node,model,accelerators\nn1,A10\n", r"line 2: the row has no value for accelerators"),
        ("node,model,accelerators\nn1,A10,x\n", r"line 2: accelerators 'x' is not a whole"),
        (b"node,model,accelerators\nn\xff,A10,1\n", r"is not UTF-8 text"),
    ],
)
def test_fleet_file_bad_row(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "fleet.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=rf"^fleet file {path}.*{message}"):
        load_fleet(path, "p", "r")


def test_missing_fleet_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(ValueError, match=r"cannot be read: No such file or directory$"):
        load_fleet(path, "p", "r")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{", r"is not valid JSON"),
        ("{}", r"is not a JSON list of events"),
        ("[1]", r"event 0 is not a JSON object"),
        ('[{"node_id": "s1"}]', r"event 0 has no event_time, event_type, fault_type"),
        (
            '[{"node_id": "s1", "event_time": "soon", "event_type": "fault_start",'
            ' "fault_type": {}}]',
            r"event 0: event_time 'soon' is not a number of days",
        ),
        (
            '[{"node_id": "s1", "event_time": 1, "event_type": "fault_start",'
            ' "fault_type": "GPU Lost"}]',
            r"event 0: fault_type is not an object",
        ),
    ],
)
def test_fault_trace_bad_content(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "faults.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^fault trace {path}.*{message}"):
        load_fault_trace(path)


def test_missing_fault_trace(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot be read: No such file or directory$"):
        load_fault_trace(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n", r"has no column container_ip, timestamp_anon, value"),
        ("container_ip,timestamp_anon,value\n", r"has no rows"),
        ("container_ip,timestamp_anon,value\nc1,0,busy\n", r"line 2: .*is not a number"),
        ("container_ip,timestamp_anon,value\nc1,0\n", r"line 2: .*is not a number"),
        (
            "container_ip,timestamp_anon,value\nc1,nan,5\n",
            r"line 2: timestamp_anon or value is not finite",
        ),
    ],
)
def test_utilization_trace_bad_content(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "utilization.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^utilization trace {path}.*{message}"):
        load_utilization_trace(path)


def test_utilization_archive_without_csv(tmp_path: Path) -> None:
    path = tmp_path / "trace.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        data = b"not a trace"
        member = tarfile.TarInfo("readme.txt")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"has no \.csv member"):
        load_utilization_trace(path)
    path.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"is not a readable archive|cannot be read"):
        load_utilization_trace(path)


def test_utilization_points_at_one_time(tmp_path: Path) -> None:
    path = tmp_path / "utilization.csv"
    path.write_text("container_ip,timestamp_anon,value\nc1,7,40\nc1,7,60\n")
    trace = load_utilization_trace(path)
    assert 0 <= trace.utilization("task-1", 120.0) <= 100


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("node,model,accelerators\nn1,A10,1\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--backend", "simulated", "--fleet", f"{fleet}:p:r", "--state-dir", str(tmp_path), *extra]
    )


def test_agent_exits_on_missing_fault_trace(tmp_path: Path) -> None:
    args = _args(tmp_path, "--faults", str(tmp_path / "absent.json"), "--utilization", "none")
    with pytest.raises(SimulatedInputError, match=r"^fault trace .*absent\.json cannot be read"):
        build_process(settings_from(args), args)


def test_agent_exits_on_bad_utilization_trace(tmp_path: Path) -> None:
    bad = tmp_path / "utilization.csv"
    bad.write_text("x\n1\n")
    args = _args(tmp_path, "--faults", "none", "--utilization", str(bad))
    with pytest.raises(SimulatedInputError, match=r"^utilization trace .*--utilization none$"):
        build_process(settings_from(args), args)


@pytest.mark.parametrize("option", ["a>b:r", "p:r.1", "p:" + "r" * 65])
def test_fleet_option_bad_token(tmp_path: Path, option: str) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nx,1,1,1,A10\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--backend", "simulated", "--fleet", f"{fleet}:{option}", "--state-dir", str(tmp_path)]
    args = parser.parse_args([*argv, "--faults", "none", "--utilization", "none"])
    with pytest.raises(SimulatedInputError, match=r"^--fleet .* is not a subject token"):
        build_process(settings_from(args), args)
