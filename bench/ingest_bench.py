"""Benchmark the metering ingest: usage samples per second from publish to committed row.

Starts its own nats-server on a free loopback port and creates its own PostgreSQL database
(dropped at the end), then:

1. publishes ``--samples`` usage samples in UsageReport messages of ``--per-report`` samples at
   ``--rate`` samples/s (0 = as fast as JetStream acks them, many acks in flight), while the
   ingest (exactly-once: COPY to staging, INSERT ... ON CONFLICT on the sample id) and the
   charger run in the same process; the throughput is samples / (last row committed - first
   publish);
2. measures the charge-to-ledger lag: for each charge, from the moment its usage was both
   committed and due (its period closed plus the lateness allowance) to the ledger's acceptance;
3. consumes the first ``--baseline-samples`` of the same stream with a one-INSERT-per-sample
   consumer into a copy of the table, and reports the ratio.

With ``--ledger memory`` the ledger is an in-memory one that applies each request id once;
with ``--ledger grant`` (the default) the charges go over gRPC to a real grant service started
on the same database, against holds placed through its PlaceHold RPC. Run:

    python bench/ingest_bench.py --samples 300000 --per-report 500
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
from nats.js import JetStreamContext

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acsp.subjects import usage_subject
from acsp.v1 import agent_pb2, common_pb2, grant_pb2, grant_pb2_grpc
from services.metering.attempts import AttemptFacts, record_attempt
from services.metering.charger import Charger, ChargerConfig
from services.metering.ingest import (
    IngestConfig,
    UsageIngest,
    consumer_config,
    declare_usage_stream,
)
from services.metering.ledger import ChargeOutcome, GrantTerms, GrpcLedger, Ledger, LedgerCharge
from services.metering.ratecard import RateCardHistory, RatePolicy, default_rate_card
from services.runtime.auth import Role, generate_signing_key, load_signing_key, mint_token
from services.runtime.channel import open_channel
from services.runtime.db import Database
from services.runtime.migrations import apply_migrations

ADMIN_URL = os.environ.get(
    "ACSP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SAMPLE_TIME_BASE = datetime(2026, 11, 1, tzinfo=UTC)
"""Sample time of the first publish; the charger's clock runs from it at wall-clock speed."""
JOBS = 200
MODELS = ("A100-SXM4-80GB", "H800", "T4", "MI300X")


@dataclass
class RecordingLedger:
    """Records when the ledger accepted each charge (wall clock).

    Without an inner ledger it is an in-memory ledger applying each request id once; with one
    it forwards every call and records the moment the inner ledger returned.
    """

    inner: Ledger | None = None
    accepted_at: dict[str, float] = field(default_factory=dict)
    amounts: dict[str, Decimal] = field(default_factory=dict)

    async def commit_charges(
        self, charges: Sequence[LedgerCharge], timeout_s: float
    ) -> list[ChargeOutcome]:
        if self.inner is not None:
            outcomes = await self.inner.commit_charges(charges, timeout_s)
        else:
            outcomes = [
                ChargeOutcome(c.request_id, i, c.request_id not in self.accepted_at)
                for i, c in enumerate(charges)
            ]
        now = time.time()
        for charge in charges:
            if charge.request_id not in self.accepted_at:
                self.accepted_at[charge.request_id] = now
                self.amounts[charge.request_id] = charge.amount
        return outcomes

    async def release_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        if self.inner is not None:
            await self.inner.release_hold(request_id, hold_id, timeout_s)

    async def settle_hold(self, request_id: str, hold_id: str, timeout_s: float) -> None:
        if self.inner is not None:
            await self.inner.settle_hold(request_id, hold_id, timeout_s)

    async def refund(
        self, request_id: str, hold_id: str, amount: Decimal, reason: str, timeout_s: float
    ) -> int:
        if self.inner is not None:
            return await self.inner.refund(request_id, hold_id, amount, reason, timeout_s)
        return 0

    async def grant_terms(self, grant_id: str, timeout_s: float) -> GrantTerms:
        return GrantTerms(RatePolicy.CURRENT, None)


def build_reports(total: int, per_report: int, rate: float) -> list[tuple[float, bytes]]:
    """Return (planned publish offset in seconds, payload) for every report."""
    reports = []
    sample_rate = rate if rate > 0 else 50_000.0
    # Each job's samples follow one another without overlap, as one agent's samples of an
    # accelerator do, and end about when they are published.
    width_us = round(JOBS / sample_rate * 1_000_000)
    for first in range(0, total, per_report):
        offset = first / sample_rate
        samples = []
        for index in range(first, min(first + per_report, total)):
            job = index % JOBS
            end = SAMPLE_TIME_BASE + timedelta(microseconds=(index // JOBS + 1) * width_us)
            start = end - timedelta(microseconds=width_us)
            share = 1000 if job % 3 else 250
            seconds = Decimal(width_us * share) / 1_000_000_000
            item = agent_pb2.UsageSample(
                sample_id=f"bench.r1.node-{job % 50}/{index}",
                task_id=f"job-{job}/0/0",
                job_id=f"job-{job}",
                accelerator_id=f"GPU-{job}",
                model=MODELS[job % len(MODELS)],
                share_millis=share,
                accelerator_seconds=common_pb2.Decimal(value=str(seconds)),
                utilization=agent_pb2.OptionalMetric(value=0.5 + (index % 50) / 100),
                sequence=index,
            )
            item.start_time.FromDatetime(start)
            item.end_time.FromDatetime(end)
            samples.append(item)
        report = agent_pb2.UsageReport(
            node=agent_pb2.NodeRef(provider_id="bench", region_id="r1", node_id="node-0"),
            samples=samples,
        )
        reports.append((offset, report.SerializeToString()))
    return reports


async def publish(js: JetStreamContext, reports: list[tuple[float, bytes]], rate: float) -> None:
    subject = usage_subject("bench", "r1", "node-0")
    start = time.monotonic()
    in_flight: set[asyncio.Task[object]] = set()
    for offset, payload in reports:
        if rate > 0:
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        in_flight.add(asyncio.create_task(js.publish(subject, payload, timeout=30)))
        if len(in_flight) >= 64:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    if in_flight:
        await asyncio.gather(*in_flight)


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent while the samples went from publish to committed rows."""

    python_s: float
    """This process: publisher, decoding, validation, COPY encoding, charger."""
    postgres_s: float
    """The PostgreSQL backends serving this benchmark's database."""


async def backend_cpu_s(db: Database) -> float:
    """Return the CPU seconds used so far by every backend connected to the bench database.

    Reads /proc, so it counts only when PostgreSQL runs on this machine (it does here).
    """
    async with db.acquire() as conn:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for row in pids:
        try:
            stat = Path(f"/proc/{row['pid']}/stat").read_text()  # noqa: ASYNC240 - procfs
            fields = stat.rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 14 and 15 of /proc/<pid>/stat (user and system time), after the name.
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def count_rows(db: Database, table: str) -> int:
    async with db.acquire() as conn:
        return int(await conn.fetchval(f"SELECT count(*) FROM metering.{table}"))


async def run_main_phase(
    args: argparse.Namespace,
    js: JetStreamContext,
    db: Database,
    ledger: RecordingLedger,
    holds: dict[str, str],
) -> tuple[float, list[float], RecordingLedger, CpuUse]:
    reports = build_reports(args.samples, args.per_report, args.rate)
    async with db.acquire() as conn:
        for job in range(JOBS):
            hold = holds.get(f"job-{job}", f"hold-{job}")
            await record_attempt(
                conn, AttemptFacts(f"job-{job}", 0, hold, "grant-bench", "proj", "inst")
            )
    config = IngestConfig(
        workers=args.workers,
        batch_messages=args.batch,
        period_seconds=args.period,
        fetch_timeout_s=0.2,
    )
    await declare_usage_stream(js, config)
    card = default_rate_card()
    history = RateCardHistory((card,))
    wall_start = time.time()

    def virtual_now() -> datetime:
        return SAMPLE_TIME_BASE + timedelta(seconds=time.time() - wall_start)

    ingest = UsageIngest(js, db, config, lambda: card.rates)
    charger = Charger(
        db,
        ledger,
        lambda: history,
        ChargerConfig(period_seconds=args.period, lateness_s=args.lateness, interval_s=0.25),
        clock=virtual_now,
    )
    stop = asyncio.Event()
    cpu_start = time.process_time()
    pg_start = await backend_cpu_s(db)
    async with asyncio.TaskGroup() as group:
        group.create_task(ingest.run(stop))
        group.create_task(charger.run(stop))
        await publish(js, reports, args.rate)
        published = time.time()
        # Poll the ingest's own counter: counting rows in SQL would load PostgreSQL and
        # distort the CPU figures.
        while ingest.counters.inserted < args.samples:
            if ingest.counters.dead_lettered:
                raise AssertionError(
                    f"the ingest kept {ingest.counters.dead_lettered} samples as dead letters"
                )
            await asyncio.sleep(0.02)
        committed = time.time()
        if await count_rows(db, "usage_samples") != args.samples:
            raise AssertionError("the table does not hold exactly the published samples")
        cpu = CpuUse(time.process_time() - cpu_start, await backend_cpu_s(db) - pg_start)
        # Let the last periods close and be charged before stopping.
        deadline = time.time() + args.period + args.lateness + 15
        while time.time() < deadline and await _uncharged(db):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        stop.set()
    print(f"published {args.samples} samples in {published - wall_start:.2f} s")
    throughput = args.samples / (committed - wall_start)
    lags = await charge_lags(db, ledger, wall_start, args)
    return throughput, lags, ledger, cpu


async def _uncharged(db: Database) -> bool:
    async with db.acquire() as conn:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM metering.usage_periods "
                "WHERE accelerator_micros > charged_micros) OR EXISTS "
                "(SELECT 1 FROM metering.charges WHERE state = 'pending')"
            )
        )


async def charge_lags(
    db: Database, ledger: RecordingLedger, wall_start: float, args: argparse.Namespace
) -> list[float]:
    """Return, per charge, seconds from 'usage committed and period due' to ledger acceptance."""
    async with db.acquire() as conn:
        received = await conn.fetch(
            "SELECT job_id, period_start, received_at FROM metering.usage_samples "
            "ORDER BY received_at"
        )
        charges = await conn.fetch("SELECT request_id, job_id, period_start FROM metering.charges")
    arrivals: dict[tuple[str, datetime], list[float]] = {}
    for row in received:
        arrivals.setdefault((row["job_id"], row["period_start"]), []).append(
            row["received_at"].timestamp()
        )
    lags = []
    for charge in charges:
        accepted = ledger.accepted_at.get(charge["request_id"])
        if accepted is None:
            continue
        due_virtual = charge["period_start"] + timedelta(seconds=args.period + args.lateness)
        due_wall = wall_start + (due_virtual - SAMPLE_TIME_BASE).total_seconds()
        times = arrivals[(charge["job_id"], charge["period_start"])]
        latest = times[max(bisect.bisect_right(times, accepted) - 1, 0)]
        lags.append(accepted - max(due_wall, latest))
    return lags


async def run_baseline(args: argparse.Namespace, js: JetStreamContext, db: Database) -> float:
    """Consume the same stream with one autocommitted INSERT per sample."""
    async with db.acquire() as conn:
        await conn.execute(
            "CREATE TABLE metering.baseline_samples (LIKE metering.usage_samples INCLUDING ALL)"
        )
    config = IngestConfig(durable="bench-baseline", ack_wait_s=60)
    subscription = await js.pull_subscribe(
        "acsp.usage.>", durable=config.durable, stream=config.stream, config=consumer_config(config)
    )
    card = default_rate_card()
    decoder = UsageIngest(js, db, config, lambda: card.rates)
    inserted = 0
    start = time.time()
    async with db.acquire() as conn:
        while inserted < args.baseline_samples:
            messages = await subscription.fetch(10, timeout=5)
            samples, _ = decoder._decode(messages, datetime.now(UTC))
            for s in samples:
                await conn.execute(
                    "INSERT INTO metering.baseline_samples VALUES "
                    "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,"
                    "'epoch'::timestamptz + $11 * interval '1 microsecond',"
                    "'epoch'::timestamptz + $12 * interval '1 microsecond',$13,$14,"
                    "'epoch'::timestamptz + $11 * interval '1 microsecond',$15,now()) "
                    "ON CONFLICT (provider, sample_id) DO NOTHING",
                    s.sample_id,
                    s.job_id,
                    s.attempt,
                    s.task_id,
                    s.provider,
                    s.region,
                    s.node,
                    s.accelerator_id,
                    s.accelerator_model,
                    s.share_millis,
                    s.start_us,
                    s.end_us,
                    s.accelerator_micros,
                    s.utilization,
                    s.stream_sequence,
                )
                inserted += 1
            for message in messages:
                await message.ack()
    return inserted / (time.time() - start)


async def start_grant_service(url: str, work: Path) -> tuple[asyncio.subprocess.Process, str, Path]:
    """Start ``python -m services.grant`` on the bench database; return it, its address, key."""
    private, public = generate_signing_key(work)
    ready = work / "grant-ready"
    environ = {
        **os.environ,
        "ACSP_DATABASE_URL": url,
        "ACSP_GRPC_LISTEN": "127.0.0.1:0",
        "ACSP_TOKEN_PUBLIC_KEY": str(public),
        "ACSP_DATA_DIR": str(work),
        "ACSP_READY_FILE": str(ready),
        "ACSP_LOG_LEVEL": "WARNING",
        "ACSP_OTEL_EXPORTER": "none",
        "ACSP_GRANT_EXPLORATORY_LIMIT_PF_DAYS": "1000000",
        # The benchmark's one PI awards itself its grants without review.
        "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": "100000000",
        "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": "100000000",
    }
    environ.pop("ACSP_NATS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.grant", env=environ
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("the grant service did not start within 60 s")
        await asyncio.sleep(0.1)
    return process, ready.read_text().strip(), private


async def seed_holds(address: str, key_path: Path) -> dict[str, str]:
    """Create an institution, a project, an exploratory grant and one hold per job."""
    key = load_signing_key(key_path)

    def stub(subject: str, roles: list[Role], **claims: str) -> grant_pb2_grpc.GrantServiceStub:
        token = mint_token(key, subject, roles, **claims)  # type: ignore[arg-type]
        return grant_pb2_grpc.GrantServiceStub(open_channel(address, token=token))

    office = stub("bench-office", [Role.PROGRAM_OFFICE])
    pi = stub("bench-pi", [Role.PI], institution="uni-bench")
    scheduler = stub("scheduler", [Role.SERVICE])
    await office.CreateInstitution(
        grant_pb2.CreateInstitutionRequest(
            request_id="bench-inst",
            institution=grant_pb2.Institution(
                institution_id="uni-bench", display_name="U", country_code="NO"
            ),
        )
    )
    await pi.CreateProject(
        grant_pb2.CreateProjectRequest(
            request_id="bench-project",
            project=grant_pb2.Project(
                project_id="proj-bench",
                institution_id="uni-bench",
                display_name="ingest benchmark",
                pi_subject="bench-pi",
            ),
        )
    )
    application = grant_pb2.Application(
        project_id="proj-bench",
        tier=grant_pb2.GRANT_TIER_EXPLORATORY,
        requested_pf_days=common_pb2.Decimal(value="1000"),
        justification="ingest benchmark",
    )
    now = datetime.now(UTC)
    application.validity.start_time.FromDatetime(now - timedelta(days=60))
    application.validity.end_time.FromDatetime(now + timedelta(days=30))
    awarded = await pi.SubmitApplication(
        grant_pb2.SubmitApplicationRequest(request_id="bench-app", application=application)
    )
    holds = {}
    for job in range(JOBS):
        hold = await scheduler.PlaceHold(
            grant_pb2.PlaceHoldRequest(
                request_id=f"job-{job}/0",
                grant_id=awarded.grant_id,
                job_id=f"job-{job}",
                amount_pf_days=common_pb2.Decimal(value="2"),
            )
        )
        holds[f"job-{job}"] = hold.hold_id
    return holds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    store = tempfile.mkdtemp(prefix="ingest-bench-")
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        binary,
        *("-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    name = f"ingest_bench_{uuid.uuid4().hex[:10]}"
    base = ADMIN_URL.rpartition("/")[0]
    url = f"{base}/{name}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await apply_migrations(url, "metering", "services.metering.migrations")
        pool = await asyncpg.create_pool(url, min_size=2, max_size=args.workers + 4, timeout=10)
        assert pool is not None
        db = Database(pool, "metering", 30.0)
        client = None
        for _ in range(100):
            try:
                client = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1)
                break
            except (OSError, nats.errors.NoServersError):
                await asyncio.sleep(0.05)
        assert client is not None
        js = client.jetstream()
        grant_process = None
        holds: dict[str, str] = {}
        ledger = RecordingLedger()
        try:
            if args.ledger == "grant":
                grant_process, address, key_path = await start_grant_service(url, Path(store))
                holds = await seed_holds(address, key_path)
                token = mint_token(load_signing_key(key_path), "metering", [Role.SERVICE])
                ledger = RecordingLedger(GrpcLedger(open_channel(address, token=token)))
            throughput, lags, ledger, cpu = await run_main_phase(args, js, db, ledger, holds)
        finally:
            if grant_process is not None:
                grant_process.terminate()
                await asyncio.wait_for(grant_process.wait(), 20)
        baseline = await run_baseline(args, js, db)
        await client.close()
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
        shutil.rmtree(store, ignore_errors=True)

    lags.sort()
    p50 = lags[len(lags) // 2] if lags else float("nan")
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else float("nan")
    print(f"command: python bench/ingest_bench.py {' '.join(sys.argv[1:])}")
    print(
        f"samples: {args.samples} in reports of {args.per_report}, {args.workers} workers, "
        f"{args.ledger} ledger"
    )
    print(f"exactly-once ingest: {throughput:,.0f} samples/s, publish to committed row")
    python_us = cpu.python_s / args.samples * 1e6
    postgres_us = cpu.postgres_s / args.samples * 1e6
    print(f"CPU per sample: {python_us:.1f} us in Python, {postgres_us:.1f} us in PostgreSQL")
    print(
        "estimate with one idle core each for Python and PostgreSQL: "
        f"{1e6 / max(python_us, postgres_us):,.0f} samples/s"
    )
    print(f"one-INSERT-per-sample baseline: {baseline:,.0f} samples/s")
    print(f"ratio: {throughput / baseline:.1f}x")
    print(
        f"charges: {len(ledger.accepted_at)}, charge-to-ledger lag p50 {p50:.2f} s, "
        f"p99 {p99:.2f} s, max {lags[-1] if lags else float('nan'):.2f} s"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300_000, help="samples to publish")
    parser.add_argument("--per-report", type=int, default=500, help="samples per UsageReport")
    parser.add_argument(
        "--rate", type=float, default=0, help="publish rate, samples/s (0: as fast as acked)"
    )
    parser.add_argument("--workers", type=int, default=2, help="ingest workers")
    parser.add_argument(
        "--ledger",
        choices=("grant", "memory"),
        default="grant",
        help="commit charges to a real grant service or to an in-memory ledger",
    )
    parser.add_argument("--batch", type=int, default=40, help="messages per fetch")
    parser.add_argument("--period", type=int, default=5, help="charging period, seconds")
    parser.add_argument("--lateness", type=float, default=1.0, help="lateness allowance, s")
    parser.add_argument(
        "--baseline-samples", type=int, default=20_000, help="samples for the baseline"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
