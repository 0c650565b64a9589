"""``acsp up`` against the PostgreSQL and NATS already running, SIGTERM, and child failures.

These tests need PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and NATS with
JetStream on 127.0.0.1:4222. Each run gets its own database, created and dropped here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
import pytest_asyncio

from acsp.client import AsyncClient
from acsp.mesh import BackgroundMesh, LocalMesh, MeshConfig, ProcessSpec, load_mesh
from acsp.mesh._ports import is_listening
from acsp.mesh.endpoints import MeshInfo
from acsp.mesh.health import check_health
from acsp.mesh.supervisor import MeshStartError
from acsp.v1 import grant_pb2
from tests.conftest import make_mesh_dir
from tests.mesh.checks import SERVICE_FULL_NAMES, mesh_credentials, reflected_services

EXTERNAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432"
EXTERNAL_NATS = "nats://127.0.0.1:4222"
START_TIMEOUT_S = 90.0


async def _poll(condition, timeout_s: float, description: str, interval_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {description}")
        await asyncio.sleep(interval_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still passes kill(0), so count it as gone once it no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest_asyncio.fixture
async def external_database() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432, dropped afterwards."""
    name = f"acsp_mesh_{uuid.uuid4().hex[:12]}"
    await _execute_on_postgres(f'CREATE DATABASE "{name}"')
    yield f"{EXTERNAL_POSTGRES}/{name}"
    await _execute_on_postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = make_mesh_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Servers:
    """Which PostgreSQL and NATS a test mesh uses."""

    kind: str
    """``embedded``, or ``external`` for the servers already running on this machine."""
    database_url: str | None = None
    """The fresh database for ``external``."""


@pytest.fixture(params=["embedded", "external"])
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    if request.param == "embedded":
        yield Servers("embedded")
        return
    name = f"acsp_mesh_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute_on_postgres(f'CREATE DATABASE "{name}"'))
    yield Servers("external", f"{EXTERNAL_POSTGRES}/{name}")
    asyncio.run(_execute_on_postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _execute_on_postgres(statement: str) -> None:
    connection = await asyncpg.connect(f"{EXTERNAL_POSTGRES}/postgres", timeout=10)
    try:
        await connection.execute(statement, timeout=30)
    finally:
        await connection.close(timeout=5)


def _up_env(servers: Servers) -> tuple[dict[str, str], int]:
    """Return the environment and the fleet size for ``acsp up`` on ``servers``."""
    env = dict(os.environ)
    env.pop("ACSP_TOKEN", None)
    env.pop("ACSP_DATABASE_URL", None)
    env.pop("ACSP_NATS_URL", None)
    if servers.database_url is None:
        return env, 1
    env.update(ACSP_DATABASE_URL=servers.database_url, ACSP_NATS_URL=EXTERNAL_NATS)
    # No fleet on the shared NATS server: its subjects would reach other test runs.
    return env, 0


async def _start_acsp_up(
    data_dir: Path, env: dict[str, str], agents: int
) -> tuple[asyncio.subprocess.Process, Path]:
    """Start ``acsp up`` and wait for its mesh file; return the process and its output file."""
    log_path = data_dir / "acsp-up.out"
    with log_path.open("wb") as log:
        up = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "acsp.cli.main",
            "up",
            "--agents",
            str(agents),
            "--data-dir",
            str(data_dir),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    mesh_file = data_dir / "mesh.json"
    try:
        await _poll(
            lambda: mesh_file.exists() or up.returncode is not None,
            START_TIMEOUT_S,
            "acsp up to write its mesh file",
        )
    except BaseException:
        up.kill()
        await up.wait()
        raise
    assert up.returncode is None, log_path.read_text()
    return up, log_path


async def test_acsp_up_serves_then_stops_cleanly(servers: Servers, data_dir: Path):
    env, agents = _up_env(servers)
    expected = {"grant", "metering", "scheduler"}
    if servers.database_url is None:
        expected |= {"postgres", "nats-server", "agents"}
    up, log_path = await _start_acsp_up(data_dir, env, agents)
    mesh_file = data_dir / "mesh.json"
    try:
        info = load_mesh(data_dir)
        pids = json.loads(mesh_file.read_text())["pids"]
        assert set(pids) == expected
        if servers.database_url is not None:
            assert info.database_url == servers.database_url
            assert info.nats_url == EXTERNAL_NATS

        assert await _run_cli(["status", "--data-dir", str(data_dir)], env) == 0
        for name in info.endpoints:
            assert SERVICE_FULL_NAMES[name] in await reflected_services(info, name)

        token = await _mint_token_with_cli(data_dir, env)
        async with AsyncClient.from_mesh(info, token=token) as client:
            await client.grants.ListInstitutions(grant_pb2.ListInstitutionsRequest())
        async with AsyncClient.from_mesh(info, token=None) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.grants.ListInstitutions(grant_pb2.ListInstitutionsRequest())
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

        ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in info.endpoints.values()]
        if servers.database_url is None:
            for url in (info.database_url, info.nats_url):
                port = urlsplit(url).port
                assert port is not None
                ports.append(port)
        up.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(up.wait(), 60)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()

    assert returncode == 0, log_path.read_text()
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) outlived acsp up"
    for port in ports:
        assert not is_listening("127.0.0.1", port), f"port {port} still listens"
    assert not mesh_file.exists()
    assert await _run_cli(["status", "--data-dir", str(data_dir)], env) == 3


async def test_acsp_up_restarts_a_killed_service(data_dir: Path, external_database: str):
    env, agents = _up_env(Servers("external", external_database))
    up, log_path = await _start_acsp_up(data_dir, env, agents)
    try:
        info = load_mesh(data_dir)
        pids = json.loads((data_dir / "mesh.json").read_text())["pids"]
        os.kill(pids["metering"], signal.SIGKILL)

        def restarted_pid() -> int | None:
            pid = json.loads((data_dir / "mesh.json").read_text())["pids"].get("metering")
            return pid if pid != pids["metering"] else None

        await _poll(lambda: restarted_pid() is not None, 30, "a new metering pid")
        new_pid = restarted_pid()
        endpoint = info.endpoints["metering"]
        await _poll(
            lambda: f"metering is SERVING again at {endpoint}" in log_path.read_text(),
            START_TIMEOUT_S,
            "metering to serve again",
        )
        assert up.returncode is None, log_path.read_text()
        # Clients keep the endpoints they read before the crash.
        assert load_mesh(data_dir).endpoints == info.endpoints
        report = await check_health("metering", endpoint, mesh_credentials(info))
        assert report.status == "SERVING", report.detail
        up.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(up.wait(), 60)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    output = log_path.read_text()
    assert returncode == 0, output
    assert f"metering (pid {pids['metering']}) was killed by SIGKILL" in output
    assert "restarting it in 0.5 s (restart 1 of at most 5 within 60 s)" in output
    for name, pid in {**pids, "metering (restarted)": new_pid}.items():
        assert pid is not None
        assert not _alive(pid), f"{name} (pid {pid}) outlived acsp up"
    assert not (data_dir / "mesh.json").exists()


async def _run_cli(arguments: list[str], env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "acsp.cli.main",
        *arguments,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def _mint_token_with_cli(data_dir: Path, env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "acsp.cli.main",
        "token",
        "--data-dir",
        str(data_dir),
        "--role",
        "program_office",
        "--subject",
        "test-admin",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().strip()


def _external_config(
    data_dir: Path, database_url: str, *processes: ProcessSpec, max_restarts: int = 5
) -> MeshConfig:
    return MeshConfig(
        data_dir=data_dir,
        database_url=database_url,
        nats_url=EXTERNAL_NATS,
        processes=processes,
        start_timeout_s=20,
        stop_grace_s=5,
        max_restarts=max_restarts,
        restart_delay_s=0.05,
    )


async def test_child_death_is_reported_with_log_tail(external_database: str, data_dir: Path):
    trigger = data_dir / "die-now"
    script = (
        "import pathlib, sys, time\n"
        f"trigger = pathlib.Path({str(trigger)!r})\n"
        "while not trigger.exists():\n"
        "    time.sleep(0.05)\n"
        "print('simulated fleet lost its NATS credentials', flush=True)\n"
        "sys.exit(3)\n"
    )
    spec = ProcessSpec("fleet", [sys.executable, "-c", script], serves_grpc=False)
    config = _external_config(data_dir, external_database, spec, max_restarts=0)
    async with LocalMesh(config) as mesh:
        trigger.touch()
        failure = await asyncio.wait_for(mesh.wait_failure(), 30)
    assert failure.name == "fleet"
    assert failure.returncode == 3
    assert "exited with status 3" in failure.description
    assert "lost its NATS credentials" in failure.log_tail


async def test_child_that_exits_once_is_restarted(external_database: str, data_dir: Path):
    marker = data_dir / "crashed-once"
    script = (
        "import pathlib, sys, time\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    while not marker.with_suffix('.go').exists():\n"
        "        time.sleep(0.05)\n"
        "    marker.touch()\n"
        "    sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    spec = ProcessSpec("fleet", [sys.executable, "-c", script], serves_grpc=False)
    async with LocalMesh(_external_config(data_dir, external_database, spec)) as mesh:
        first_pid = mesh.pids["fleet"]
        marker.with_suffix(".go").touch()

        def file_pid() -> int:
            return int(load_mesh(data_dir).extra["pids"]["fleet"])

        await _poll(lambda: file_pid() != first_pid, 30, "the fleet to start again")
        second_pid = file_pid()
        assert mesh.pids["fleet"] == second_pid
        assert _alive(second_pid)
        failure = asyncio.ensure_future(mesh.wait_failure())
        await asyncio.sleep(0.5)
        assert not failure.done()
        failure.cancel()
    assert not _alive(second_pid)


async def test_kill_and_restart_during_restart_delay(external_database: str, data_dir: Path):
    trigger = data_dir / "exit-now"
    script = (
        "import pathlib, sys, time\n"
        f"trigger = pathlib.Path({str(trigger)!r})\n"
        "print('fleet run', flush=True)\n"
        "while not trigger.exists():\n"
        "    time.sleep(0.05)\n"
        "trigger.unlink()\n"
        "sys.exit(3)\n"
    )
    spec = ProcessSpec("fleet", [sys.executable, "-c", script], serves_grpc=False)
    config = dataclasses.replace(
        _external_config(data_dir, external_database, spec), restart_delay_s=1.5
    )
    log = data_dir / "logs" / "fleet.log"
    async with LocalMesh(config) as mesh:
        trigger.touch()
        await _poll(lambda: "fleet" not in mesh.pids, 10, "the fleet to exit")
        # The supervisor now waits 1.5 s before its own restart of the fleet.
        await mesh.kill_and_restart("fleet", 0)
        pid = mesh.pids["fleet"]
        # acsp status reports the fleet by the pid in the mesh file.
        assert load_mesh(data_dir).extra["pids"]["fleet"] == pid
        await asyncio.sleep(2.5)
        assert mesh.pids["fleet"] == pid
        assert log.read_text().count("fleet run") == 2
    assert not _alive(pid)


async def test_kill_and_restart_during_stop(external_database: str, data_dir: Path):
    script = "import time; print('fleet run', flush=True); time.sleep(600)"
    spec = ProcessSpec("fleet", [sys.executable, "-c", script], serves_grpc=False)
    mesh = LocalMesh(_external_config(data_dir, external_database, spec))
    await mesh.start()
    log = data_dir / "logs" / "fleet.log"
    await _poll(lambda: "fleet run" in log.read_text(), 10, "the fleet to run")
    children = {child.name: child for child in mesh._children}
    restart = asyncio.ensure_future(mesh.kill_and_restart("fleet", 1.0))
    try:
        await _poll(lambda: "fleet" not in mesh.pids, 10, "the fleet to be killed")
    finally:
        await mesh.stop()
    try:
        with pytest.raises(MeshStartError, match=r"cannot start fleet again.*the mesh is stopping"):
            await asyncio.wait_for(restart, 10)
        assert children["fleet"].returncode is not None
    finally:
        # A fleet started after the stop would outlive the test.
        await children["fleet"].kill()
    assert log.read_text().count("fleet run") == 1


async def test_restarts_stop_at_the_limit(external_database: str, data_dir: Path):
    # It outlives the start's check that the fleet runs, then exits each time.
    script = "import time; print('fleet run', flush=True); time.sleep(1); raise SystemExit(3)"
    spec = ProcessSpec("fleet", [sys.executable, "-c", script], serves_grpc=False)
    mesh = LocalMesh(_external_config(data_dir, external_database, spec, max_restarts=2))
    await mesh.start()
    try:
        failure = await asyncio.wait_for(mesh.wait_failure(), 30)
    finally:
        await mesh.stop()
    assert failure.name == "fleet"
    assert failure.returncode == 3
    assert "exited with status 3" in failure.description
    assert f"log: {data_dir / 'logs' / 'fleet.log'}" in failure.description
    assert "restarted 2 times within 60 s, the maximum, so the mesh stops" in failure.description
    assert (data_dir / "logs" / "fleet.log").read_text().count("fleet run") == 3


async def test_start_failure_names_process_and_stops_rest(external_database: str, data_dir: Path):
    sleeper = ProcessSpec(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], serves_grpc=False
    )
    broken = ProcessSpec(
        "broken", [sys.executable, "-c", "print('ACSP_GRPC_LISTEN: cannot bind'); exit(2)"]
    )
    mesh = LocalMesh(_external_config(data_dir, external_database, sleeper, broken))
    with pytest.raises(MeshStartError) as raised:
        await mesh.start()
    message = str(raised.value)
    assert "broken" in message
    assert "exited with status 2" in message
    assert "cannot bind" in message
    assert mesh.pids == {}
    assert not (data_dir / "mesh.json").exists()


def test_external_urls_come_from_environment(tmp_path: Path):
    config = MeshConfig.from_env(
        tmp_path,
        environ={"ACSP_DATABASE_URL": "postgresql://db/x", "ACSP_NATS_URL": " nats://n:1 "},
    )
    assert config.database_url == "postgresql://db/x"
    assert config.nats_url == "nats://n:1"
    assert urlsplit(config.nats_url).port == 1
    assert MeshConfig.from_env(tmp_path, environ={}).database_url is None


def test_background_mesh_runs_in_blocking_code(data_dir: Path):
    sleeper = ProcessSpec(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], serves_grpc=False
    )
    config = MeshConfig(
        data_dir=data_dir,
        database_url=f"{EXTERNAL_POSTGRES}/test",
        nats_url=EXTERNAL_NATS,
        processes=(sleeper,),
        start_timeout_s=20,
        stop_grace_s=5,
    )
    with BackgroundMesh(config) as mesh:
        pid = load_mesh(data_dir).extra["pids"]["sleeper"]
        assert _alive(pid)
        assert mesh.info.nats_url == EXTERNAL_NATS
        assert mesh.token("researcher", "carol")
    assert not _alive(pid)
    assert not (data_dir / "mesh.json").exists()


LEAVER = """
import subprocess, sys, time
grandchild = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
)
print(grandchild.pid, flush=True)
time.sleep(600)
"""

SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from acsp.mesh import LocalMesh, MeshConfig, ProcessSpec

async def main():
    data_dir = Path(sys.argv[1])
    leaver = ProcessSpec("leaver", [sys.executable, "-c", sys.argv[2]], serves_grpc=False)
    config = MeshConfig(
        data_dir=data_dir, database_url=sys.argv[3], nats_url=sys.argv[4],
        processes=(leaver,), start_timeout_s=20, stop_grace_s=3, stop_orphans=True,
    )
    async with LocalMesh(config):
        log = data_dir / "logs" / "leaver.log"
        while not log.exists() or not log.read_text().strip():
            await asyncio.sleep(0.05)
        print(log.read_text().strip(), flush=True)

asyncio.run(main())
"""


async def test_stop_orphans_ends_processes_left_by_children(data_dir: Path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUPERVISOR,
        str(data_dir),
        LEAVER,
        f"{EXTERNAL_POSTGRES}/test",
        EXTERNAL_NATS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    grandchild = int(stdout.decode().split()[-1])
    assert not _alive(grandchild)
    assert "left behind by the mesh" in stderr.decode()


ORPHAN_MAKER = """
import subprocess, sys, time
# The intermediate process exits at once, so its child, which exits after half a second, is
# adopted by the subreaper that runs this process.
intermediate = subprocess.run(
    [sys.executable, "-c",
     "import subprocess, sys; "
     "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.5)']); "
     "print(p.pid)"],
    capture_output=True, text=True, check=True,
)
print(intermediate.stdout.strip(), flush=True)
time.sleep(600)
"""

QUITTER = """
import sys, time
time.sleep(float(sys.argv[1]))
sys.exit(7)
"""

REAPING_SUPERVISOR = """
import asyncio, os, sys
from pathlib import Path
from acsp.mesh import LocalMesh, MeshConfig, ProcessSpec

def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False

async def main():
    data_dir = Path(sys.argv[1])
    maker = ProcessSpec("maker", [sys.executable, "-c", sys.argv[2]], serves_grpc=False)
    quitter = ProcessSpec(
        "quitter", [sys.executable, "-c", sys.argv[3], "8"], serves_grpc=False
    )
    config = MeshConfig(
        data_dir=data_dir, database_url=sys.argv[4], nats_url=sys.argv[5],
        processes=(maker, quitter), start_timeout_s=20, stop_grace_s=3, stop_orphans=True,
        max_restarts=0,
    )
    async with LocalMesh(config) as mesh:
        log = data_dir / "logs" / "maker.log"
        while not log.exists() or not log.read_text().strip():
            await asyncio.sleep(0.05)
        orphan = int(log.read_text().split()[-1])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 6
        while not gone(orphan) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        print("orphan", "reaped" if gone(orphan) else "not reaped", flush=True)
        failure = await asyncio.wait_for(mesh.wait_failure(), 20)
        print("failure", failure.name, failure.returncode, flush=True)

asyncio.run(main())
"""


async def test_orphans_reaped_while_mesh_runs(data_dir: Path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REAPING_SUPERVISOR,
        str(data_dir),
        ORPHAN_MAKER,
        QUITTER,
        f"{EXTERNAL_POSTGRES}/test",
        EXTERNAL_NATS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    # A zombie still passes kill(pid, 0), so the orphan is gone only once it was reaped.
    assert "orphan reaped" in lines, stderr.decode()
    # The mesh still reports the exit status of a child of its own.
    assert "failure quitter 7" in lines, stderr.decode()


HOLDER = """
import asyncio, json, sys
from pathlib import Path
from acsp.mesh import LocalMesh, MeshConfig, ProcessSpec

async def main():
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    processes = tuple(ProcessSpec(f"sleeper-{i}", sleep, serves_grpc=False) for i in range(2))
    config = MeshConfig(
        data_dir=Path(sys.argv[1]), database_url=sys.argv[2], nats_url=sys.argv[3],
        processes=processes, start_timeout_s=20,
    )
    async with LocalMesh(config) as mesh:
        print(json.dumps(mesh.pids), flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_children_die_with_a_killed_supervisor(data_dir: Path):
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(data_dir),
        f"{EXTERNAL_POSTGRES}/test",
        EXTERNAL_NATS,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        pids = json.loads(line)
        assert sorted(pids) == ["sleeper-0", "sleeper-1"]
    finally:
        holder.kill()
        await holder.wait()
    for name, pid in pids.items():
        await _poll(lambda pid=pid: not _alive(pid), 10, f"{name} (pid {pid}) to exit")


async def test_cancelled_start_stops_started_children(external_database: str, data_dir: Path):
    never_serves = ProcessSpec(
        "silent", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    )
    mesh = LocalMesh(_external_config(data_dir, external_database, never_serves))
    start = asyncio.ensure_future(mesh.start())
    log_path = data_dir / "logs" / "silent.log"
    await _poll(
        lambda: log_path.exists() and "up" in log_path.read_text(), 30, "the child to start"
    )
    pid = mesh.pids["silent"]
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert not _alive(pid)
    assert mesh.pids == {}


async def _run_cli_output(arguments: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``acsp`` with ``arguments``; return its exit status and its stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "acsp.cli.main",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_acsp_down_stops_running_mesh(data_dir: Path, external_database: str):
    env, agents = _up_env(Servers("external", external_database))
    up, log_path = await _start_acsp_up(data_dir, env, agents)
    try:
        pids = json.loads((data_dir / "mesh.json").read_text())["pids"]
        code, output = await _run_cli_output(["down", "--data-dir", str(data_dir)], env)
        assert code == 0, output
        assert "mesh stopped" in output
        # acsp down returns once the supervisor exited, so nothing is left to wait for.
        returncode = await asyncio.wait_for(up.wait(), 10)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    assert returncode == 0, log_path.read_text()
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) outlived acsp down"
    assert not (data_dir / "mesh.json").exists()

    code, output = await _run_cli_output(["down", "--data-dir", str(data_dir)], env)
    assert code == 3, output
    assert f"no mesh runs in {data_dir}" in output
    assert "nothing to stop" in output


def _write_mesh_file(data_dir: Path, supervisor_pid: int) -> Path:
    info = MeshInfo(
        data_dir=data_dir,
        endpoints={"grant": "127.0.0.1:1"},
        ca_cert=data_dir / "ca.pem",
        token_key=data_dir / "token" / "signing.key",
        database_url=f"{EXTERNAL_POSTGRES}/test",
        nats_url=EXTERNAL_NATS,
        supervisor_pid=supervisor_pid,
    )
    return info.write()


async def test_acsp_down_spares_process_reusing_pid(data_dir: Path):
    # A process that started after the mesh file was written is not the supervisor that wrote
    # it, even though it has the pid that the file names.
    sleeper = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        mesh_file = _write_mesh_file(data_dir, sleeper.pid)
        an_hour_ago = mesh_file.stat().st_mtime - 3600
        os.utime(mesh_file, (an_hour_ago, an_hour_ago))
        code, output = await _run_cli_output(
            ["down", "--data-dir", str(data_dir)], dict(os.environ)
        )
        assert code == 3, output
        assert f"pid {sleeper.pid}) that wrote its mesh file is not running" in output
        assert sleeper.returncode is None
        assert _alive(sleeper.pid)
    finally:
        sleeper.kill()
        await sleeper.wait()


async def test_acsp_down_reports_dead_supervisor(data_dir: Path):
    finished = await asyncio.create_subprocess_exec("true")
    await finished.wait()
    _write_mesh_file(data_dir, finished.pid)
    code, output = await _run_cli_output(["down", "--data-dir", str(data_dir)], dict(os.environ))
    assert code == 3, output
    assert "is not running" in output
    assert f"acsp status --data-dir {data_dir}" in output
