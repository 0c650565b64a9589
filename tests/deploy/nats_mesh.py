"""A three-server hub and one leaf node rendered from the NATS templates, for the tests.

Three hub servers (JetStream domain ``hub``, streams with three replicas) and one leaf node for
provider alpha, region r1, all on free loopback ports with TLS from a throwaway CA. Provider
beta (region r1) has no leaf node: its clients connect to the hub as user ``beta``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StreamConfig

from acsp import subjects
from deploy.nats import render
from tests.deploy.jetstream_retry import until_answered
from tests.deploy.nats_processes import NatsProcess, free_ports
from tests.deploy.tls_material import write_tls_dir

PASSWORDS = {"scheduler": "scheduler-secret", "alpha": "alpha-secret", "beta": "beta-secret"}
AGENT_PASSWORD = "agent-secret"
ErrorList = list[str]


@dataclass(frozen=True)
class Mesh:
    """Where the running hub and leaf listen, and the CA their certificates chain to."""

    hub_urls: list[str]
    leaf_url: str
    ca_file: Path
    hubs: list[NatsProcess]


def render_and_start(tmp: Path, binary: str) -> tuple[Mesh, list[NatsProcess]]:
    tls_dir = write_tls_dir(tmp / "tls")
    ports = free_ports(14)
    hub_ports = [render.Ports(*ports[i * 4 : i * 4 + 4]) for i in range(3)]
    leaf_ports = render.Ports(client=ports[12], monitor=ports[13])

    topology = render.Topology.from_json(
        {
            "cluster_name": "acsp-test",
            "jetstream_domain": "hub",
            "routes": [f"nats://127.0.0.1:{p.cluster}" for p in hub_ports],
            "service_users": ["scheduler"],
            "providers": {"alpha": ["r1"], "beta": ["r1"]},
        }
    )
    env = {render.password_variable(user): secret for user, secret in PASSWORDS.items()}
    env[render.password_variable("sys")] = "sys-secret"

    processes: list[NatsProcess] = []
    for index, hub_port in enumerate(hub_ports):
        conf = tmp / f"hub-{index}.conf"
        conf.write_text(
            render.render_hub(topology, str(tls_dir), str(tmp / f"js-{index}"), hub_port)
        )
        server_env = {**env, "NATS_SERVER_NAME": f"hub-{index}"}
        processes.append(NatsProcess(binary, conf, server_env, hub_port.monitor))

    leaf_conf = tmp / "leaf-alpha-r1.conf"
    leaf_conf.write_text(render.render_leaf(topology, "alpha", "r1", str(tls_dir), leaf_ports))
    leaf_env = {
        "ACSP_NATS_HUB_LEAF_URL": f"nats-leaf://alpha:{PASSWORDS['alpha']}@127.0.0.1:{hub_ports[0].leaf}",
        "ACSP_NATS_PASSWORD_AGENT": AGENT_PASSWORD,
    }
    processes.append(NatsProcess(binary, leaf_conf, leaf_env, leaf_ports.monitor))

    mesh = Mesh(
        hub_urls=[f"tls://127.0.0.1:{p.client}" for p in hub_ports],
        leaf_url=f"tls://127.0.0.1:{leaf_ports.client}",
        ca_file=tls_dir / "ca.crt",
        hubs=processes[:3],
    )
    return mesh, processes


def wait_for_leaf(hub: NatsProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.monitor_port}/leafz", timeout=1) as r:
            if json.load(r).get("leafnodes", 0) >= 1:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the leaf node did not connect to {hub.config.name}:\n{hub.log()}")


async def declare_streams(mesh: Mesh) -> None:
    nc = await connect(mesh, mesh.hub_urls, "scheduler", PASSWORDS["scheduler"], "_INBOX")
    try:
        js = nc.jetstream(timeout=10)
        for name, subject_list in (
            (subjects.USAGE_STREAM, subjects.USAGE_SUBJECTS),
            (subjects.AGENT_STREAM, subjects.AGENT_SUBJECTS),
            (subjects.COMMAND_STREAM, subjects.COMMAND_SUBJECTS),
        ):
            config = StreamConfig(name=name, subjects=list(subject_list), num_replicas=3)
            await until_answered(functools.partial(js.add_stream, config))
        bucket = KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, replicas=3)
        await until_answered(lambda: js.create_key_value(bucket))
    finally:
        await nc.close()


async def connect(
    mesh: Mesh,
    urls: list[str],
    user: str,
    password: str,
    inbox_prefix: str,
    errors: ErrorList | None = None,
) -> Client:
    context = ssl.create_default_context(cafile=str(mesh.ca_file))

    async def record(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(
        servers=urls,
        user=user,
        password=password,
        tls=context,
        inbox_prefix=inbox_prefix,
        error_cb=record,
        allow_reconnect=False,
        connect_timeout=5,
    )


def running_mesh(tmp: Path, binary: str) -> Iterator[Mesh]:
    """Start the hub and the leaf, declare the streams and the bucket, and stop them after."""
    running, processes = render_and_start(tmp, binary)
    try:
        for process in processes:
            process.wait_healthy(timeout_s=45)
        wait_for_leaf(running.hubs[0], timeout_s=20)
        asyncio.run(declare_streams(running))
        yield running
    finally:
        for process in processes:
            process.stop()
