"""Commands NATS can never carry: the publisher reports them and the job fails, not retries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc
from scheduler.service.commands import start_record
from scheduler.service.jobbook import Effects
from scheduler.service.model import Job, JobSpec, new_job_id
from scheduler.service.publisher import Publisher
from scheduler.service.store import DispatchRecord, JobStore
from scheduler.service.validation import (
    DEFAULT_MAX_PAYLOAD,
    MAX_COMMAND_BYTES,
    MAX_ENV_VALUE_BYTES,
    validate_spec,
)
from services.runtime.auth import Role
from tests.agent.natsserver import NatsServer, declare_agent_streams
from tests.scheduler.harness import Stack, fund_grant, metadata, wait_for
from tests.scheduler.test_jobbook import NOW, held, make_book, make_job, place, report

MAX_PAYLOAD = 64 * 1024


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server whose max_payload is 64 KiB, with the agent streams declared."""
    config = tmp_path / "nats.conf"
    config.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    server = NatsServer(tmp_path / "jetstream", ("-c", str(config)))
    server.start()
    await declare_agent_streams(server.url)
    yield server
    server.stop()


def command(job_id: str, kind: str, size: int) -> DispatchRecord:
    return DispatchRecord(job_id, 1, 0, kind, "prov.reg.n1", b"x" * size)


async def test_publisher_rejects_oversized_command_only(small_nats: NatsServer) -> None:
    client = await nats.connect(small_nats.url, connect_timeout=5)
    try:
        assert client.max_payload == MAX_PAYLOAD
        publisher = Publisher(client.jetstream(), timeout_s=5.0)
        small, large, stop = (
            command("j1", "start", 100),
            command("j2", "start", MAX_PAYLOAD + 1),
            command("j2", "stop", 100),
        )
        result = await publisher.publish_all([small, large, stop], [])
    finally:
        await client.close()
    assert result.command_keys == [small.key, stop.key]
    assert result.event_ids == []
    assert result.rejected_events == []
    assert [record.key for record, _ in result.rejected_commands] == [large.key]
    reason = result.rejected_commands[0][1]
    assert "maximum payload exceeded" in reason
    assert f"{MAX_PAYLOAD + 1} bytes" in reason


def test_unpublishable_start_fails_job() -> None:
    book = make_book()
    job = make_job(tasks=2)
    place(book, job)
    starts = [r for r in held(book, job).commands if r.kind == "start"]
    fx = Effects(NOW + 3)
    book.fail_unpublishable(starts[0], "nats: maximum payload exceeded", fx)
    stopping = book.jobs[job.job_id]
    assert stopping.state == "stopping"
    assert "task 0 start command not published" in stopping.reason
    assert [(r.kind, r.task_index) for r in fx.commands] == [("stop", 1)]
    ended = report(book, job, 1, "stopped")
    final = ended.changed[job.job_id][0]
    assert final.state == "failed"
    assert "maximum payload exceeded" in final.reason
    assert [e.subject for e in ended.events][-1].endswith("ended")
    # The engine freed the accelerators: an eight-accelerator job fits the node again.
    assert place(book, make_job(tasks=8), NOW + 4).admit


def test_cancelled_job_with_unpublishable_starts_ends() -> None:
    book = make_book()
    job = make_job(tasks=2)
    place(book, job)
    starts = [r for r in held(book, job).commands if r.kind == "start"]
    cancel = Effects(NOW + 3)
    book.cancel(job.job_id, "owner asked", "rpc:CancelJob", cancel)
    assert book.jobs[job.job_id].state == "stopping"
    fx = Effects(NOW + 4)
    for record in starts:
        book.fail_unpublishable(record, "nats: maximum payload exceeded", fx)
    assert fx.changed[job.job_id][0].state == "cancelled"
    assert job.job_id not in book.jobs


def test_rejected_stop_or_old_attempt_changes_nothing() -> None:
    book = make_book()
    job = make_job(tasks=1)
    place(book, job)
    start = next(r for r in held(book, job).commands if r.kind == "start")
    fx = Effects(NOW + 3)
    stop = DispatchRecord(job.job_id, start.attempt, 0, "stop", start.node_key, b"")
    book.fail_unpublishable(stop, "rejected", fx)
    older = DispatchRecord(job.job_id, start.attempt - 1, 0, "start", start.node_key, b"")
    book.fail_unpublishable(older, "rejected", fx)
    assert fx.changed == {}
    assert book.jobs[job.job_id].state == "starting"


def test_largest_valid_spec_start_command_fits_max_payload() -> None:
    env = tuple((f"K{i}", "x" * (MAX_ENV_VALUE_BYTES - 8)) for i in range(4))
    job = make_job(tasks=1, millis=8000)
    spec = replace(job.spec, command=("y" * (MAX_COMMAND_BYTES - 1),), env=env)
    assert validate_spec(spec, max_payload=DEFAULT_MAX_PAYLOAD) == []
    book = make_book()
    job = replace(job, spec=spec)
    place(book, job)
    held(book, job)
    placed = book.jobs[job.job_id]
    assert len(placed.placement[0].accelerators) == 8
    record = start_record(placed, placed.placement[0], epoch=7)
    assert len(record.payload) > MAX_COMMAND_BYTES
    assert len(record.payload) < DEFAULT_MAX_PAYLOAD


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


@pytest.mark.timeout(180)
async def test_stored_oversized_job_fails_and_releases_hold(stack: Stack) -> None:
    process, _ = await stack.start_scheduler()
    project, grant, pi = await fund_grant(stack)
    conn = await asyncpg.connect(stack.dsn, timeout=10)
    try:
        shard, epoch = await conn.fetchrow("SELECT shard, epoch FROM scheduler.leaders")
    finally:
        await conn.close()
    process.kill()
    # A scheduler without the size checks accepted jobs like this one: ten 120 kB values make
    # every start command larger than the NATS server's 1 MiB max_payload.
    spec = JobSpec(
        name="huge-env",
        project_id=project,
        grant_id=grant,
        command=("true",),
        task_count=2,
        wall_time_s=600,
        env=tuple((f"K{i}", "x" * 120_000) for i in range(10)),
    )
    job = Job(job_id=new_job_id(), spec=spec, owner=pi)
    pool = await asyncpg.create_pool(stack.dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await JobStore(pool, shard).insert_jobs([job], [None], epoch, "submit")
        stack.start_agents(nodes=1)
        await stack.start_scheduler("scheduler-2")

        async def ended() -> Job | None:
            stored = await JobStore(pool, shard).get_job(job.job_id)
            return stored if stored is not None and stored.terminal else None

        final = await wait_for(ended, 90, "the oversized job to end", 0.5)
    finally:
        await pool.close()
    assert final.state == "failed"
    assert "start command not published" in final.reason
    assert "maximum payload exceeded" in final.reason
    office = metadata(stack.token("office", Role.PROGRAM_OFFICE))
    async with grpc.aio.insecure_channel(stack.grant_address) as grant_channel:
        grants = grant_pb2_grpc.GrantServiceStub(grant_channel)

        async def released() -> bool:
            entries = await grants.ListLedgerEntries(
                grant_pb2.ListLedgerEntriesRequest(grant_id=grant), metadata=office, timeout=10
            )
            kinds = {e.kind for e in entries.entries if e.job_id == job.job_id}
            return common_pb2.LEDGER_ENTRY_KIND_RELEASE in kinds

        await wait_for(released, 60, "the job's hold to be released", 0.5)
