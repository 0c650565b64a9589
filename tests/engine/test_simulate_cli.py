"""``acsp simulate`` end to end on small files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acsp.cli.main import main
from scheduler.sim.plots import stranded_note

DATA = Path(__file__).parent / "data"


def test_simulate_swf_on_custom_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--trace", str(DATA / "tiny.swf"), "--fleet", str(DATA / "two_regions.csv")]

    status = main([*args, "--out", str(tmp_path), "--no-plots"])

    assert status == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"]["completed"] == 4
    assert summary["inputs"]["accelerators"] == 24
    assert set(summary["utilization"]["by_region"]) == {"cloud-a/east", "cloud-a/west"}
    output = capsys.readouterr()
    assert "PF-days delivered" in output.out
    assert not (tmp_path / "utilization.png").exists()
    assert (
        "warning: skipped 3 trace rows (malformed: 1, no_processors: 1, no_runtime: 1); "
        "summary.json counts them under inputs.skipped_rows"
    ) in output.err
    assert f"  {DATA / 'tiny.swf'}:8: no_runtime: run time -1 is not above 0\n" in output.err
    assert f"  {DATA / 'tiny.swf'}:11: malformed: 3 fields, not 18\n" in output.err
    lines = output.out.splitlines()
    delay = next(line for line in lines if line.startswith("queueing delay"))
    assert "n/a/n/a" not in delay
    assert delay.endswith("(no job of class preemptible, interactive started)")
    stranded = next(line for line in lines if line.startswith("stranded"))
    assert stranded.endswith("n/a, no job waited for capacity at a sample time")


def test_simulate_says_why_figures_are_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fleet has no T4, so the only job never starts and no figure can be computed.
    trace = tmp_path / "pods.csv"
    trace.write_text(f"{OPENB_HEADER}\np1,1000,100,1,1000,T4,LS,Running,0,60,0\n")
    args = ["simulate", "--trace", str(trace), "--fleet", str(DATA / "two_regions.csv")]

    status = main([*args, "--out", str(tmp_path / "out"), "--no-plots"])

    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert "jobs: 1 replayed, 0 completed, 1 never started, 0 preemptions" in lines
    assert "queueing delay p50/p99 (s): n/a, no job started" in lines
    assert "Jain fairness over projects: n/a, no job completed" in lines


def test_simulate_rejects_gang_over_task_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "wide.swf"
    rows = [
        "1 0 0 600 4 -1 -1 4 900 -1 1 1 1 -1 1 -1 -1 -1",
        "2 10 0 600 -1 -1 -1 100000 900 -1 1 1 1 -1 1 -1 -1 -1",
    ]
    trace.write_text("\n".join(rows) + "\n")
    args = ["simulate", "--trace", str(trace), "--fleet", str(DATA / "two_regions.csv")]

    status = main([*args, "--out", str(tmp_path / "out"), "--no-plots"])

    assert status == 0
    output = capsys.readouterr()
    assert "jobs: 1 replayed, 1 completed, 0 never started" in output.out
    assert f"  {trace}:2: too_many_tasks: 100000 processors make 12500 tasks" in output.err
    assert "rejects a job of more than 4096 tasks at submission" in output.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["inputs"]["skipped_rows"]["too_many_tasks"] == 1
    [example] = summary["inputs"]["skipped_examples"]
    assert example["line"] == 2
    assert example["reason"] == "too_many_tasks"


def test_simulate_names_bad_swf_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "bad.swf"
    trace.write_text("1 0 0 abc 4 -1 -1 4 900 -1 1 1 1 -1 1 -1 -1 -1\n")

    status = main(["simulate", "--trace", str(trace), "--out", str(tmp_path), "--no-plots"])

    assert status == 2
    err = capsys.readouterr().err
    assert f"{trace}:1: field 4 (run time) is 'abc'" in err
    assert not (tmp_path / "summary.json").exists()


def test_simulate_rejects_missing_trace(tmp_path: Path) -> None:
    status = main(["simulate", "--trace", str(tmp_path / "absent.csv"), "--out", str(tmp_path)])

    assert status == 2
    assert not (tmp_path / "summary.json").exists()


def test_simulate_rejects_bad_time_scale(tmp_path: Path) -> None:
    status = main(["simulate", "--time-scale", "0", "--out", str(tmp_path)])

    assert status == 2


@pytest.mark.parametrize(
    ("option", "value"),
    [("--time-scale", "nan"), ("--time-scale", "inf"), ("--half-life", "nan")],
)
def test_simulate_rejects_non_finite_option(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["simulate", option, value, "--out", str(tmp_path), "--no-plots"])

    assert status == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


OPENB_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time"
)
SWF_FIELDS_AFTER_RUN = "1 -1 -1 1 100 -1 1 1 1 -1 -1 -1 -1 -1"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("nan.swf", f"1 0 0 nan {SWF_FIELDS_AFTER_RUN}\n", "run time of nan"),
        ("inf.swf", f"1 0 0 inf {SWF_FIELDS_AFTER_RUN}\n", "run time of inf"),
        ("far.swf", f"1 1e308 0 10 {SWF_FIELDS_AFTER_RUN}\n", "arrival of 1e+308"),
        ("binary.swf", "x\udcff\n", "cannot read it as an SWF file"),
        ("columns.csv", "a,b\n1,2\n", "missing column 'num_gpu'"),
        ("empty.csv", "", "no job to replay"),
        ("negative.csv", f"{OPENB_HEADER}\np1,1000,100,-1,1000,,LS,Running,0,100,0\n", "p1"),
        ("model.csv", f"{OPENB_HEADER}\np1,1000,100,1,1000,NOPE,LS,Running,0,100,0\n", "'NOPE'"),
        (
            "repeated.csv",
            f"{OPENB_HEADER}\n" + "p1,1000,100,1,1000,,LS,Running,0,100,0\n" * 2,
            "already submitted",
        ),
    ],
    ids=["nan", "inf", "far", "binary", "columns", "empty", "negative", "model", "repeated"],
)
def test_simulate_rejects_bad_trace(
    name: str, content: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / name
    trace.write_bytes(content.encode("utf-8", "surrogateescape"))
    out = tmp_path / "out"

    status = main(["simulate", "--trace", str(trace), "--out", str(out), "--no-plots"])

    assert status == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists()


def test_simulate_rejects_fleet_without_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("sn,gpu,model\n")
    args = ["simulate", "--trace", str(DATA / "tiny.swf"), "--fleet", str(fleet)]

    status = main([*args, "--out", str(tmp_path / "out"), "--no-plots"])

    assert status == 2
    assert "--fleet" in capsys.readouterr().err


def test_simulate_rejects_repeated_fleet_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("sn,cpu_milli,memory_mib,gpu,model\nd1,1,1,2,T4\nd2,1,1,0,\nd1,1,1,2,T4\n")
    out = tmp_path / "out"

    status = main(["simulate", "--fleet", str(fleet), "--out", str(out), "--no-plots"])

    assert status == 2
    err = capsys.readouterr().err
    assert f"--fleet {fleet}" in err
    assert "line 4: node d1 is already on line 2" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("count", "reason"),
    [("-3", "gpu -3 is negative"), ("2.5", "gpu '2.5' is not a whole number")],
)
def test_simulate_rejects_bad_fleet_count(
    count: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(f"sn,cpu_milli,memory_mib,gpu,model\nd1,1,1,2,T4\nd2,1,1,{count},T4\n")
    out = tmp_path / "out"

    status = main(["simulate", "--fleet", str(fleet), "--out", str(out), "--no-plots"])

    assert status == 2
    err = capsys.readouterr().err
    assert f"--fleet {fleet}" in err
    assert f"line 3: {reason}" in err
    assert "give the node's accelerator count" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_simulate_rejects_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.write_text("")
    args = ["simulate", "--trace", str(DATA / "tiny.swf"), "--fleet", str(DATA / "two_regions.csv")]

    status = main([*args, "--out", str(out), "--no-plots"])

    assert status == 2
    assert "--out" in capsys.readouterr().err


def test_simulate_prints_pf_days_without_exponent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One second on one accelerator delivers about 2e-7 PF-days, which str(Decimal) writes
    # with an exponent.
    trace = tmp_path / "one.csv"
    trace.write_text(f"{OPENB_HEADER}\np1,1000,100,1,1000,,LS,Running,0,1,0\n")

    status = main(["simulate", "--trace", str(trace), "--out", str(tmp_path), "--no-plots"])

    assert status == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "PF-days delivered" in x)
    figure = line.rsplit(" ", 1)[1]
    assert "E" not in figure
    assert figure.startswith("0.0000002")
    assert len(figure.split(".")[1]) <= 24
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pf_days_delivered"]["total"] == figure


def test_simulate_skips_pod_deleted_before_creation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "pods.csv"
    rows = ["p1,1000,100,1,1000,,LS,Running,500,100,", "p2,1000,100,1,1000,,LS,Running,0,60,0"]
    trace.write_text("\n".join([OPENB_HEADER, *rows]) + "\n")
    fleet = ["--fleet", str(DATA / "two_regions.csv")]

    status = main(["simulate", "--trace", str(trace), *fleet, "--out", str(tmp_path), "--no-plots"])

    assert status == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 trace row whose deletion_time is before its creation_time" in err
    assert "inputs.skipped_rows.deleted_before_start" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inputs"]["skipped_rows"]["deleted_before_start"] == 1
    assert summary["jobs"]["replayed"] == 1


def test_simulate_names_every_file_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", "--trace", str(DATA / "tiny.swf"), "--fleet", str(DATA / "two_regions.csv")]

    assert main([*args, "--out", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    names = ("summary.json", "utilization.png", "queueing_delay_cdf.png", "stranded.png")
    for name in names:
        assert (tmp_path / name).is_file()
        assert str(tmp_path / name) in out


def test_stranded_plot_notes_when_nothing_stranded() -> None:
    assert "no job waited for capacity" in (stranded_note([]) or "")
    assert "none was stranded" in (stranded_note([(0.0, 0.0), (1.0, 0.0)]) or "")
    assert stranded_note([(0.0, 0.0), (1.0, 0.25)]) is None
