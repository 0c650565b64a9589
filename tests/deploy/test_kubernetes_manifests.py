"""Offline checks of the Kubernetes manifests: schemas, hardening and the NATS Helm values.

Built-in kinds are validated by kubernetes-validate (the Kubernetes OpenAPI schemas as JSON
Schema, strict: unknown fields fail). CloudNativePG and cert-manager kinds are validated
against the schemas in schemas/, which cover the fields these manifests use. The rendered
overlay is checked too where ``kubectl`` (with its built-in kustomize) is installed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML not installed: pip install kubernetes-validate")
jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema not installed: pip install kubernetes-validate"
)

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.31"
CRD_SCHEMAS = {
    "postgresql.cnpg.io/v1": "cnpg-cluster-v1.json",
    "cert-manager.io/v1": "cert-manager-v1.json",
}
INSTALL_VALIDATOR = "kubernetes-validate not installed: pip install kubernetes-validate"

Resource = dict[str, Any]


def _manifest_files() -> list[Path]:
    files = sorted(KUBERNETES_DIR.glob("base/**/*.yaml"))
    files += sorted(KUBERNETES_DIR.glob("overlays/**/*.yaml"))
    return [path for path in files if path.name != "kustomization.yaml"]


def _documents(text: str) -> Iterator[Resource]:
    for document in yaml.safe_load_all(text):
        if document:
            yield document


def _file_resources() -> list[tuple[str, Resource]]:
    return [
        (f"{path.relative_to(KUBERNETES_DIR)}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in _manifest_files()
        for doc in _documents(path.read_text())
    ]


FILE_RESOURCES = _file_resources()


def _validate(resource: Resource) -> None:
    """Raise a jsonschema.ValidationError if ``resource`` does not match its schema."""
    schema_file = CRD_SCHEMAS.get(resource["apiVersion"])
    if schema_file is not None:
        schema = json.loads((SCHEMA_DIR / schema_file).read_text())
        jsonschema.Draft202012Validator(schema).validate(resource)
        return
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=INSTALL_VALIDATOR)
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def _kustomize(directory: Path) -> list[Resource]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the rendered overlay is not checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return list(_documents(result.stdout))


def _workloads(resources: list[Resource]) -> list[Resource]:
    return [doc for doc in resources if doc["kind"] in ("Deployment", "DaemonSet")]


@pytest.mark.parametrize(("name", "resource"), FILE_RESOURCES, ids=[n for n, _ in FILE_RESOURCES])
def test_manifest_matches_schema(name: str, resource: Resource) -> None:
    _validate(resource)


@pytest.mark.parametrize("directory", ["base", "overlays/example"])
def test_rendered_kustomization_matches_schema(directory: str) -> None:
    resources = _kustomize(KUBERNETES_DIR / directory)
    kinds = {doc["kind"] for doc in resources}
    assert {"Deployment", "DaemonSet", "Service", "PodDisruptionBudget", "Cluster"} <= kinds
    for resource in resources:
        _validate(resource)


def test_overlay_renders_secrets_and_certificates() -> None:
    resources = _kustomize(KUBERNETES_DIR / "overlays/example")
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in resources}
    assert ("Secret", "acsp-nats-users") in names
    assert {"acsp-grant", "acsp-metering", "acsp-scheduler", "acsp-nats", "acsp-agent"} == {
        doc["metadata"]["name"] for doc in resources if doc["kind"] == "Certificate"
    }
    for certificate in (doc for doc in resources if doc["kind"] == "Certificate"):
        name = certificate["metadata"]["name"].removeprefix("acsp-")
        if name in ("grant", "metering", "scheduler"):
            assert certificate["spec"]["uris"] == [f"spiffe://acsp/service/{name}"]
    grant = next(
        doc
        for doc in resources
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "acsp-grant"
    )
    assert grant["spec"]["replicas"] == 4


def test_validator_rejects_unknown_field() -> None:
    deployment = copy.deepcopy(
        next(doc for _, doc in FILE_RESOURCES if doc["kind"] == "Deployment")
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        _validate(deployment)


def test_crd_schema_rejects_misspelt_field() -> None:
    cluster = copy.deepcopy(next(doc for _, doc in FILE_RESOURCES if doc["kind"] == "Cluster"))
    cluster["spec"]["instance"] = 3
    with pytest.raises(jsonschema.ValidationError, match="instance"):
        _validate(cluster)


@pytest.mark.parametrize(
    "workload",
    _workloads([doc for _, doc in FILE_RESOURCES]),
    ids=[doc["metadata"]["name"] for doc in _workloads([doc for _, doc in FILE_RESOURCES])],
)
def test_workload_is_hardened(workload: Resource) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert "memory" in container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert not container["image"].endswith(":latest")
        assert "livenessProbe" in container


@pytest.mark.parametrize("name", ["acsp-grant", "acsp-metering", "acsp-scheduler"])
def test_service_has_grpc_probes_and_pdb(name: str) -> None:
    resources = [doc for _, doc in FILE_RESOURCES]
    deployment = next(
        doc for doc in resources if doc["kind"] == "Deployment" and doc["metadata"]["name"] == name
    )
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" in container[probe], f"{name} {probe} is not a gRPC health probe"
    budget = next(
        doc
        for doc in resources
        if doc["kind"] == "PodDisruptionBudget" and doc["metadata"]["name"] == name
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_agent_daemonset_targets_gpu_nodes() -> None:
    agent = next(doc for _, doc in FILE_RESOURCES if doc["kind"] == "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    container = pod["containers"][0]
    # Requesting nvidia.com/gpu would take the GPUs away from the jobs the agent runs.
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in container["env"]


def test_nats_values_carry_generated_accounts() -> None:
    values = yaml.safe_load((KUBERNETES_DIR / "nats" / "values.yaml").read_text())
    generated = yaml.safe_load(
        (REPO / "deploy" / "nats" / "generated" / "helm-values-accounts.yaml").read_text()
    )
    merge = values["config"]["merge"]
    assert merge["accounts"] == generated["accounts"], "copy helm-values-accounts.yaml again"
    assert merge["system_account"] == generated["system_account"]
    assert values["config"]["cluster"]["replicas"] == 3
    assert values["config"]["jetstream"]["merge"]["domain"] == "hub"
    for sidecar in ("container", "reloader", "promExporter"):
        context = values[sidecar]["merge"]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, sidecar
        assert context["capabilities"]["drop"] == ["ALL"], sidecar
    env = values["container"]["env"]
    for account in generated["accounts"].values():
        for user in account["users"]:
            variable = user["password"].strip("<> $")
            assert variable in env, f"{variable} is not set for the NATS container"


def _selects(selector: Resource, labels: dict[str, str]) -> bool:
    """Return whether a label selector (matchLabels and In expressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "only In expressions are checked here"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _egress_allowed(policies: list[Resource], source: dict[str, str], target: str) -> bool:
    """Return whether some policy lets pods with labels ``source`` call ``target`` on 50051."""
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], source):
            continue
        for rule in policy["spec"].get("egress", []):
            ports = {port["port"] for port in rule.get("ports", [])}
            peers = [peer.get("podSelector", {}) for peer in rule.get("to", [])]
            if 50051 in ports and any(
                _selects(peer, {"app.kubernetes.io/component": target}) for peer in peers
            ):
                return True
    return False


def _component_behind(resources: list[Resource], service_name: str) -> str:
    """Return the component label of the Deployment that the Service ``service_name`` selects."""
    service = next(
        doc
        for doc in resources
        if doc["kind"] == "Service" and doc["metadata"]["name"] == service_name
    )
    deployment = next(
        doc
        for doc in resources
        if doc["kind"] == "Deployment"
        and _selects(
            {"matchLabels": service["spec"]["selector"]},
            doc["spec"]["template"]["metadata"]["labels"],
        )
    )
    return str(deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


@pytest.mark.parametrize("name", ["acsp-grant", "acsp-metering", "acsp-scheduler"])
def test_service_reaches_services_it_calls(name: str) -> None:
    resources = [doc for _, doc in FILE_RESOURCES]
    deployment = next(
        doc for doc in resources if doc["kind"] == "Deployment" and doc["metadata"]["name"] == name
    )
    settings = next(
        doc
        for doc in resources
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "acsp-settings"
    )
    env = dict(settings["data"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env.update({item["name"]: item.get("value", "") for item in container["env"]})
    if name == "acsp-metering":
        # Without it metering copies no pledges, and settlements show no pledged capacity.
        assert "ACSP_SCHEDULER_ADDRESS" in env
    policies = [doc for doc in resources if doc["kind"] == "NetworkPolicy"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for variable, address in env.items():
        if not (variable.endswith("_ADDRESS") and address.startswith("acsp-")):
            continue
        target = _component_behind(resources, address.split(".", 1)[0])
        assert _egress_allowed(policies, labels, target), f"{name} cannot call {address}"
