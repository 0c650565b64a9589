"""What a job's task can read in the local mesh: the mesh's secrets only when it shares its uid."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from acsp.client import AsyncClient
from acsp.mesh import LocalMesh, MeshConfig, MeshInfo, ProcessSpec, default_processes
from acsp.mesh.credentials import mint_token
from acsp.mesh.failures import MeshStartError
from acsp.mesh.fleet_tasks import (
    TASK_USER,
    TASK_USER_ENV,
    TASK_USERS_ENV,
    FleetTasks,
    plan_fleet_tasks,
    prepare_fleet_tasks,
)
from acsp.mesh.postgres import cluster_dir_for
from acsp.v1 import common_pb2, grant_pb2, scheduler_pb2
from agents.state_lock import StateFolderLock
from tests.conftest import RunningMesh, make_mesh_dir

pytestmark = pytest.mark.timeout(240)
in_session_loop = pytest.mark.asyncio(loop_scope="session")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only a mesh run by root can run tasks as another user"
)

# Prints the task's uid, then whether it could read each file named as an argument.
PROBE = """
echo "uid=$(id -u)"
for path in "$@"; do
    if cat "$path" > /dev/null 2>&1; then echo "read $path"; else echo "denied $path"; fi
done
"""
SECRET_FILES = (
    "secrets/postgres.password",
    "secrets/nats.password",
    "secrets/nats.conf",
    "token/signing.key",
    "tls/ca.key",
    "tls/client.key",
)
JOB_TIMEOUT_S = 90.0


def _secret_paths(info: MeshInfo, pids: dict[str, int]) -> list[str]:
    """Return the mesh's secret files and the environments of its processes."""
    paths = [str(info.data_dir / name) for name in SECRET_FILES]
    paths += [f"/proc/{pid}/environ" for pid in (*pids.values(), os.getpid())]
    return paths


async def _run_probe(info: MeshInfo, token: str, paths: list[str]) -> str:
    """Run :data:`PROBE` as a job of a new project on ``paths`` and return its output."""
    suffix = uuid.uuid4().hex[:8]
    institution, project, pi = f"inst-{suffix}", f"proj-{suffix}", f"pi-{suffix}"
    async with AsyncClient.from_mesh(info, token=token) as office:
        await office.grants.CreateInstitution(
            grant_pb2.CreateInstitutionRequest(
                request_id=f"i-{suffix}",
                institution=grant_pb2.Institution(
                    institution_id=institution, display_name="Probe University", country_code="NO"
                ),
            )
        )
        await office.grants.CreateProject(
            grant_pb2.CreateProjectRequest(
                request_id=f"p-{suffix}",
                project=grant_pb2.Project(
                    project_id=project,
                    institution_id=institution,
                    display_name="Probe",
                    pi_subject=pi,
                ),
            )
        )
    pi_token = _token(info, "pi", pi, institution)
    async with AsyncClient.from_mesh(info, token=pi_token) as client:
        start = datetime.now(UTC) - timedelta(hours=1)
        window = common_pb2.TimeWindow()
        window.start_time.FromDatetime(start)
        window.end_time.FromDatetime(start + timedelta(days=30))
        application = await client.grants.SubmitApplication(
            grant_pb2.SubmitApplicationRequest(
                request_id=f"a-{suffix}",
                application=grant_pb2.Application(
                    project_id=project,
                    tier=grant_pb2.GRANT_TIER_EXPLORATORY,
                    requested_pf_days=common_pb2.Decimal(value="1"),
                    validity=window,
                    justification="task isolation test",
                ),
            )
        )
        assert application.grant_id, "an exploratory grant within the cap is awarded at once"
        spec = scheduler_pb2.JobSpec(
            name="probe",
            project_id=project,
            grant_id=application.grant_id,
            task_count=1,
            accelerator_millis_per_task=1000,
            wall_time_seconds=600,
            command=["/bin/sh", "-c", PROBE, "probe", *paths],
        )
        submitted = await client.scheduler.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec))
        job_id = submitted.job.job_id
        job = await _wait_ended(client, job_id)
        assert job.state == scheduler_pb2.JOB_STATE_COMPLETED, job.state_message
        output = await client.scheduler.ReadTaskOutput(
            scheduler_pb2.ReadTaskOutputRequest(job_id=job_id, task_index=0)
        )
    return output.output.decode()


async def _wait_ended(client: AsyncClient, job_id: str) -> scheduler_pb2.Job:
    ended = {
        scheduler_pb2.JOB_STATE_COMPLETED,
        scheduler_pb2.JOB_STATE_FAILED,
        scheduler_pb2.JOB_STATE_CANCELLED,
        scheduler_pb2.JOB_STATE_TIMED_OUT,
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOB_TIMEOUT_S
    while True:
        job = await client.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        if job.state in ended:
            return job
        assert loop.time() < deadline, f"job {job_id} still {job.state} after {JOB_TIMEOUT_S} s"
        await asyncio.sleep(0.2)


def _token(info: MeshInfo, role: str, subject: str, institution: str | None = None) -> str:
    return mint_token(info.token_key, role=role, subject=subject, institution=institution)


def _assert_nothing_read(output: str, paths: list[str]) -> None:
    lines = output.splitlines()
    uid = int(lines[0].removeprefix("uid="))
    assert uid != os.geteuid(), "the task ran as the mesh's own user"
    assert uid != 0
    for path in paths:
        assert f"denied {path}" in lines, f"the task could read {path}:\n{output}"


@needs_root
@in_session_loop
async def test_task_cannot_read_mesh_secrets(mesh: RunningMesh):
    paths = _secret_paths(mesh.info, mesh.supervisor.pids)

    output = await _run_probe(mesh.info, mesh.token("program_office"), paths)

    _assert_nothing_read(output, paths)


@pytest.fixture
def reachable_data_dir() -> Iterator[Path]:
    """A data directory that every user can reach, so the fleet's state folder stays in it."""
    data_dir = make_mesh_dir()
    yield data_dir
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def private_data_dir() -> Iterator[Path]:
    """A data directory under a folder that other users cannot search, like ``/root/.acsp``."""
    parent = Path(tempfile.mkdtemp(prefix="acsp-private-"))
    parent.chmod(0o700)
    data_dir = parent / "mesh"
    # As root both of these move out of the unreachable data directory.
    moved = [plan_fleet_tasks(data_dir, os.environ).state_dir, cluster_dir_for(data_dir)]
    yield data_dir
    for folder in [parent, *moved]:
        shutil.rmtree(folder, ignore_errors=True)


@needs_root
@in_session_loop
async def test_task_of_private_data_dir_runs_isolated(private_data_dir: Path):
    config = MeshConfig(data_dir=private_data_dir, agents=1, database_url=None, nats_url=None)
    plan = config.fleet_tasks()
    assert plan is not None
    async with LocalMesh(config) as supervisor:
        paths = _secret_paths(supervisor.info, supervisor.pids)
        token = supervisor.token("program_office", "office")
        output = await _run_probe(supervisor.info, token, paths)

    _assert_nothing_read(output, paths)
    # The tasks' working directories cannot be in the data directory, which they cannot reach.
    assert plan.state_dir.parent == Path(tempfile.gettempdir())


def test_plan_uses_mesh_task_user_as_root(reachable_data_dir: Path):
    plan = plan_fleet_tasks(reachable_data_dir, {})

    if os.geteuid() == 0:
        assert plan.env == {TASK_USER_ENV: TASK_USER}
        assert plan.separate_user
    else:
        assert plan.env == {}
        assert not plan.separate_user
    assert plan.state_dir == reachable_data_dir.resolve() / "agents"


@pytest.mark.parametrize("variable", [TASK_USER_ENV, TASK_USERS_ENV])
def test_plan_keeps_configured_task_user(tmp_path: Path, variable: str):
    plan = plan_fleet_tasks(tmp_path, {variable: "someone"})

    assert plan.env == {}
    assert plan.separate_user


def test_shared_uid_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="acsp.mesh")

    prepare_fleet_tasks(FleetTasks(tmp_path / "agents", {}, separate_user=False))

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"uid {os.geteuid()}" in message
    assert "passwords, TLS keys and token signing key" in message
    assert not (tmp_path / "agents").exists()


def test_state_dir_symlink_is_rejected(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "agents"
    link.symlink_to(target)
    plan = FleetTasks(link, {}, separate_user=True)

    with pytest.raises(MeshStartError, match="not a folder of uid"):
        prepare_fleet_tasks(plan)


def test_state_dir_gets_mode_0711(tmp_path: Path):
    state_dir = tmp_path / "agents"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)

    prepare_fleet_tasks(FleetTasks(state_dir, {}, separate_user=True))

    assert state_dir.stat().st_mode & 0o777 == 0o711


def _earlier_fleet_state(data_dir: Path) -> Path:
    """Write a state file and a spool segment where a mesh that ran tasks as itself kept them."""
    earlier = data_dir / "agents"
    (earlier / "spool").mkdir(parents=True)
    (earlier / "state.json").write_text('{"nodes": {}}')
    (earlier / "spool" / "segment-1").write_bytes(b"unsent usage")
    return earlier


def test_earlier_state_moves_to_reachable_folder(private_data_dir: Path):
    plan = plan_fleet_tasks(private_data_dir, {TASK_USER_ENV: "someone"})
    earlier = _earlier_fleet_state(private_data_dir)
    try:
        prepare_fleet_tasks(plan)

        assert plan.state_dir != earlier
        assert not earlier.exists()
        assert (plan.state_dir / "state.json").read_text() == '{"nodes": {}}'
        assert (plan.state_dir / "spool" / "segment-1").read_bytes() == b"unsent usage"
        assert plan.state_dir.stat().st_mode & 0o777 == 0o711
    finally:
        shutil.rmtree(plan.state_dir, ignore_errors=True)


def test_earlier_state_of_running_agent_stays(private_data_dir: Path):
    plan = plan_fleet_tasks(private_data_dir, {TASK_USER_ENV: "someone"})
    earlier = _earlier_fleet_state(private_data_dir)
    lock = StateFolderLock.acquire(earlier)
    try:
        with pytest.raises(MeshStartError, match=f"state folder {earlier}"):
            prepare_fleet_tasks(plan)
    finally:
        lock.release()
        shutil.rmtree(plan.state_dir, ignore_errors=True)

    assert (earlier / "state.json").exists()
    assert not plan.state_dir.exists()


def test_earlier_state_kept_beside_newer(private_data_dir: Path, caplog: pytest.LogCaptureFixture):
    plan = plan_fleet_tasks(private_data_dir, {TASK_USER_ENV: "someone"})
    earlier = _earlier_fleet_state(private_data_dir)
    plan.state_dir.mkdir(mode=0o711)
    caplog.set_level(logging.WARNING, logger="acsp.mesh")
    try:
        prepare_fleet_tasks(plan)
    finally:
        shutil.rmtree(plan.state_dir, ignore_errors=True)

    assert (earlier / "state.json").exists()
    messages = [record.getMessage() for record in caplog.records]
    assert any(str(earlier) in message for message in messages), messages


def test_earlier_state_copied_across_file_systems(
    private_data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    plan = plan_fleet_tasks(private_data_dir, {TASK_USER_ENV: "someone"})
    earlier = _earlier_fleet_state(private_data_dir)
    real_rename = Path.rename

    def rename_within_file_system(source: Path, target: Path) -> Path:
        if source == earlier:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(source, target)

    monkeypatch.setattr(Path, "rename", rename_within_file_system)
    try:
        prepare_fleet_tasks(plan)

        assert not earlier.exists()
        assert (plan.state_dir / "spool" / "segment-1").read_bytes() == b"unsent usage"
        assert [path.name for path in plan.state_dir.parent.glob(f".{plan.state_dir.name}-*")] == []
    finally:
        shutil.rmtree(plan.state_dir, ignore_errors=True)


def test_copied_state_synced_before_removal(
    private_data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    # The copy must be on disk before the earlier folder goes, or a crash between the two
    # loses the spool's unsent usage samples.
    plan = plan_fleet_tasks(private_data_dir, {TASK_USER_ENV: "someone"})
    earlier = _earlier_fleet_state(private_data_dir)
    real_rename = Path.rename
    real_fsync = os.fsync
    real_rmtree = shutil.rmtree
    events: list[str] = []

    def rename_within_file_system(source: Path, target: Path) -> Path:
        if source == earlier:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(source, target)

    def fsync(descriptor: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        if path.parent.name == "spool" or path.name == "state.json":
            events.append(f"sync {path.parent.name}/{path.name}")
        real_fsync(descriptor)

    def rmtree(path: Path, *args: Any, **kwargs: Any) -> None:
        if Path(path) == earlier:
            events.append("remove earlier")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", rename_within_file_system)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    try:
        prepare_fleet_tasks(plan)
    finally:
        real_rmtree(plan.state_dir, ignore_errors=True)

    assert "remove earlier" in events
    removed = events.index("remove earlier")
    synced = events[:removed]
    assert any(event.endswith("/state.json") for event in synced), events
    assert any(event == "sync spool/segment-1" for event in synced), events


def _fleet_of(specs: tuple[ProcessSpec, ...]) -> ProcessSpec:
    return next(spec for spec in specs if spec.name == "agents")


@needs_root
def test_default_processes_prepare_task_user(private_data_dir: Path):
    fleet = _fleet_of(default_processes(1, private_data_dir, {}))

    state_dir = Path(fleet.argv[fleet.argv.index("--state-dir") + 1])
    assert fleet.env[TASK_USER_ENV] == TASK_USER
    assert pwd.getpwnam(TASK_USER).pw_uid != 0
    assert state_dir.is_dir()
    assert state_dir.stat().st_mode & 0o777 == 0o711


def test_default_processes_warn_of_shared_uid(
    reachable_data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # As any user but root, the fleet's tasks keep the mesh's uid.
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    caplog.set_level(logging.WARNING, logger="acsp.mesh")

    fleet = _fleet_of(default_processes(1, reachable_data_dir, {}))

    assert TASK_USER_ENV not in fleet.env
    messages = [record.getMessage() for record in caplog.records]
    assert any("uid 4242" in message for message in messages), messages
