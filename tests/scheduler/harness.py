"""Real processes for end-to-end scheduler tests: NATS, grant, agents and scheduler replicas.

Everything binds free loopback ports and a fresh PostgreSQL database; callers authenticate
with tokens signed by a key made for the run. TLS is off, so services present service
tokens (the scheduler mints its own from the signing key in its data directory).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
import nats.js.errors

from acsp import subjects
from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role, generate_signing_key, load_signing_key, mint_token

ADMIN_DSN = os.environ.get("ACSP_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_BINARY = str(Path(sys.executable).parent / "nats-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll an async or plain ``condition`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as when a machine dies."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Stack:
    """The servers and processes of one test."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.db_name = f"sched_e2e_{uuid.uuid4().hex[:10]}"
        self.dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{self.db_name}"
        self.nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.processes: list[Process] = []
        self.private_key, self.public_key = generate_signing_key(work_dir)
        self.grant_address = ""

    def token(
        self,
        subject: str,
        *roles: Role,
        institution: str | None = None,
        provider: str | None = None,
    ) -> str:
        key = load_signing_key(self.private_key)
        return mint_token(key, subject, list(roles), institution=institution, provider=provider)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("ACSP_TLS_CA", "ACSP_TLS_CERT", "ACSP_TLS_KEY"):
            env.pop(key, None)
        env.update(
            ACSP_DATABASE_URL=self.dsn,
            ACSP_NATS_URL=self.nats_url,
            ACSP_DATA_DIR=str(self.work_dir),
            ACSP_TOKEN_PUBLIC_KEY=str(self.public_key),
            ACSP_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    async def start_servers(self) -> None:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            await admin.close()
        store = self.work_dir / "nats"
        argv = [NATS_BINARY, "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd", str(store)]
        self.processes.append(Process("nats", argv, dict(os.environ), self.log_dir))
        await wait_for(lambda: _listening(self.nats_port), 10, "nats-server to listen")

    async def start_service(self, name: str, module: str, **extra: str) -> tuple[Process, str]:
        """Start a gRPC service process and return it with its bound address."""
        ready = self.work_dir / f"{name}.addr"
        ready.unlink(missing_ok=True)
        # ``extra`` may name a listen address, for a service started again on its old port.
        env = self.env(
            **{"ACSP_GRPC_LISTEN": "127.0.0.1:0", **extra, "ACSP_READY_FILE": str(ready)}
        )
        process = Process(name, [sys.executable, "-m", module], env, self.log_dir)
        self.processes.append(process)

        def address() -> str:
            if not process.alive():
                raise RuntimeError(f"{name} exited:\n{process.tail()}")
            return ready.read_text().strip() if ready.exists() else ""

        return process, await wait_for(address, 60, f"{name} to serve", 0.1)

    async def start_grant(self) -> None:
        _, self.grant_address = await self.start_service("grant", "services.grant")

    async def start_metering(self) -> Process:
        """Start metering, which declares the usage stream agents publish to and settles holds.

        Its periods are short (5 s, 1 s lateness) so that tests see holds settled quickly.
        """
        token_file = self.work_dir / "metering.token"
        token_file.write_text(self.token("metering", Role.SERVICE))
        env = self.env(
            ACSP_GRANT_ADDRESS=self.grant_address,
            ACSP_METERING_SERVICE_TOKEN_FILE=str(token_file),
            ACSP_METERING_PERIOD_S="5",
            ACSP_METERING_LATENESS_S="1",
            ACSP_GRPC_LISTEN="127.0.0.1:0",
        )
        process = Process(
            "metering", [sys.executable, "-m", "services.metering"], env, self.log_dir
        )
        self.processes.append(process)

        async def usage_stream() -> bool:
            if not process.alive():
                raise RuntimeError(f"metering exited:\n{process.tail()}")
            client = await nats.connect(self.nats_url, connect_timeout=2)
            try:
                await client.jetstream().stream_info(subjects.USAGE_STREAM)
            except nats.js.errors.NotFoundError:
                return False
            finally:
                await client.close()
            return True

        await wait_for(usage_stream, 60, "metering to declare the usage stream", 0.2)
        return process

    async def start_scheduler(
        self, name: str = "scheduler", wait_leader: bool = True, **extra: str
    ) -> tuple[Process, str]:
        """Start a scheduler replica; with ``wait_leader`` return once it leads its shard.

        A replica serves health and reads before it wins the leader lock, and answers
        leader-only calls with UNAVAILABLE until then.
        """
        settings = {
            "ACSP_GRANT_ADDRESS": self.grant_address,
            "ACSP_SCHEDULER_LEADER_POLL_S": "0.5",
            "ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S": "6",
            **extra,
        }
        process, address = await self.start_service(name, "scheduler.service", **settings)
        if wait_leader:
            await wait_for(
                lambda: self._leads(process, address), 60, f"{name} to lead its shard", 0.2
            )
        return process, address

    async def _leads(self, process: Process, address: str) -> bool:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        md = metadata(self.token("leader-probe", Role.PROGRAM_OFFICE))
        channel, scheduler = scheduler_stub(address)
        async with channel:
            try:
                await scheduler.ListNodes(scheduler_pb2.ListNodesRequest(), metadata=md, timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return False
                raise
        return True

    def start_agents(
        self,
        nodes: int,
        gpus: int = 8,
        model: str = "A100-SXM4-80GB",
        name: str = "agents",
        first: int = 0,
        state_root: Path | None = None,
        provider: str = "prov",
        faults: Path | None = None,
        usage_s: float | None = None,
        region: str = "reg",
        extra_env: dict[str, str] | None = None,
    ) -> Process:
        """Start one simulated agent process serving nodes ``n<first>`` .. ``n<first+nodes-1>``.

        Agent processes of one provider region share its command consumer, so concurrent
        processes need providers or regions of their own. ``faults`` is a fault trace to
        replay from the start, in real seconds at the default agent speed. Without it no fault
        happens. ``usage_s`` sets the usage tick, on which agents also report new checkpoint
        references. ``extra_env`` adds environment variables, e.g. ``ACSP_AGENT_TASK_USERS``.
        """
        fleet = self.work_dir / f"{name}-fleet.csv"
        rows = [f"n{i},{model},{gpus}" for i in range(first, first + nodes)]
        fleet.write_text("node,model,accelerators\n" + "\n".join(rows) + "\n")
        state_dir = (state_root or self.work_dir) / name
        argv = [
            sys.executable,
            "-m",
            "agents",
            "--backend",
            "simulated",
            "--nats-url",
            self.nats_url,
            "--fleet",
            f"{fleet}:{provider}:{region}",
            "--state-dir",
            str(state_dir),
            "--heartbeat-s",
            "1",
            "--faults",
            str(faults) if faults is not None else "none",
            "--utilization",
            "none",
        ]
        if usage_s is not None:
            argv += ["--usage-s", str(usage_s)]
        process = Process(name, argv, self.env(**(extra_env or {})), self.log_dir)
        self.processes.append(process)
        return process

    async def close(self) -> None:
        for process in reversed(self.processes):
            process.stop(grace_s=5)
        # Agents leave their tasks running for a restarted agent to adopt, and a killed
        # agent's task launcher runs until its last task ends.
        kill_processes_in(self.work_dir)
        admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            await admin.close()


def kill_processes_in(directory: Path) -> None:
    """Kill every process whose working directory is ``directory`` or below it.

    Tasks run in their agent's task folder, and a task launcher moves to the folder of each
    task it starts.
    """
    root = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def fund_grant(
    stack: Stack,
    pf_days: str = "10",
    regions: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
) -> tuple[str, str, str]:
    """Create an institution, a project and an awarded grant; return (project, grant, PI).

    ``regions`` and ``models`` become the grant's constraints when the grant is exploratory.
    """
    suffix = uuid.uuid4().hex[:8]
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    pi = f"pi-{suffix}"
    pi_md = metadata(stack.token(pi, Role.PI, institution=f"inst-{suffix}"))
    reviewer_md = metadata(stack.token(f"rev-{suffix}", Role.REVIEWER, institution="elsewhere"))
    project_id = f"proj-{suffix}"
    async with grpc.aio.insecure_channel(stack.grant_address) as channel:
        grants = grant_pb2_grpc.GrantServiceStub(channel)
        await grants.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(
                request_id=f"i-{suffix}",
                institution=grant_pb2.Institution(
                    institution_id=f"inst-{suffix}",
                    display_name="Test University",
                    country_code="NO",
                ),
            ),
            metadata=office,
            timeout=10,
        )
        await grants.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=f"p-{suffix}",
                project=grant_pb2.Project(
                    project_id=project_id,
                    institution_id=f"inst-{suffix}",
                    display_name="Test project",
                    pi_subject=pi,
                ),
            ),
            metadata=office,
            timeout=10,
        )
        start = datetime.now(UTC) - timedelta(hours=1)
        window = common_pb2.TimeWindow()
        window.start_time.FromDatetime(start)
        window.end_time.FromDatetime(start + timedelta(days=30))
        application = await grants.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=f"a-{suffix}",
                application=grant_pb2.Application(
                    project_id=project_id,
                    tier=grant_pb2.GRANT_TIER_EXPLORATORY,
                    requested_pf_days=common_pb2.Decimal(value=pf_days),
                    validity=window,
                    justification="scheduler end-to-end test",
                    regions=regions,
                    accelerator_models=models,
                ),
            ),
            metadata=pi_md,
            timeout=10,
        )
        if application.grant_id:
            # Exploratory applications within the tier's limit are awarded on submission.
            return project_id, application.grant_id, pi
        await grants.AssignReviewer(
            grant_pb2.AssignReviewerRequest(
                request_id=f"r-{suffix}",
                application_id=application.application_id,
                reviewer_subject=f"rev-{suffix}",
                reviewer_institution_id="elsewhere",
            ),
            metadata=office,
            timeout=10,
        )
        await grants.SubmitReview(
            grant_pb2.SubmitReviewRequest(
                request_id=f"s-{suffix}",
                application_id=application.application_id,
                score=5,
                comments="fine",
            ),
            metadata=reviewer_md,
            timeout=10,
        )
        decided = await grants.DecideApplication(
            grant_pb2.DecideApplicationRequest(
                request_id=f"d-{suffix}",
                application_id=application.application_id,
                decision=grant_pb2.Decision(
                    outcome=grant_pb2.DECISION_OUTCOME_AWARD, reason="test award"
                ),
            ),
            metadata=office,
            timeout=10,
        )
    return project_id, decided.grant_id, pi


def scheduler_stub(
    address: str,
) -> tuple[grpc.aio.Channel, scheduler_pb2_grpc.SchedulerServiceStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, scheduler_pb2_grpc.SchedulerServiceStub(channel)
