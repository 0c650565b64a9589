"""``acsp demo`` end to end on a short slice: the real mesh, the checks, the report files."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from acsp.demo.runner import DemoConfig, run_demo

SHORT_JOBS = 300
PLOTS = (
    "utilization_by_region.png",
    "queueing_delay_by_class.png",
    "grant_burn_down.png",
    "provider_settlement.png",
)

pytestmark = pytest.mark.timeout(300)


def _run(out: Path, **settings: Any) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    config = DemoConfig(out=out, jobs=SHORT_JOBS, seed=7, **settings)
    return asyncio.run(run_demo(config, out=io.StringIO()))


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="acsp-demo-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def short_demo(work_dir: Path) -> dict[str, Any]:
    return _run(work_dir / "short")


@pytest.fixture(scope="module")
def killed_demo(work_dir: Path) -> dict[str, Any]:
    return _run(work_dir / "killed", kill_metering_at_s=8.0)


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


@pytest.mark.parametrize(
    "name",
    [
        "ledger postings sum to zero",
        "no grant balance is negative",
        "charges equal metered usage times the rates",
        "refunds do not exceed charges per job",
        "samples published equal samples ingested",
        "every job is finished or pending with a reason",
        "live and simulated agree within the tolerance",
        "provider, pledge and recall calls succeeded",
    ],
)
def test_short_demo_check_passes(short_demo: dict[str, Any], name: str) -> None:
    check = _checks(short_demo)[name]
    assert check["passed"], check["detail"]


def test_short_demo_writes_report_and_plots(short_demo: dict[str, Any], work_dir: Path) -> None:
    out = work_dir / "short"
    written = json.loads((out / "report.json").read_text())
    assert written["jobs"]["submitted"] == SHORT_JOBS
    assert "| ledger postings sum to zero | True |" in (out / "report.md").read_text()
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000, name
    assert sorted(short_demo["plots"]) == sorted(PLOTS)


def test_short_demo_accounts_for_every_job(short_demo: dict[str, Any]) -> None:
    jobs = short_demo["jobs"]
    finished = jobs["completed"] + jobs["failed"] + jobs["timed_out"] + jobs["cancelled"]
    assert jobs["submitted"] == SHORT_JOBS
    assert finished + jobs["pending"] == SHORT_JOBS
    assert sum(jobs["pending_by_reason"].values()) == jobs["pending"]


def test_short_demo_charges_and_settles(short_demo: dict[str, Any]) -> None:
    charged = Decimal(short_demo["pf_days"]["charged"])
    delivered = sum(Decimal(s["delivered_pf_days"]) for s in short_demo["settlement"].values())
    assert charged > 0
    assert Decimal(short_demo["pf_days"]["held_at_end"]) == 0
    assert delivered == Decimal(short_demo["pf_days"]["charged_gross"])
    assert short_demo["metering"]["settled"]


def test_short_demo_awards_reviewed_and_exploratory_grants(short_demo: dict[str, Any]) -> None:
    grants = short_demo["grants"]
    assert grants["count"] == 48
    assert grants["reviewed"] == grants["by_tier"]["standard"] + grants["by_tier"]["flagship"]
    assert grants["by_tier"]["exploratory"] == 24


def test_short_demo_declares_the_simulated_fleet(short_demo: dict[str, Any]) -> None:
    regions = {f"{r['provider']}/{r['region']}": r for r in short_demo["fleet"]["regions"]}
    assert set(regions) == {"alibaba/hz-a", "alibaba/hz-b", "spot/cn-east", "cloudx/eu-west"}
    assert regions["cloudx/eu-west"]["simulated_fleet"]
    assert not regions["alibaba/hz-a"]["simulated_fleet"]
    assert set(regions["cloudx/eu-west"]["accelerators_by_model"]) == {"MI300X"}


def test_metering_kill_passes_every_check(killed_demo: dict[str, Any]) -> None:
    for check in killed_demo["checks"]:
        assert check["passed"], f"{check['name']}: {check['detail']}"
    assert len(killed_demo["metering_restarts"]) == 1


def test_metering_kill_loses_and_doubles_nothing(
    killed_demo: dict[str, Any], short_demo: dict[str, Any]
) -> None:
    killed_ingest = killed_demo["metering"]["ingest"]
    assert killed_ingest["samples_ingested"] == killed_demo["metering"]["agents"]["usage_samples"]
    assert killed_ingest["dead_lettered"] == 0
    assert killed_demo["jobs"]["submitted"] == short_demo["jobs"]["submitted"]
    assert killed_demo["jobs"]["unexplained"] == []
    # Both runs replay the same jobs on the same fleet. Scheduling jitter of a few wall
    # milliseconds per job, and which accelerators the injected faults hit while jobs run,
    # separate their metered accelerator-seconds.
    killed = float(killed_ingest["accelerator_seconds"])
    plain = float(short_demo["metering"]["ingest"]["accelerator_seconds"])
    assert abs(killed - plain) / plain < 0.10


def test_short_demo_refunds_recalled_job(short_demo: dict[str, Any]) -> None:
    refunds = short_demo["pf_days"]["refunds"]
    refunded = Decimal(short_demo["pf_days"]["refunded"])
    settled = sum(Decimal(s["refunded_pf_days"]) for s in short_demo["settlement"].values())
    assert any(reason.startswith("provider recall") for reason in refunds["by_reason"])
    assert refunded > 0
    assert Decimal(refunds["pf_days"]) == refunded
    assert settled == refunded
    for row in refunds["by_job"]:
        assert Decimal(row["refunded_pf_days"]) <= Decimal(row["charged_pf_days"]), row
