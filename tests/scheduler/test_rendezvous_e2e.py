"""The rendezvous variables of a job's tasks, with a real scheduler, NATS and agents.

Two agent processes serve one node of two accelerators each, in two regions with hosts and
port ranges of their own. Each task of a 4-task gang on them writes its ``ACSP_*`` variables
and its hosts file to a folder of the test. The test checks that the tasks agree on the rendezvous
and that their indexes match the placement that the scheduler reports. A second gang's task
0 listens on the rendezvous port, and the other tasks connect to it there. Four jobs whose task
0 run on one node at once, with a range of four ports, bind one port each.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(240)

TASKS = 4
# Host and rendezvous port range of the one node of each region.
NODES = {
    "reg": ("n0", "127.0.0.1", (31000, 31099)),
    "reg2": ("n1", "localhost", (32000, 32099)),
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path / "stack")
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


def recorder(folder: Path) -> list[str]:
    """Return a command that writes the task's ACSP_ variables and hosts file to ``folder``."""
    out = shlex.quote(str(folder))
    script = (
        f'env | grep "^ACSP_" > {out}/"$ACSP_TASK_INDEX".tmp && '
        f'cp "$ACSP_TASK_HOSTS_FILE" {out}/"$ACSP_TASK_INDEX".hosts && '
        f'mv {out}/"$ACSP_TASK_INDEX".tmp {out}/"$ACSP_TASK_INDEX".env'
    )
    return ["sh", "-c", script]


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


def start_agents(stack: Stack) -> None:
    for region, (node, host, (low, high)) in NODES.items():
        first = int(node.removeprefix("n"))
        stack.start_agents(
            nodes=1,
            gpus=2,
            first=first,
            name=f"agents-{region}",
            region=region,
            extra_env={"ACSP_AGENT_HOST": host, "ACSP_AGENT_RENDEZVOUS_PORTS": f"{low}-{high}"},
        )


async def run_job(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    md: tuple[tuple[str, str], ...],
    spec: scheduler_pb2.JobSpec,
) -> scheduler_pb2.Job:
    submitted = await scheduler.SubmitJob(
        scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
    )
    job_id = submitted.job.job_id

    async def ended() -> scheduler_pb2.Job | None:
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
        return job if job.state >= scheduler_pb2.JOB_STATE_COMPLETED else None

    job: scheduler_pb2.Job = await wait_for(ended, 90, f"job {job_id} to end", 0.2)
    assert job.state == scheduler_pb2.JOB_STATE_COMPLETED, job.state_message
    return job


async def test_tasks_find_each_other(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    single_out = tmp_path / "single"
    out.mkdir()
    single_out.mkdir()
    _, address = await stack.start_scheduler()
    start_agents(stack)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=TASKS, command=recorder(out))
        job = await run_job(scheduler, md, spec)
        single_spec = job_spec(project, grant, task_count=1, command=recorder(single_out))
        single = await run_job(scheduler, md, single_spec)

    region_of = {p.task_index: p.region_id for p in job.placements}
    assert sorted(region_of) == list(range(TASKS))
    assert sorted(set(region_of.values())) == sorted(NODES)
    host_of = {index: NODES[region][1] for index, region in region_of.items()}
    envs = {i: read_env(out / f"{i}.env") for i in range(TASKS)}

    for index, env in envs.items():
        same_node = [i for i in range(TASKS) if region_of[i] == region_of[index]]
        assert env["ACSP_TASK_INDEX"] == str(index)
        assert env["ACSP_TASK_COUNT"] == str(TASKS)
        assert env["ACSP_LOCAL_TASK_COUNT"] == str(len(same_node))
        assert env["ACSP_LOCAL_TASK_INDEX"] == str(same_node.index(index))
        assert env["ACSP_RENDEZVOUS_HOST"] == host_of[0]
        hosts = (out / f"{index}.hosts").read_text().splitlines()
        assert hosts == [host_of[i] for i in range(TASKS)]

    ports = {env["ACSP_RENDEZVOUS_PORT"] for env in envs.values()}
    assert len(ports) == 1
    low, high = NODES[region_of[0]][2]
    port = int(ports.pop())
    assert low <= port <= high
    assert job.rendezvous_port == port
    hosts_files = {env["ACSP_TASK_HOSTS_FILE"] for env in envs.values()}
    assert len(hosts_files) == TASKS
    # The agent deletes each hosts file once its task has ended.
    await wait_for(
        lambda: not any(Path(path).exists() for path in hosts_files), 30, "hosts files deleted"
    )

    _, single_host, (single_low, single_high) = NODES[single.placements[0].region_id]
    env = read_env(single_out / "0.env")
    assert env["ACSP_TASK_COUNT"] == "1"
    assert env["ACSP_LOCAL_TASK_INDEX"] == "0"
    assert env["ACSP_LOCAL_TASK_COUNT"] == "1"
    assert env["ACSP_RENDEZVOUS_HOST"] == single_host
    assert single_low <= int(env["ACSP_RENDEZVOUS_PORT"]) <= single_high
    assert (single_out / "0.hosts").read_text() == f"{single_host}\n"


MEETING = """
import os, socket, sys, time
count = int(os.environ["ACSP_TASK_COUNT"])
index = int(os.environ["ACSP_TASK_INDEX"])
address = (os.environ["ACSP_RENDEZVOUS_HOST"], int(os.environ["ACSP_RENDEZVOUS_PORT"]))
if index == 0:
    server = socket.create_server(("", address[1]))
    server.settimeout(60)
    seen = []
    for _ in range(count - 1):
        connection, _ = server.accept()
        with connection:
            seen.append(connection.recv(16).decode())
    with open(sys.argv[1], "w") as out:
        out.write(",".join(sorted(seen)))
else:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(address, timeout=5) as connection:
                connection.sendall(str(index).encode())
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
"""


async def test_tasks_meet_at_rendezvous(stack: Stack, tmp_path: Path) -> None:
    met = tmp_path / "met"
    _, address = await stack.start_scheduler()
    start_agents(stack)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    command = [sys.executable, "-c", MEETING, str(met)]
    async with channel:
        await run_job(scheduler, md, job_spec(project, grant, task_count=TASKS, command=command))

    assert met.read_text() == ",".join(str(index) for index in range(1, TASKS))


LISTENER = """
import os, pathlib, socket, sys, time
out = pathlib.Path(sys.argv[1])
if os.environ["ACSP_TASK_INDEX"] != "0":
    sys.exit(0)
port = int(os.environ["ACSP_RENDEZVOUS_PORT"])
server = socket.create_server(("127.0.0.1", port))
(out / os.environ["ACSP_JOB_ID"]).write_text(str(port))
deadline = time.monotonic() + 60
while not (out / "release").exists():
    if time.monotonic() > deadline:
        sys.exit("timed out waiting for the release file")
    time.sleep(0.1)
server.close()
"""
"""Task 0 binds its rendezvous port on 127.0.0.1, records it under the job's id, and keeps it
until the test creates the file ``release``."""

SHARED_RANGE = (33400, 33403)


async def test_jobs_on_one_node_get_distinct_ports(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "ports"
    out.mkdir()
    _, address = await stack.start_scheduler()
    low, high = SHARED_RANGE
    stack.start_agents(nodes=1, gpus=8, extra_env={"ACSP_AGENT_RENDEZVOUS_PORTS": f"{low}-{high}"})
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    command = [sys.executable, "-c", LISTENER, str(out)]
    # As many jobs as the range has ports, all with task 0 on the one node at once. Hashed
    # ports alone would give all four distinct ports only about one time in ten.
    task_counts = (2, 1, 2, 1)
    async with channel:
        job_ids = []
        for task_count in task_counts:
            spec = job_spec(project, grant, task_count=task_count, command=command)
            submitted = await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
            )
            job_ids.append(submitted.job.job_id)

        async def states() -> list[scheduler_pb2.Job]:
            return [
                await scheduler.GetJob(
                    scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
                )
                for job_id in job_ids
            ]

        async def bound() -> bool:
            for job in await states():
                # A task 0 that cannot bind its port fails, and its job ends before the release.
                ended = job.state >= scheduler_pb2.JOB_STATE_COMPLETED
                assert not ended, f"job {job.job_id} ended early: {job.state_message}"
            return all((out / job_id).exists() for job_id in job_ids)

        await wait_for(bound, 90, "every job's task 0 to bind its port", 0.2)
        (out / "release").touch()

        async def ended() -> list[scheduler_pb2.Job] | None:
            jobs = await states()
            done = all(job.state >= scheduler_pb2.JOB_STATE_COMPLETED for job in jobs)
            return jobs if done else None

        jobs = await wait_for(ended, 60, "every job to end", 0.2)

    ports = [int((out / job_id).read_text()) for job_id in job_ids]
    assert len(set(ports)) == len(job_ids)
    assert all(low <= port <= high for port in ports)
    for job in jobs:
        assert job.state == scheduler_pb2.JOB_STATE_COMPLETED, job.state_message
