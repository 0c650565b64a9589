"""The scheduler end to end: real grant service, NATS, simulated agents and scheduler processes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import asyncpg
import grpc
import nats
import nats.errors
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.v1 import agent_pb2, common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2
from services.runtime.auth import Role
from services.runtime.errors import field_violations

from .harness import Stack, fund_grant, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        await stack.start_metering()
        yield stack
    finally:
        await stack.close()


def job_spec(project: str, grant: str, **fields: object) -> scheduler_pb2.JobSpec:
    values: dict[str, object] = {
        "name": "e2e",
        "project_id": project,
        "grant_id": grant,
        "task_count": 2,
        "accelerator_millis_per_task": 1000,
        "gang": True,
        "wall_time_seconds": 600,
        "command": ["true"],
    }
    values.update(fields)
    return scheduler_pb2.JobSpec(**values)  # type: ignore[arg-type]


async def test_job_runs_to_completion_with_hold(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(request_id="e2e-1", spec=job_spec(project, grant)),
            metadata=md,
            timeout=10,
        )
        job_id = submitted.job.job_id

        async def state() -> int:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job.state if job.state == scheduler_pb2.JOB_STATE_COMPLETED else 0

        await wait_for(state, 60, "the job to complete", 0.2)
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
    assert job.hold_id != ""
    assert len(job.placements) == 2
    assert all(p.state == "exited" for p in job.placements)
    assert job.HasField("start_time")
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    async with grpc.aio.insecure_channel(stack.grant_address) as grant_channel:
        grants = grant_pb2_grpc.GrantServiceStub(grant_channel)

        async def job_entry_kinds() -> set[int]:
            entries = await grants.ListLedgerEntries(
                grant_pb2.ListLedgerEntriesRequest(grant_id=grant), metadata=office, timeout=10
            )
            return {e.kind for e in entries.entries if e.job_id == job_id}

        held = await wait_for(job_entry_kinds, 10, "the job's hold in the ledger", 0.2)
        assert common_pb2.LEDGER_ENTRY_KIND_HOLD in held

        async def released() -> bool:
            return common_pb2.LEDGER_ENTRY_KIND_RELEASE in await job_entry_kinds()

        await wait_for(released, 60, "metering to settle the hold", 0.5)


async def test_submit_reports_every_invalid_field(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    md = metadata(stack.token("alice", Role.RESEARCHER))
    bad = job_spec(
        "",
        "g1",
        task_count=0,
        accelerator_millis_per_task=1500,
        wall_time_seconds=0,
        command=[],
        allowed_regions=["nowhere"],
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec=bad), metadata=md, timeout=10
            )
        listed = await scheduler.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=md, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = field_violations(caught.value)
    assert set(fields) == {
        "spec.project_id",
        "spec.task_count",
        "spec.accelerator_millis_per_task",
        "spec.wall_time_seconds",
        "spec.command",
        "spec.allowed_regions[0]",
    }
    assert "1500" in fields["spec.accelerator_millis_per_task"]
    assert list(listed.jobs) == []


async def test_restarted_scheduler_dispatches_nothing_twice(stack: Stack) -> None:
    scheduler_process, address = await stack.start_scheduler()
    stack.start_agents(nodes=4)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    count = 300
    channel, scheduler = scheduler_stub(address)
    async with channel:
        request = scheduler_pb2.SubmitJobsRequest(
            jobs=[
                scheduler_pb2.SubmitJobRequest(
                    request_id=f"r-{i}", spec=job_spec(project, grant, task_count=1)
                )
                for i in range(count)
            ]
        )
        response = await scheduler.SubmitJobs(request, metadata=md, timeout=30)
        job_ids = {r.job.job_id for r in response.results}

        async def some_started() -> bool:
            listed = await scheduler.ListJobs(
                scheduler_pb2.ListJobsRequest(states=[scheduler_pb2.JOB_STATE_COMPLETED]),
                metadata=md,
                timeout=10,
            )
            return len(listed.jobs) >= 20

        await wait_for(some_started, 60, "the first jobs to complete", 0.05)
    scheduler_process.kill()
    _, address = await stack.start_scheduler("scheduler-restarted")
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def all_completed() -> bool:
            try:
                summary = await scheduler.GetQueueSummary(
                    scheduler_pb2.GetQueueSummaryRequest(), metadata=md, timeout=10
                )
            except grpc.aio.AioRpcError as error:
                # The restarted replica is a standby until the killed one's lock is freed.
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return False
                raise
            return summary.jobs_by_state.get("completed", 0) == count

        await wait_for(all_completed, 120, "every job to complete after the restart", 0.2)
    starts = await count_stream_messages(stack, "acsp.cmd.>", start_commands=True)
    started = await count_stream_messages(stack, "acsp.task.>", started_events=True)
    assert set(starts) == {f"{job_id}/1/0" for job_id in job_ids}
    assert max(starts.values()) == 1
    assert set(started) == set(starts)
    assert max(started.values()) == 1


async def count_stream_messages(
    stack: Stack, subject: str, *, start_commands: bool = False, started_events: bool = False
) -> dict[str, int]:
    """Count start commands or STARTED task events per task id in JetStream."""
    client = await nats.connect(stack.nats_url, connect_timeout=5)
    counts: dict[str, int] = {}
    try:
        js = client.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True)
        while True:
            try:
                message = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            if start_commands:
                command = agent_pb2.AgentCommand.FromString(message.data)
                if command.kind == agent_pb2.COMMAND_KIND_START_TASK:
                    counts[command.task_id] = counts.get(command.task_id, 0) + 1
            elif started_events:
                event = agent_pb2.TaskEvent.FromString(message.data)
                if event.state == agent_pb2.TASK_STATE_STARTED:
                    counts[event.task_id] = counts.get(event.task_id, 0) + 1
    finally:
        await client.close()
    return counts


async def test_standby_takes_over_and_old_leader_stays_fenced(stack: Stack) -> None:
    leader, leader_address = await stack.start_scheduler("scheduler-a")
    _, standby_address = await stack.start_scheduler("scheduler-b", wait_leader=False)
    stack.start_agents(nodes=2)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))

    async def submit(address: str, request_id: str) -> str:
        channel, scheduler = scheduler_stub(address)
        async with channel:
            response = await scheduler.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    request_id=request_id, spec=job_spec(project, grant, task_count=1)
                ),
                metadata=md,
                timeout=5,
            )
        return response.job.job_id

    await submit(leader_address, "before")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(standby_address, "to-standby")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    leader.kill()
    killed_at = time.monotonic()

    async def accepted() -> bool:
        try:
            await submit(standby_address, "after")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    await wait_for(accepted, 15, "the standby to take over", 0.1)
    takeover_s = time.monotonic() - killed_at
    assert takeover_s < 15

    _, returned_address = await stack.start_scheduler("scheduler-a-returned", wait_leader=False)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await submit(returned_address, "to-returned")
    assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    for i in range(5):
        await submit(standby_address, f"late-{i}")

    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:

        async def all_done() -> bool:
            open_jobs = await conn.fetchval(
                "SELECT count(*) FROM scheduler.jobs WHERE state <> 'completed'"
            )
            return open_jobs == 0

        await wait_for(all_done, 60, "every job to complete", 0.2)
        epochs = await conn.fetch(
            "SELECT epoch, count(*) FROM scheduler.dispatches GROUP BY epoch ORDER BY epoch"
        )
        leader_epoch = await conn.fetchval("SELECT epoch FROM scheduler.leaders")
    finally:
        await conn.close()
    assert leader_epoch == 2
    assert [row[0] for row in epochs] in ([1, 2], [2])
    late_dispatches = sum(row[1] for row in epochs if row[0] == 2)
    assert late_dispatches >= 6


async def test_pledge_caps_pool_and_recall_is_bounded(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    operator = metadata(stack.token("op", Role.PROVIDER_OPERATOR, provider="prov"))
    other_operator = metadata(stack.token("op2", Role.PROVIDER_OPERATOR, provider="other"))
    md = metadata(stack.token(pi, Role.PI))
    now = time.time()
    window = common_pb2.TimeWindow()
    window.start_time.FromSeconds(int(now) - 60)
    window.end_time.FromSeconds(int(now) + 86_400)
    pledge = scheduler_pb2.Pledge(
        provider_id="prov",
        region_id="reg",
        model="A100-SXM4-80GB",
        window=window,
        protected_count=1,
        recallable_count=1,
    )
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def node_known() -> bool:
            nodes = await scheduler.ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=operator, timeout=10
            )
            return len(nodes.nodes) == 1

        # The agent's inventory registers its provider and region, which the pledge names.
        await wait_for(node_known, 20, "the agent's inventory", 0.1)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await scheduler.SetPledge(
                scheduler_pb2.SetPledgeRequest(pledge=pledge), metadata=other_operator, timeout=10
            )
        stored = await scheduler.SetPledge(
            scheduler_pb2.SetPledgeRequest(pledge=pledge), metadata=operator, timeout=10
        )
        listed = await scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id="prov"), metadata=operator, timeout=10
        )
        effective = Timestamp()
        effective.FromSeconds(int(now))
        yesterday = Timestamp()
        yesterday.FromSeconds(int(now) - 86_400)
        with pytest.raises(grpc.aio.AioRpcError) as past:
            await scheduler.RecallCapacity(
                scheduler_pb2.RecallCapacityRequest(
                    recall=scheduler_pb2.Recall(
                        pledge_id=stored.pledge_id, count=1, effective_time=yesterday
                    )
                ),
                metadata=operator,
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await scheduler.RecallCapacity(
                scheduler_pb2.RecallCapacityRequest(
                    recall=scheduler_pb2.Recall(
                        pledge_id=stored.pledge_id, count=2, effective_time=effective
                    )
                ),
                metadata=operator,
                timeout=10,
            )
        recall = await scheduler.RecallCapacity(
            scheduler_pb2.RecallCapacityRequest(
                request_id="recall-1",
                recall=scheduler_pb2.Recall(
                    pledge_id=stored.pledge_id,
                    count=1,
                    effective_time=effective,
                    reason="commercial peak",
                ),
            ),
            metadata=operator,
            timeout=10,
        )

        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec=job_spec(project, grant, task_count=2)),
            metadata=md,
            timeout=10,
        )

        async def waiting_reason() -> int:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=submitted.job.job_id), metadata=md, timeout=10
            )
            return job.pending_reason

        reason = await wait_for(waiting_reason, 20, "a pending reason for the job", 0.2)
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=submitted.job.job_id), metadata=md, timeout=10
        )
        summary = await scheduler.GetQueueSummary(
            scheduler_pb2.GetQueueSummaryRequest(), metadata=md, timeout=10
        )
    total = summary.total_millis_by_region["prov/reg"]
    assert summary.recalled_millis_by_region["prov/reg"] == 1000
    # The pledge of two less the one recalled leaves one of the eight to new jobs.
    assert total == 8000
    assert summary.usable_millis_by_region["prov/reg"] == 1000
    assert summary.unknown_millis_by_region["prov/reg"] == 0
    # The other six are above the pledge's cap, so the split adds up to the total.
    assert summary.above_cap_millis_by_region["prov/reg"] == 6000
    assert summary.out_of_service_millis_by_region["prov/reg"] == 0
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stored.pledge_id.startswith("pl-")
    assert [p.pledge_id for p in listed.pledges] == [stored.pledge_id]
    assert too_many.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert past.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recall.effective_time" in (past.value.details() or "")
    assert recall.count == 1
    assert job.state == scheduler_pb2.JOB_STATE_PENDING
    assert reason in (
        scheduler_pb2.PENDING_REASON_PROVIDER_RECALL,
        scheduler_pb2.PENDING_REASON_NO_CAPACITY,
    )


async def test_job_on_failed_node_requeues_elsewhere(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    first = stack.start_agents(nodes=1, name="agents-a")
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def get() -> scheduler_pb2.Job:
            return await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )

        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, command=["sleep", "60"])
            ),
            metadata=md,
            timeout=10,
        )
        job_id = submitted.job.job_id

        async def running_on_first() -> bool:
            job = await get()
            return job.state == scheduler_pb2.JOB_STATE_RUNNING

        await wait_for(running_on_first, 30, "the job to run on the first node", 0.2)
        first.kill()
        stack.start_agents(nodes=1, name="agents-b", first=1)

        async def running_again() -> bool:
            job = await get()
            return job.state == scheduler_pb2.JOB_STATE_RUNNING and job.attempt == 2

        await wait_for(running_again, 40, "the job to run again after the node failed", 0.2)
        job = await get()
    assert job.attempt == 2
    assert [p.node_id for p in job.placements] == ["n1"]


async def test_array_jobs_share_an_id_and_index(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        response = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                request_id="array-1", spec=job_spec(project, grant, task_count=1, array_size=3)
            ),
            metadata=md,
            timeout=10,
        )
        retried = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                request_id="array-1", spec=job_spec(project, grant, task_count=1, array_size=3)
            ),
            metadata=md,
            timeout=10,
        )
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(array_job_id=response.job.job_id),
            metadata=md,
            timeout=10,
        )
    assert len(response.array_job_ids) == 3
    assert list(retried.array_job_ids) == list(response.array_job_ids)
    assert sorted(j.array_index for j in listed.jobs) == [0, 1, 2]
    indexes = {j.array_index: j.spec.environment["ACSP_ARRAY_INDEX"] for j in listed.jobs}
    assert indexes == {0: "0", 1: "1", 2: "2"}


async def test_array_of_one_is_an_array(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        response = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                request_id="array-of-one",
                spec=job_spec(project, grant, task_count=1, array_size=1),
            ),
            metadata=md,
            timeout=10,
        )
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(array_job_id=response.job.job_id),
            metadata=md,
            timeout=10,
        )
    assert len(response.array_job_ids) == 1
    [element] = listed.jobs
    assert element.array_index == 0
    assert element.spec.environment["ACSP_ARRAY_INDEX"] == "0"


async def test_array_parent_shows_and_cancels_elements(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        # No node is up, so every element waits.
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                request_id="array-2", spec=job_spec(project, grant, task_count=1, array_size=3)
            ),
            metadata=md,
            timeout=10,
        )
        parent_id = submitted.job.job_id

        parent = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=parent_id), metadata=md, timeout=10
        )
        cancelled = await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=parent_id, reason="wrong input"),
            metadata=md,
            timeout=10,
        )
        listed = await scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(array_job_id=parent_id), metadata=md, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=parent_id + "x"), metadata=md, timeout=10
            )

    assert parent.job_id == parent_id
    assert parent.state == scheduler_pb2.JOB_STATE_PENDING
    assert parent.spec.array_size == 3
    assert parent.state_message == "array of 3 jobs: 3 pending"
    assert cancelled.state == scheduler_pb2.JOB_STATE_CANCELLED
    assert cancelled.state_message == "array of 3 jobs: 3 cancelled"
    assert [j.state for j in listed.jobs] == [scheduler_pb2.JOB_STATE_CANCELLED] * 3
    assert {j.state_message for j in listed.jobs} == {"wrong input"}
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_running_job(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, command=["sleep", "120"], grace_seconds=1)
            ),
            metadata=md,
            timeout=10,
        )
        job_id = submitted.job.job_id

        async def state() -> int:
            job = await scheduler.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
            )
            return job.state

        await wait_for(
            lambda: _is(state(), scheduler_pb2.JOB_STATE_RUNNING), 30, "the job to run", 0.2
        )
        cancelled = await scheduler.CancelJob(
            scheduler_pb2.CancelJobRequest(job_id=job_id, reason="not needed"),
            metadata=md,
            timeout=10,
        )
        await wait_for(
            lambda: _is(state(), scheduler_pb2.JOB_STATE_CANCELLED), 30, "the job to end", 0.2
        )
        job = await scheduler.GetJob(
            scheduler_pb2.GetJobRequest(job_id=job_id), metadata=md, timeout=10
        )
    assert cancelled.state == scheduler_pb2.JOB_STATE_STOPPING
    assert job.state_message == "not needed"
    assert all(p.state == "stopped" for p in job.placements)


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_watch_streams_job_through_its_states(stack: Stack) -> None:
    _, address = await stack.start_scheduler()
    stack.start_agents(nodes=1)
    project, grant, pi = await fund_grant(stack)
    md = metadata(stack.token(pi, Role.PI))
    channel, scheduler = scheduler_stub(address)
    seen: list[int] = []
    async with channel:
        submitted = await scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                spec=job_spec(project, grant, task_count=1, command=["sleep", "1"])
            ),
            metadata=md,
            timeout=10,
        )
        job_id = submitted.job.job_id
        stream = scheduler.WatchJobs(
            scheduler_pb2.WatchJobsRequest(job_id=job_id, send_initial=True),
            metadata=md,
            timeout=60,
        )
        async for job in stream:
            if not seen or seen[-1] != job.state:
                seen.append(job.state)
            if job.state == scheduler_pb2.JOB_STATE_COMPLETED:
                stream.cancel()
                break
    assert seen[-1] == scheduler_pb2.JOB_STATE_COMPLETED
    assert scheduler_pb2.JOB_STATE_RUNNING in seen
    assert seen.index(scheduler_pb2.JOB_STATE_RUNNING) < len(seen) - 1
