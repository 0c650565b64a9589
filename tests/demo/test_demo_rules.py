"""The demo's pure parts: trace compression, the seed rule, fleet sampling, the tolerance."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from acsp.demo import compare, markdown, report
from acsp.demo.checks import run_checks
from acsp.demo.collect import LiveFigures, _ingest_dict
from acsp.demo.fleet import build_fleet_plan, sample_by_stride
from acsp.demo.runner import DemoConfig, MeshChildExited, _while_mesh_runs, demo_mesh_config
from acsp.demo.setup import pick_recall_pool, recallable_count
from acsp.demo.workload import build_workload, compress, project_plans, wall_time_limit_s
from acsp.v1 import common_pb2, metering_pb2
from agents.backends.fleet import FleetNode
from scheduler.engine import PriorityClass
from scheduler.sim.accounts import Account
from scheduler.sim.traces import TraceJob


def _job(name: str, arrival: float, runtime: float) -> TraceJob:
    return TraceJob(
        name=name,
        arrival=arrival,
        runtime=runtime,
        task_count=1,
        millis_per_task=1000,
        models=frozenset(),
        priority=PriorityClass.STANDARD,
        account=Account("proj-00", "inst-00", "openb"),
        wall_time_s=runtime,
    )


def test_compress_cuts_long_gaps_and_runtimes() -> None:
    jobs = [_job("a", 1000.0, 50.0), _job("b", 1100.0, 10_000.0), _job("c", 90_000.0, 5.0)]
    compressed = compress(jobs, max_gap_s=3600.0, max_runtime_s=600.0)
    assert [job.arrival for job in compressed] == [0.0, 100.0, 3700.0]
    assert [job.runtime for job in compressed] == [50.0, 600.0, 5.0]
    assert compressed[1].wall_time_s == wall_time_limit_s(600.0)


def test_wall_time_limit_exceeds_runtime() -> None:
    for runtime in (1.0, 59.5, 86_400.0):
        assert wall_time_limit_s(runtime) > runtime


def test_workload_is_the_same_for_the_same_seed() -> None:
    first = build_workload(200, 3, 8000.0, 3600.0, 86_400.0)
    second = build_workload(200, 3, 8000.0, 3600.0, 86_400.0)
    other = build_workload(200, 4, 8000.0, 3600.0, 86_400.0)
    assert first.jobs == second.jobs
    assert [j.account for j in first.jobs] != [j.account for j in other.jobs]
    assert first.wall_offset_s(first.jobs[-1]) == first.span_s / 8000.0


def test_project_plans_review_across_institutions() -> None:
    plans = project_plans()
    assert len(plans) == 48
    assert {p.tier for p in plans} == {"exploratory", "standard", "flagship"}
    for plan in plans:
        assert plan.reviewer_institution_id != plan.institution_id


def test_stride_sample_keeps_at_most_max_nodes() -> None:
    nodes = [FleetNode("p", "r", f"n{i}", "T4", 4) for i in range(1000)]
    sample = sample_by_stride(nodes, 240)
    assert len(sample) <= 240
    assert sample[0].node == "n0"
    assert sample[1].node == "n5"
    with pytest.raises(ValueError):
        sample_by_stride(nodes, 0)


def test_fleet_plan_has_three_providers() -> None:
    plan = build_fleet_plan(max_nodes=40, simulated_nodes=2)
    assert plan.providers == ["alibaba", "cloudx", "spot"]
    assert len(plan.engine_nodes()) == len(plan.nodes())
    assert sum(plan.capacity().values()) == sum(n.accelerators for n in plan.nodes())


def test_compare_flags_live_run_outside_tolerance() -> None:
    plan = build_fleet_plan(max_nodes=40, simulated_nodes=0)
    workload = build_workload(100, 0, 8000.0, 3600.0, 86_400.0)
    simulated = compare.simulate_slice(plan, workload)
    total = sum(simulated.summary["accelerator_seconds_by_region"].values())
    p50 = {name: v["p50"] for name, v in simulated.summary["queueing_delay_s"].items()}
    within = compare.compare(total * 1.05, p50, simulated, speed=8000.0)
    too_little = compare.compare(total * 0.5, p50, simulated, speed=8000.0)
    late = {name: (v + 10 * 8000.0 if v is not None else None) for name, v in p50.items()}
    too_slow = compare.compare(total, late, simulated, speed=8000.0)
    assert within["accelerator_seconds"]["within"]
    assert within["queueing_delay_p50"]["within"]
    assert not too_little["accelerator_seconds"]["within"]
    assert not too_slow["queueing_delay_p50"]["within"]


def test_delay_allowance_flags_one_wall_second() -> None:
    plan = build_fleet_plan(max_nodes=40, simulated_nodes=0)
    workload = build_workload(100, 0, 8000.0, 3600.0, 86_400.0)
    simulated = compare.simulate_slice(plan, workload)
    total = sum(simulated.summary["accelerator_seconds_by_region"].values())
    p50 = {name: v["p50"] for name, v in simulated.summary["queueing_delay_s"].items()}

    def delayed_by(wall_s: float) -> dict[str, Any]:
        late = {name: (v + wall_s * 8000.0 if v is not None else None) for name, v in p50.items()}
        return compare.compare(total, late, simulated, speed=8000.0)["queueing_delay_p50"]

    # Live runs of the demo on 2 cores measured a p50 of about 0.07 wall seconds.
    assert delayed_by(0.07)["within"]
    assert not delayed_by(1.0)["within"]


def test_simulated_slice_replays_every_job() -> None:
    plan = build_fleet_plan(max_nodes=40, simulated_nodes=0)
    workload = build_workload(100, 0, 8000.0, 3600.0, 86_400.0)
    shifted = replace(workload, jobs=workload.jobs[:50])
    simulated = compare.simulate_slice(plan, shifted)
    assert len(simulated.result.runs) == 50


def test_recall_picks_pool_using_more_than_protected() -> None:
    pledged = {"p/r/A": (6, 2), "p/r/B": (6, 2), "p/r/C": (2, 0), "spot/r/D": (0, 8)}
    # A uses its 6 protected, B 7.5 of 8, C is full but has none recallable, D uses 1 of 8.
    used = {"p/r/A": 6000, "p/r/B": 7500, "p/r/C": 2000, "spot/r/D": 1000}
    # B has no unused accelerator, so recalling one preempts.
    assert pick_recall_pool(used, pledged) == ("p/r/B", 1)


def test_recall_count_leaves_one_accelerator_short() -> None:
    # 2.5 of 8 in use: five unused accelerators plus one are recalled, so 2 remain.
    assert pick_recall_pool({"spot/r/D": 2500}, {"spot/r/D": (0, 8)}) == ("spot/r/D", 6)


def test_recall_picks_nothing_when_no_pool_is_busy() -> None:
    assert pick_recall_pool({"p/r/A": 6000}, {"p/r/A": (6, 2)}) is None


def test_spot_capacity_is_pledged_recallable() -> None:
    assert recallable_count("spot", 8) == 8
    assert recallable_count("alibaba", 8) == 2


def _passing_report() -> dict[str, Any]:
    return {
        "inputs": {"kill_metering_at_s": None},
        "ledger": {"postings_sum_pf_days": "0", "entry_count": 10, "negative_grant_ids": []},
        "grants": {"negative": []},
        "metering": {
            "ingest": {
                "charged_pf_days": "0.5",
                "priced_usage_pf_days": "0.5",
                "uncommitted_charges": 0,
                "samples_ingested": 40,
                "duplicates_ignored": 3,
            },
            "agents": {"usage_samples": 40, "outbox_pending": 0, "outbox": {"dropped": 0}},
        },
        "pf_days": {
            "charged_gross": "0.5",
            "refunds": {
                "count": 1,
                "pf_days": "0.1",
                "by_job": [{"job_id": "j-1", "charged_pf_days": "0.2", "refunded_pf_days": "0.1"}],
            },
        },
        "jobs": {"unexplained": [], "not_submitted": 0},
        "fleet": {"failed_calls": [], "unimplemented_rpcs": []},
        "comparison": {
            "accelerator_seconds": {"within": True, "relative_difference": 0.01, "tolerance": 0.15},
            "queueing_delay_p50": {"within": True, "allowance_s": 24000.0},
        },
    }


def _failed(report: dict[str, Any]) -> list[str]:
    return [check["name"] for check in run_checks(report) if not check["passed"]]


def test_checks_pass_on_consistent_report() -> None:
    assert _failed(_passing_report()) == []


def test_delay_check_names_failing_class() -> None:
    report = _passing_report()
    report["comparison"]["queueing_delay_p50"] = {
        "within": False,
        "allowance_s": 24000.0,
        "by_class": [
            {"class": "interactive", "live_p50_s": 30000.0, "simulated_p50_s": 0.0, "within": False}
        ],
    }

    [check] = [c for c in run_checks(report) if c["name"].startswith("live and simulated")]

    assert not check["passed"]
    assert "interactive 30000/0" in check["detail"]
    assert "not all within 24000 s" in check["detail"]


@pytest.mark.parametrize(
    ("path", "value", "failing"),
    [
        (("ledger", "postings_sum_pf_days"), "1E-24", "ledger postings sum to zero"),
        (("grants", "negative"), ["g-1"], "no grant balance is negative"),
        (("pf_days", "charged_gross"), "0.4", "charges equal metered usage times the rates"),
        (
            ("metering", "ingest", "priced_usage_pf_days"),
            "0.500000000000000000000001",
            "charges equal metered usage times the rates",
        ),
        (("metering", "agents", "usage_samples"), 41, "samples published equal samples ingested"),
        (("jobs", "unexplained"), ["j-1"], "every job is finished or pending with a reason"),
        (("inputs", "kill_metering_at_s"), 5.0, "metering was killed and came back"),
        (
            ("pf_days", "refunds", "by_job"),
            [{"job_id": "j-1", "charged_pf_days": "0.1", "refunded_pf_days": "0.2"}],
            "refunds do not exceed charges per job",
        ),
        (
            ("fleet", "failed_calls"),
            [{"rpc": "SetPledge", "target": "p/r/T4", "status": "INVALID_ARGUMENT"}],
            "provider, pledge and recall calls succeeded",
        ),
        (
            ("fleet", "unimplemented_rpcs"),
            ["RegisterProvider"],
            "provider, pledge and recall calls succeeded",
        ),
    ],
)
def test_check_fails_on_inconsistency(path: tuple[str, ...], value: object, failing: str) -> None:
    report = _passing_report()
    target = report
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert _failed(report) == [failing]


def test_ingest_amounts_have_no_exponent() -> None:
    small = "0.000000081119791666666666"
    status = metering_pb2.GetIngestStatusResponse(
        accelerator_seconds=common_pb2.Decimal(value="0.000001"),
        charged_pf_days=common_pb2.Decimal(value=small),
        priced_usage_pf_days=common_pb2.Decimal(value="0"),
    )

    ingest = _ingest_dict(status)

    assert ingest["accelerator_seconds"] == "0.000001"
    assert ingest["charged_pf_days"] == small
    assert ingest["priced_usage_pf_days"] == "0"


def test_pf_days_totals_are_exact_and_plain() -> None:
    balances = {
        "g-1": {"charged": "12345.000000000000000000000001", "refunded": "0", "held": "0"},
        "g-2": {"charged": "0.00000008", "refunded": "0.00000001", "held": "0"},
    }
    figures = LiveFigures([], {}, balances, {}, {}, {}, {}, {}, None)

    section = report._pf_days_section(figures)

    assert section["charged"] == "12345.000000080000000000000001"
    assert section["charged_gross"] == "12345.000000090000000000000001"
    assert section["refunded"] == "0.00000001"
    assert section["held_at_end"] == "0"


def test_json_writes_decimals_in_plain_notation() -> None:
    sample = {"held": Decimal("8.1119791666666666E-8"), "charged": Decimal("0E-24")}

    text = json.dumps(sample, default=report.json_value)

    assert json.loads(text) == {"held": "0.000000081119791666666666", "charged": "0"}


class _FakeMesh:
    """Stands in for LocalMesh: ``wait_failure`` returns once ``fail`` is set."""

    def __init__(self) -> None:
        self.fail = asyncio.Event()

    async def wait_failure(self) -> str:
        await self.fail.wait()
        return "metering (pid 42) was killed by SIGKILL"


async def test_dead_mesh_process_stops_live_run() -> None:
    mesh = _FakeMesh()
    cancelled = asyncio.Event()

    async def work() -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, mesh.fail.set)
    with pytest.raises(MeshChildExited, match="metering"):
        await _while_mesh_runs(mesh, work())  # type: ignore[arg-type]
    assert cancelled.is_set()


async def test_live_run_result_passes_through_healthy_mesh() -> None:
    async def work() -> Any:
        return "figures"

    assert await _while_mesh_runs(_FakeMesh(), work()) == "figures"  # type: ignore[arg-type]


def test_demo_mesh_stops_at_first_exit(tmp_path: Path) -> None:
    # A process restarted in the middle of the run would skew the report, so the demo stops.
    config = DemoConfig(out=tmp_path)
    fleet = build_fleet_plan(max_nodes=config.max_nodes, simulated_nodes=config.simulated_nodes)
    mesh_config = demo_mesh_config(config, fleet, tmp_path / "mesh")
    assert mesh_config.max_restarts == 0


def test_summary_names_charge_after_refunds() -> None:
    document = {
        "jobs": {"submitted": 3, "completed": 2, "failed": 0, "pending": 1},
        "pf_days": {"charged": "0.5", "refunded": "0.25"},
        "checks": [],
        "wall_clock_s": 1.0,
    }

    lines = markdown.summary_lines(document).splitlines()

    assert lines[1] == "PF-days charged 0.5 after refunds of 0.25"
