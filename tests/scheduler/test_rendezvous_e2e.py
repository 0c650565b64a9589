"""The rendezvous variables of a gang's tasks, with a real scheduler, NATS and agents.

Each task of a 4-task gang on two nodes of two accelerators writes its ``ACSP_*`` variables
and its hosts file to a folder of the test. The test checks that the tasks agree on the
rendezvous and that their indexes match the placement the scheduler reports.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for
from .test_end_to_end import job_spec

pytestmark = pytest.mark.timeout(240)

TASKS = 4
HOST = "127.0.0.1"
PORTS = (31000, 31099)


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


async def test_gang_tasks_share_rendezvous(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _, address = await stack.start_scheduler()
    stack.start_agents(
        nodes=2,
        gpus=2,
        extra_env={
            "ACSP_AGENT_HOST": HOST,
            "ACSP_AGENT_RENDEZVOUS_PORTS": f"{PORTS[0]}-{PORTS[1]}",
        },
    )
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        spec = job_spec(project, grant, task_count=TASKS, command=recorder(out))
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=spec), metadata=md, timeout=10
        )
        job_id = submitted.job.job_id

        async def completed() -> scheduler_pb2.Job | None:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job if job.state == scheduler_pb2.JOB_STATE_COMPLETED else None

        job = await wait_for(completed, 90, f"job {job_id} to complete", 0.2)

    node_of = {p.task_index: p.node_id for p in job.placements}
    assert sorted(node_of) == list(range(TASKS))
    assert sorted(set(node_of.values())) == ["n0", "n1"]
    envs = {i: read_env(out / f"{i}.env") for i in range(TASKS)}

    for index, env in envs.items():
        same_node = [i for i in range(TASKS) if node_of[i] == node_of[index]]
        assert env["ACSP_TASK_INDEX"] == str(index)
        assert env["ACSP_TASK_COUNT"] == str(TASKS)
        assert env["ACSP_LOCAL_TASK_COUNT"] == str(len(same_node))
        assert env["ACSP_LOCAL_TASK_INDEX"] == str(same_node.index(index))
        assert env["ACSP_RENDEZVOUS_HOST"] == HOST
        assert (out / f"{index}.hosts").read_text() == f"{HOST}\n" * TASKS

    ports = {env["ACSP_RENDEZVOUS_PORT"] for env in envs.values()}
    assert len(ports) == 1
    assert PORTS[0] <= int(ports.pop()) <= PORTS[1]
    hosts_files = {env["ACSP_TASK_HOSTS_FILE"] for env in envs.values()}
    assert len(hosts_files) == TASKS
    # The agent deletes each hosts file once its task has ended.
    await wait_for(
        lambda: not any(Path(path).exists() for path in hosts_files), 30, "hosts files deleted"
    )
