"""Trace loaders and the replay on small inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.engine import Engine, EngineConfig, NodeSpec, PriorityClass
from scheduler.service.validation import MAX_TASKS
from scheduler.sim.accounts import assign_account
from scheduler.sim.metrics import jain_index, percentile
from scheduler.sim.replay import Replay
from scheduler.sim.runner import SimulationConfig, simulate
from scheduler.sim.traces import (
    OPENB_NODES,
    OPENB_PODS,
    load_openb_nodes,
    load_openb_pods,
    load_swf,
)

DATA = Path(__file__).parent / "data"


def test_swf_loader_maps_processors_to_tasks() -> None:
    trace = load_swf(DATA / "tiny.swf")

    jobs = {job.name: job for job in trace.jobs}
    assert sorted(jobs) == ["swf-1", "swf-2", "swf-3", "swf-6"]
    assert (jobs["swf-1"].task_count, jobs["swf-1"].millis_per_task) == (1, 4000)
    assert (jobs["swf-2"].task_count, jobs["swf-2"].millis_per_task) == (2, 8000)
    assert jobs["swf-3"].wall_time_s == 300
    assert jobs["swf-6"].wall_time_s == 200
    assert jobs["swf-2"].account.project == "user-2"
    assert trace.skipped == {
        "no_runtime": 1,
        "no_processors": 1,
        "malformed": 1,
        "too_many_tasks": 0,
    }


def test_swf_loader_keeps_skipped_rows() -> None:
    trace = load_swf(DATA / "tiny.swf")

    by_reason = {row.reason: row for row in trace.skipped_examples}
    assert [row.line for row in trace.skipped_examples] == [8, 9, 11]
    assert by_reason["no_runtime"].detail == "run time -1 is not above 0"
    assert "processors 0" in by_reason["no_processors"].detail
    assert by_reason["malformed"].detail == "3 fields, not 18"


def test_swf_loader_keeps_first_examples_only(tmp_path: Path) -> None:
    path = tmp_path / "short.swf"
    path.write_text("".join(f"{i} 0 0\n" for i in range(1, 6)))

    trace = load_swf(path)

    assert trace.skipped["malformed"] == 5
    assert [row.line for row in trace.skipped_examples] == [1, 2, 3]


def test_swf_loader_rejects_gang_over_task_limit(tmp_path: Path) -> None:
    # The scheduler accepts at most MAX_TASKS tasks per job: 4096 tasks of 8 is 32768
    # processors, and one processor more makes 4097 tasks.
    path = tmp_path / "wide.swf"
    rest = "-1 -1 {procs} 900 -1 1 1 1 -1 1 -1 -1 -1"
    rows = [
        f"1 0 0 600 -1 {rest.format(procs=MAX_TASKS * 8)}",
        f"2 0 0 600 -1 {rest.format(procs=MAX_TASKS * 8 + 1)}",
        f"3 0 0 600 -1 {rest.format(procs=100_000)}",
    ]
    path.write_text("\n".join(rows) + "\n")

    trace = load_swf(path)

    assert [(job.name, job.task_count) for job in trace.jobs] == [("swf-1", MAX_TASKS)]
    assert trace.skipped["too_many_tasks"] == 2
    examples = [row for row in trace.skipped_examples if row.reason == "too_many_tasks"]
    assert [row.line for row in examples] == [2, 3]
    assert examples[1].detail == (
        "100000 processors make 12500 tasks of 8 accelerators, and the scheduler rejects a "
        f"job of more than {MAX_TASKS} tasks at submission"
    )


def test_swf_loader_names_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.swf"
    good = "1 0 0 600 4 -1 -1 4 900 -1 1 1 1 -1 1 -1 -1 -1"
    bad = "2 10 0 abc 4 -1 -1 4 900 -1 1 1 1 -1 1 -1 -1 -1"
    path.write_text(f"; a comment\n{good}\n{bad}\n")

    with pytest.raises(ValueError) as caught:
        load_swf(path)

    message = str(caught.value)
    assert message.startswith(f"{path}:3: ")
    assert "field 4 (run time) is 'abc'" in message
    assert "fix or remove that line" in message


def test_swf_loader_names_fractional_processors(tmp_path: Path) -> None:
    path = tmp_path / "bad.swf"
    path.write_text("1 0 0 600 4.5 -1 -1 4 900 -1 1 1 1 -1 1 -1 -1 -1\n")

    with pytest.raises(ValueError, match=r":1: field 5 \(allocated processors\) is '4.5'"):
        load_swf(path)


def test_openb_loader_skips_zero_gpu_pods() -> None:
    trace = load_openb_pods(OPENB_PODS)

    assert len(trace.jobs) == 7064
    assert trace.skipped["no_gpu"] == 1088
    fractional = [job for job in trace.jobs if job.millis_per_task < 1000]
    assert len(fractional) == 3078
    assert any(job.models == frozenset({"V100M16", "V100M32"}) for job in trace.jobs)
    first = trace.jobs[0]
    assert first.priority is PriorityClass.INTERACTIVE


def test_openb_loader_skips_pods_deleted_before_start(tmp_path: Path) -> None:
    header = (
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
        "creation_time,deletion_time,scheduled_time"
    )
    rows = [
        "before-creation,1,1,1,1000,,LS,Running,500,100,",
        "before-scheduling,1,1,1,1000,,LS,Running,0,100,200",
        "same-second,1,1,1,1000,,LS,Running,0,100,100",
        "ran,1,1,1,1000,,LS,Running,0,100,40",
    ]
    path = tmp_path / "pods.csv"
    path.write_text("\n".join([header, *rows]) + "\n")

    trace = load_openb_pods(path)

    assert trace.skipped["deleted_before_start"] == 2
    runtimes = {job.name: job.runtime for job in trace.jobs}
    assert runtimes == {"same-second": 1.0, "ran": 60.0}


def test_openb_fleet_loads_all_gpus() -> None:
    nodes = load_openb_nodes(OPENB_NODES)

    assert len(nodes) == 1213
    assert sum(len(n.accelerator_ids) for n in nodes) == 6212


def test_node_list_skips_nodes_without_accelerators(tmp_path: Path) -> None:
    # The openb full node list gives its CPU-only nodes gpu 0 and no model.
    path = tmp_path / "nodes.csv"
    path.write_text("sn,cpu_milli,memory_mib,gpu,model\ncpu-1,32000,262144,0,\nn1,1,1,2,T4\n")

    nodes = load_openb_nodes(path)

    assert [node.node_id for node in nodes] == ["n1"]


def test_node_list_rejects_negative_count(tmp_path: Path) -> None:
    path = tmp_path / "nodes.csv"
    path.write_text("sn,cpu_milli,memory_mib,gpu,model\nn1,1,1,-3,T4\n")

    with pytest.raises(ValueError, match=r"^line 2: gpu -3 is negative; give the node's"):
        load_openb_nodes(path)


def test_account_assignment_is_deterministic() -> None:
    first = assign_account("openb-pod-0042", seed=3)

    assert assign_account("openb-pod-0042", seed=3) == first
    assert first.project.startswith("proj-")
    names = {assign_account(f"pod-{i}").project for i in range(2000)}
    assert len(names) == 48


def test_replay_runs_swf_to_completion() -> None:
    trace = load_swf(DATA / "tiny.swf")
    nodes = [
        NodeSpec(f"n{i}", "p", "r", "H100-SXM5-80GB", tuple(f"n{i}/{k}" for k in range(8)))
        for i in range(3)
    ]
    engine = Engine(EngineConfig(half_life_s=3600.0))

    result = Replay(engine, nodes, trace.jobs).run()

    assert result.never_started == []
    assert all(run.end is not None for run in result.runs.values())
    gang = result.runs["swf-2"]
    assert gang.first_start == 10
    assert gang.end == 10 + 1200
    delivered = result.accelerator_seconds["p/r/H100-SXM5-80GB"]
    assert delivered == 4 * 600 + 16 * 1200 + 2 * 300 + 8 * 200


def test_simulate_writes_summary_and_plots(tmp_path: Path) -> None:
    config = SimulationConfig(out=tmp_path, jobs=300, time_scale=0.01)

    summary = simulate(config)

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["jobs"]["replayed"] == 300
    assert summary["jobs"]["completed"] == 300
    assert set(written["queueing_delay_s"]["by_class"]) == {
        "preemptible",
        "standard",
        "interactive",
    }
    assert float(written["pf_days_delivered"]["total"]) > 0
    assert 0 <= written["jain_fairness_projects"] <= 1
    for name in ("utilization.png", "queueing_delay_cdf.png", "stranded.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_percentile_and_jain() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([], 0.5) is None
    assert jain_index([1.0, 1.0, 1.0]) == 1.0
    assert jain_index([1.0, 0.0]) == 0.5
