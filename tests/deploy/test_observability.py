"""Prometheus configuration, alert rules and Grafana dashboard against the metric catalogue."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML not installed: pip install kubernetes-validate")

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
CATALOGUE = yaml.safe_load((OBSERVABILITY / "metrics.yaml").read_text())["metrics"]
METRIC_NAME = re.compile(r"\bacsp_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Debian's prometheus package is built without Kubernetes service discovery.
NO_KUBERNETES_SD = "field kubernetes_sd_configs not found"


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed: apt-get install prometheus")
    return binary


def _catalogue_names() -> set[str]:
    return {entry["prometheus"] for entry in CATALOGUE}


def _referenced_metrics(text: str) -> set[str]:
    names = set()
    for name in METRIC_NAME.findall(text):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in _catalogue_names():
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(OBSERVABILITY / "acsp-alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    config = OBSERVABILITY / "prometheus.yml"
    result = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 and NO_KUBERNETES_SD in result.stdout + result.stderr:
        # This promtool cannot parse Kubernetes discovery, so check everything else: the same
        # file with each discovery block swapped for file discovery, next to the rule file.
        data = yaml.safe_load(config.read_text())
        for job in data["scrape_configs"]:
            for block in job.pop("kubernetes_sd_configs"):
                assert block["role"] == "pod"
                assert block["namespaces"]["names"]
            job["file_sd_configs"] = [{"files": ["targets.json"]}]
        copy = tmp_path / "prometheus.yml"
        copy.write_text(yaml.safe_dump(data))
        shutil.copy(OBSERVABILITY / "acsp-alerts.yml", tmp_path / "acsp-alerts.yml")
        result = subprocess.run(
            [promtool, "check", "config", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_reads_only_catalogued_metrics() -> None:
    referenced = set().union(*(_referenced_metrics(expr) for expr in _dashboard_exprs()))
    assert referenced <= _catalogue_names(), referenced - _catalogue_names()


def test_dashboard_covers_required_views() -> None:
    referenced = set().union(*(_referenced_metrics(expr) for expr in _dashboard_exprs()))
    for name in (
        "acsp_scheduler_queue_depth",
        "acsp_scheduler_queue_wait_seconds",
        "acsp_scheduler_placements_total",
        "acsp_fleet_accelerator_utilization_ratio",
        "acsp_fleet_accelerators",
        "acsp_metering_ingest_lag_seconds",
        "acsp_ledger_operations_total",
        "acsp_fleet_heartbeat_missing_nodes",
    ):
        assert name in referenced


def test_dashboard_panels_have_unique_ids() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["targets"] for panel in dashboard["panels"])


def test_alert_rules_read_only_catalogued_metrics() -> None:
    rules = yaml.safe_load((OBSERVABILITY / "acsp-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    referenced = set().union(*(_referenced_metrics(expr) for expr in exprs))
    assert referenced <= _catalogue_names(), referenced - _catalogue_names()


def test_docs_list_every_catalogued_metric() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    missing = [name for name in _catalogue_names() if f"`{name}`" not in docs]
    assert not missing, f"docs/deploy.md does not list {missing}"


EXPOSE_SCRIPT = """
import json, sys
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest

meter = MeterProvider(metric_readers=[PrometheusMetricReader()]).get_meter("catalogue")
for entry in json.load(sys.stdin):
    kind, name, unit = entry["kind"], entry["instrument"], entry["unit"]
    if kind == "counter":
        meter.create_counter(name, unit=unit).add(1)
    elif kind == "up_down_counter":
        meter.create_up_down_counter(name, unit=unit).add(1)
    elif kind == "gauge":
        meter.create_gauge(name, unit=unit).set(1)
    else:
        meter.create_histogram(name, unit=unit).record(1)
print(generate_latest(REGISTRY).decode())
"""


def test_catalogue_names_match_otel_exporter() -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    result = subprocess.run(
        [sys.executable, "-c", EXPOSE_SCRIPT],
        input=json.dumps(CATALOGUE),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    exposed = {
        line.split()[2] for line in result.stdout.splitlines() if line.startswith("# TYPE acsp_")
    }
    for entry in CATALOGUE:
        assert entry["prometheus"] in exposed, entry
