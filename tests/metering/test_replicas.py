"""Two metering replicas share the usage stream, and killing one mid-load loses nothing.

The replicas are real ``python -m services.metering`` processes. They consume one durable
consumer, charge a real grant service (in-process here) and share one metering database. A
publisher sends a steady load of usage reports from several nodes and jobs while one replica is
killed with SIGKILL; the survivor must store every sample once and charge exactly their price.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from acsp import subjects
from acsp.v1 import agent_pb2, common_pb2, events_pb2, grant_pb2, scheduler_pb2
from services.metering.ingest import IngestConfig, declare_usage_stream
from services.metering.ratecard import default_rate_card
from services.runtime.db import Database
from tests.grant.service_helpers import RunningGrant, running_grant
from tests.grant.test_service_rpc import setup_project, standard_grant
from tests.metering.helpers import (
    assert_priced,
    count,
    exact_price,
    report,
    sample,
    wait_until,
)

CARD = default_rate_card()
PERIOD_S = 300
NODES = {"node-0": "A100-SXM4-80GB", "node-1": "A100-SXM4-80GB", "node-2": "H800", "node-3": "T4"}
ACCELERATORS_PER_NODE = 8
MINUTES = 125
JOBS = 6
ENDED_JOBS = 3
"""Jobs with a lower index end, so metering releases their holds. The others keep running."""
BATCH = 5
WORKERS = 2
"""Each replica's ingest workers and the messages each takes at a time."""
ACK_WAIT_S = 8
"""The consumer's ack wait: well above the longest pause, so a paused replica keeps its messages."""
KILL_TRIES = 10
BURST_REPORTS = 30
"""Reports published while the replica is paused: more messages than the other replica holds."""


def _reports(base: datetime) -> list[tuple[str, bytes, list[agent_pb2.UsageSample]]]:
    """Build one report per node and minute: (subject, payload, samples), in publish order."""
    reports = []
    for minute in range(MINUTES):
        for node, model in NODES.items():
            items = []
            for index in range(ACCELERATORS_PER_NODE):
                job = (int(node[-1]) * ACCELERATORS_PER_NODE + index) % JOBS
                items.append(
                    sample(
                        f"{node}/{minute}/{index}",
                        f"job-{job}",
                        base + timedelta(minutes=minute),
                        seconds=60,
                        model=model,
                        accelerator_id=f"GPU-{node}-{index}",
                        share_millis=500 if index % 4 == 3 else 1000,
                    )
                )
            subject = subjects.usage_subject("prov-a", "r1", node)
            reports.append((subject, report(items, node=node), items))
    return reports


def _job_event(
    kind: int, job: int, hold_id: str, grant_id: str, start: datetime, time: datetime
) -> bytes:
    state = scheduler_pb2.JOB_STATE_RUNNING
    if kind == events_pb2.JOB_EVENT_KIND_ENDED:
        state = scheduler_pb2.JOB_STATE_COMPLETED
    event = events_pb2.JobEvent(
        event_id=f"job-{job}/0/{kind}",
        kind=kind,  # type: ignore[arg-type]
        job_id=f"job-{job}",
        attempt=0,
        state=state,  # type: ignore[arg-type]
        hold_id=hold_id,
        grant_id=grant_id,
        project_id="proj-a",
        institution_id="uni-a",
        cause=common_pb2.Cause(trigger="engine"),
    )
    event.start_time.FromDatetime(start)
    event.time.FromDatetime(time)
    return event.SerializeToString()


async def _admit_jobs(svc: RunningGrant, js: JetStreamContext, base: datetime) -> str:
    """Award a grant, place a hold per job and publish the jobs' events; return the grant."""
    await setup_project(svc)
    grant_id = await standard_grant(svc, "100")
    scheduler = svc.stub("scheduler", ["service"])
    end = base + timedelta(minutes=MINUTES)
    for job in range(JOBS):
        hold = await scheduler.PlaceHold(
            grant_pb2.PlaceHoldRequest(
                request_id=f"hold-request-{job}",
                grant_id=grant_id,
                job_id=f"job-{job}",
                amount_pf_days=common_pb2.Decimal(value="1"),
            )
        )
        admitted = _job_event(
            events_pb2.JOB_EVENT_KIND_ADMITTED, job, hold.hold_id, grant_id, base, base
        )
        await js.publish(subjects.job_event_subject("admitted"), admitted)
        if job < ENDED_JOBS:
            ended = _job_event(
                events_pb2.JOB_EVENT_KIND_ENDED, job, hold.hold_id, grant_id, base, end
            )
            await js.publish(subjects.job_event_subject("ended"), ended)
    return grant_id


async def _start_replica(
    database_url: str, nats_url: str, grant_address: str, data_dir: Path
) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(
        ACSP_DATABASE_URL=database_url,
        ACSP_NATS_URL=nats_url,
        ACSP_GRANT_ADDRESS=grant_address,
        ACSP_METERING_PERIOD_S=str(PERIOD_S),
        ACSP_METERING_LATENESS_S="1",
        ACSP_METERING_INGEST_BATCH=str(BATCH),
        ACSP_METERING_INGEST_WORKERS=str(WORKERS),
        ACSP_METERING_ACK_WAIT_S=str(ACK_WAIT_S),
        ACSP_LOG_LEVEL="WARNING",
        ACSP_GRPC_LISTEN="127.0.0.1:0",
        # The grant service's signing key is here, so each replica mints its service token.
        ACSP_DATA_DIR=str(data_dir),
    )
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.metering", env=env, stdout=asyncio.subprocess.DEVNULL
    )


class _Publisher:
    """Publish the reports in order, at a steady pace or in bursts, from one shared position.

    Every fifth report is sent twice with the same message id, and the stream drops the copy.
    Every seventh is sent again under a new id, as an agent does when its ack was lost and the
    duplicate window has passed. The sample ids' primary key drops that copy.
    """

    def __init__(
        self, js: JetStreamContext, reports: list[tuple[str, bytes, list[agent_pb2.UsageSample]]]
    ) -> None:
        self._js = js
        self._reports = reports
        self._next = 0

    async def steady(self, until: int) -> None:
        """Publish one report every 10 ms until ``until`` reports are out."""
        while self._next < until:
            await self.burst(1)
            await asyncio.sleep(0.01)

    async def burst(self, reports: int) -> None:
        """Publish the next ``reports`` reports at once."""
        for _ in range(reports):
            if self._next == len(self._reports):
                raise AssertionError("the publisher has no report left")
            index = self._next
            self._next += 1
            subject, payload, _ = self._reports[index]
            await self._js.publish(subject, payload, headers={"Nats-Msg-Id": f"usage-{index}"})
            if index % 5 == 0:
                await self._js.publish(subject, payload, headers={"Nats-Msg-Id": f"usage-{index}"})
            if index % 7 == 0:
                await self._js.publish(
                    subject, payload, headers={"Nats-Msg-Id": f"usage-{index}-again"}
                )


async def _kill_holding_messages(
    process: asyncio.subprocess.Process, js: JetStreamContext, db: Database, publisher: _Publisher
) -> None:
    """SIGKILL ``process`` at a moment when messages delivered to it are still unacked.

    The process is paused with SIGSTOP. A pause inside a transaction could hold rows the other
    replica needs, so such a pause is undone and tried again a moment later. Otherwise a burst of
    reports is published. The paused workers' pull requests are still open on the server, so some
    of the burst goes to them, and a message delivered to the paused process keeps the
    consumer's ack floor where it is while the other replica takes and acks newer messages. Each
    worker acks a batch before it fetches the next. So once the floor has stayed put while more
    messages were delivered than the other replica's workers can take, the message just above
    the floor is the paused replica's, however slow the other replica is. The pause stays well
    inside the consumer's ack wait, so the server does not hand those messages on first. When
    the floor moves instead, the process resumes and the next try pauses it again.
    """
    held_by_other = 2 * WORKERS * BATCH
    tries: list[str] = []
    in_transaction = 0
    while len(tries) < KILL_TRIES:
        process.send_signal(signal.SIGSTOP)
        if await _paused_in_transaction(db, process.pid):
            in_transaction += 1
            if in_transaction > 10 * KILL_TRIES:
                raise AssertionError("the paused replica was inside a transaction at every pause")
            process.send_signal(signal.SIGCONT)
            await asyncio.sleep(random.uniform(0.05, 0.2))
            continue
        before = await js.consumer_info(subjects.USAGE_STREAM, IngestConfig().durable)
        await publisher.burst(BURST_REPORTS)
        try:
            await wait_until(
                _delivered_past(js, before.delivered.stream_seq + held_by_other), timeout_s=3
            )
        except TimeoutError:
            pass
        after = await js.consumer_info(subjects.USAGE_STREAM, IngestConfig().durable)
        # The floor may move a little at the pause, as the other replica acks what it held.
        holding = (
            after.delivered.stream_seq > after.ack_floor.stream_seq + held_by_other
            and (after.num_ack_pending or 0) > 0
        )
        if holding:
            process.send_signal(signal.SIGKILL)
            return
        tries.append(
            f"delivered {before.delivered.stream_seq}->{after.delivered.stream_seq}, "
            f"floor {before.ack_floor.stream_seq}->{after.ack_floor.stream_seq}, "
            f"pending {after.num_ack_pending}"
        )
        process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"the paused replica held no unacked message in {KILL_TRIES} tries: " + "; ".join(tries)
    )


async def _paused_in_transaction(db: Database, pid: int) -> bool:
    """Check whether the paused process ``pid`` has a database connection inside a transaction.

    A statement sent just before the pause still runs, so this waits up to a second for the
    process's connections to finish it. A connection still busy after that counts as inside one.
    """
    async with db.acquire() as conn:
        server_port = await conn.fetchval("SELECT inet_server_port()")
    ports = _client_ports(pid, server_port)
    query = "SELECT state FROM pg_stat_activity WHERE client_port = ANY($1::int[])"
    deadline = asyncio.get_running_loop().time() + 1
    while True:
        async with db.acquire() as conn:
            states = {row["state"] for row in await conn.fetch(query, sorted(ports))}
        if "active" not in states or asyncio.get_running_loop().time() > deadline:
            return bool(states - {"idle"})
        await asyncio.sleep(0.02)


def _client_ports(pid: int, server_port: int) -> set[int]:
    """Return the local ports of process ``pid``'s TCP connections to ``server_port`` (Linux).

    Only those connections count: a local port of another connection (to NATS, for example)
    may equal the client port of another process's database connection, such as the survivor's.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[9] in inodes and remote_port == server_port:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _delivered_past(js: JetStreamContext, stream_seq: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        info = await js.consumer_info(subjects.USAGE_STREAM, IngestConfig().durable)
        return info.delivered.stream_seq > stream_seq

    return check


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 30)


async def test_replica_killed_mid_load_charges_exactly(
    database_url: str, nats_url: str, db: Database, grant_schema: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    # Every period is closed and every ended job is past its lateness, so all usage is due.
    base = datetime.fromtimestamp(now.timestamp() // PERIOD_S * PERIOD_S, UTC) - timedelta(hours=3)
    reports = _reports(base)
    items = [item for _, _, batch in reports for item in batch]
    exact = sum(
        (exact_price(i.model, Decimal(i.accelerator_seconds.value)) for i in items), Fraction(0)
    )

    client = await nats.connect(nats_url)
    async with running_grant(grant_schema, tmp_path, {"ACSP_NATS_URL": nats_url}) as svc:
        js = client.jetstream()
        await declare_usage_stream(js, IngestConfig())
        grant_id = await _admit_jobs(svc, js, base)
        first = await _start_replica(database_url, nats_url, svc.address, tmp_path)
        second = await _start_replica(database_url, nats_url, svc.address, tmp_path)
        publishing: asyncio.Task[None] | None = None
        try:
            await wait_until(_pulling(js, 4), timeout_s=60)
            publisher = _Publisher(js, reports)
            # The bursts of the kill come from the reports held back here.
            reserve = KILL_TRIES * BURST_REPORTS
            publishing = asyncio.create_task(publisher.steady(len(reports) - reserve))
            await wait_until(_stored_above(db, len(items) // 4), timeout_s=60)
            await _kill_holding_messages(first, js, db, publisher)
            await asyncio.wait_for(first.wait(), 10)
            stored_at_kill = await count(db, "SELECT count(*) FROM metering.usage_samples")
            await asyncio.wait_for(publishing, 60)
            publishing = asyncio.create_task(publisher.steady(len(reports)))
            await asyncio.wait_for(publishing, 60)

            await wait_until(_stored_above(db, len(items) - 1), timeout_s=120)
            await wait_until(_all_charged(db), timeout_s=120)
            consumer = await js.consumer_info(subjects.USAGE_STREAM, IngestConfig().durable)
            assert second.returncode is None
        finally:
            if publishing is not None:
                publishing.cancel()
            if first.returncode is None:
                first.kill()
            await _stop(first)
            await _stop(second)
        office = svc.stub("office", ["program_office"])
        balance = await office.GetBalance(grant_pb2.GetBalanceRequest(grant_id=grant_id))
        summary = await office.GetLedgerSummary(grant_pb2.GetLedgerSummaryRequest())
    await client.close()

    assert stored_at_kill < len(items)
    # Each redelivery takes a consumer sequence number, so the killed replica's unacked
    # messages went to the survivor.
    assert consumer.delivered.consumer_seq > consumer.delivered.stream_seq
    assert await count(db, "SELECT count(*) FROM metering.usage_samples") == len(items)
    async with db.acquire() as conn:
        samples = await conn.fetchval("SELECT sum(sample_count) FROM metering.usage_periods")
        micros = await conn.fetchval("SELECT sum(accelerator_micros) FROM metering.usage_periods")
        charged = await conn.fetchval("SELECT sum(amount) FROM metering.charges")
    assert samples == len(items)
    assert micros == sum(int(Decimal(i.accelerator_seconds.value) * 1_000_000) for i in items)
    assert_priced(charged, exact, charges=len(items))
    assert await count(db, "SELECT count(*) FROM metering.charges WHERE state <> 'committed'") == 0
    assert await count(db, "SELECT count(*) FROM metering.dead_letters") == 0
    assert Decimal(balance.charged_pf_days.value) == charged
    assert Decimal(summary.postings_sum_pf_days.value) == 0
    assert list(summary.negative_grant_ids) == []


def _pulling(js: JetStreamContext, workers: int):  # type: ignore[no-untyped-def]
    """Return a check that ``workers`` ingest workers wait on the usage consumer."""

    async def check() -> bool:
        try:
            info = await js.consumer_info(subjects.USAGE_STREAM, IngestConfig().durable)
        except NotFoundError:
            return False
        return (info.num_waiting or 0) >= workers

    return check


def _stored_above(db: Database, floor: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await count(db, "SELECT count(*) FROM metering.usage_samples") > floor

    return check


def _all_charged(db: Database):  # type: ignore[no-untyped-def]
    """Return a check that all stored usage is charged and every charge committed."""

    async def check() -> bool:
        uncharged = await count(
            db,
            "SELECT count(*) FROM metering.usage_periods "
            "WHERE accelerator_micros <> charged_micros",
        )
        uncommitted = await count(
            db, "SELECT count(*) FROM metering.charges WHERE state <> 'committed'"
        )
        return uncharged == 0 and uncommitted == 0

    return check
