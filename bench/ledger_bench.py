"""Benchmark the grant ledger: hold-then-commit pairs per second through gRPC and PostgreSQL.

Creates its own PostgreSQL database (dropped at the end) and runs the grant service as a
separate process (``python -m services.grant``) twice: once with batched ledger transactions
(``ACSP_GRANT_LEDGER_MAX_BATCH``, default 64) and once with one transaction per call
(``ACSP_GRANT_LEDGER_MAX_BATCH=1``, the naive baseline). In each it seeds ``--grants`` grants
and runs ``--concurrency`` clients for ``--seconds`` in two phases:

* spread: each pair places a hold on a random grant, then commits one charge of the whole hold;
* hot: every pair uses the same grant.

In these two a ledger operation is one PlaceHold or one CommitCharges call; a pair is two. With
``--items-per-call K`` (K > 0) two more phases call the ledger the way the scheduler and
metering do: one ``PlaceHolds`` call of K holds on random grants, then one ``CommitCharges``
call of K charges, one per placed hold. There a ledger operation is one hold or one charge,
each one ledger entry. ``items`` runs ``--items-concurrency`` client loops for throughput and
``items-lat`` runs ``--latency-concurrency`` loops for latency at a light load. Latency is per
call, measured at the client, and CPU time per operation is read from /proc for the service
and from getrusage for this client. As a ceiling for the RPC stack itself (TLS off, token auth,
the runtime's interceptors), the batched run also times GetInstitution, a call that reads one
row and does no ledger work. At the end the script checks that the postings sum to zero and
that every successful ledger operation left exactly one ledger entry. Run:

    python bench/ledger_bench.py --grants 1000 --seconds 15 --concurrency 64 --items-per-call 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc  # noqa: E402
from services.grant.ledger import Ledger  # noqa: E402
from services.grant.ledger_batcher import LedgerBatcher  # noqa: E402
from services.grant.ledger_ops import Cause, ChargeRequest, EntryResult, HoldRequest  # noqa: E402
from services.runtime.auth import generate_signing_key, load_signing_key, mint_token  # noqa: E402
from services.runtime.db import Database  # noqa: E402

HOLD = "0.000001"
"""PF-days held and then charged by each pair; small, so budgets never run out."""
PLACEMENT_REGION = "bench-cloud/bench-region"
PLACEMENT_MODEL = "H100-SXM5-80GB"
"""Placement the items phases send with each hold, as the scheduler does. The seeded grants
have no constraints, so the grant service checks the placement and allows it."""


@dataclass
class Phase:
    name: str
    calls: int = 0
    """Successful calls: two per hold-then-commit pair."""
    operations: int = 0
    """Ledger operations of the successful calls, each one ledger entry (reference: calls)."""
    failures: int = 0
    """Failed calls, and in the items phases the holds that a PlaceHolds call did not place."""
    latencies_ms: list[float] = field(default_factory=list)
    """One per successful call."""
    seconds: float = 0.0
    service_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def cpu_ms_per_op(self) -> tuple[float, float]:
        """CPU milliseconds per ledger operation: (grant service, benchmark client)."""
        ops = max(1, self.operations)
        return 1000 * self.service_cpu_s / ops, 1000 * self.client_cpu_s / ops

    def ops_per_s(self) -> float:
        return self.operations / self.seconds

    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


class Caller:
    """A stub whose calls carry a bearer token and a deadline."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.stub = grant_pb2_grpc.GrantServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def call(self, method: str, request: object) -> object:
        return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=30)


async def start_service(
    dsn: str, data_dir: Path, public_key: Path, max_batch: int, pool: int
) -> tuple[asyncio.subprocess.Process, str]:
    ready = data_dir / f"ready-{max_batch}"
    environ = {
        **os.environ,
        "ACSP_DATABASE_URL": dsn,
        "ACSP_GRPC_LISTEN": "127.0.0.1:0",
        "ACSP_TOKEN_PUBLIC_KEY": str(public_key),
        "ACSP_DATA_DIR": str(data_dir),
        "ACSP_READY_FILE": str(ready),
        "ACSP_LOG_LEVEL": "WARNING",
        "ACSP_OTEL_EXPORTER": "none",
        "ACSP_DB_POOL_MAX": str(pool + 2),
        "ACSP_GRANT_LEDGER_WORKERS": str(pool),
        "ACSP_GRANT_LEDGER_MAX_BATCH": str(max_batch),
        "ACSP_GRANT_EXPLORATORY_LIMIT_PF_DAYS": "1000000",
        # The benchmark's one PI awards itself its grants without review.
        "ACSP_GRANT_EXPLORATORY_PI_LIMIT_PF_DAYS": "100000000",
        "ACSP_GRANT_EXPLORATORY_INSTITUTION_LIMIT_PF_DAYS": "100000000",
    }
    environ.pop("ACSP_NATS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.grant", env=environ, cwd=REPOSITORY
    )
    deadline = time.monotonic() + 60
    while (address := _read_address(ready)) is None:
        if process.returncode is not None:
            raise RuntimeError(f"the grant service exited with status {process.returncode}")
        if time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError("the grant service did not start within 60 s")
        await asyncio.sleep(0.1)
    return process, address


def _read_address(ready: Path) -> str | None:
    """Return the ``host:port`` the service wrote once it serves, or None before."""
    return ready.read_text().strip() if ready.exists() else None


async def seed(office: Caller, pi: Caller, grants: int, tag: str) -> list[str]:
    """Create one institution, ``grants`` projects and one exploratory grant each."""
    await office.call(
        "CreateInstitution",
        grant_pb2.CreateInstitutionRequest(
            request_id=uuid.uuid4().hex,
            institution=grant_pb2.Institution(
                institution_id=f"uni-{tag}", display_name="U", country_code="NO"
            ),
        ),
    )
    now = datetime.now(UTC)
    semaphore = asyncio.Semaphore(32)

    async def one(index: int) -> str:
        async with semaphore:
            project_id = f"p-{tag}-{index}"
            await pi.call(
                "CreateProject",
                grant_pb2.CreateProjectRequest(
                    request_id=uuid.uuid4().hex,
                    project=grant_pb2.Project(
                        project_id=project_id,
                        institution_id=f"uni-{tag}",
                        display_name=project_id,
                        pi_subject="bench-pi",
                    ),
                ),
            )
            application = grant_pb2.Application(
                project_id=project_id,
                tier=grant_pb2.GRANT_TIER_EXPLORATORY,
                requested_pf_days=common_pb2.Decimal(value="1000"),
                justification="benchmark",
            )
            application.validity.start_time.FromDatetime(now - timedelta(hours=1))
            application.validity.end_time.FromDatetime(now + timedelta(days=30))
            response = await pi.call(
                "SubmitApplication",
                grant_pb2.SubmitApplicationRequest(
                    request_id=uuid.uuid4().hex, application=application
                ),
            )
            assert isinstance(response, grant_pb2.Application)
            return response.grant_id

    return list(await asyncio.gather(*(one(i) for i in range(grants))))


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_phase(
    name: str,
    scheduler: Caller,
    metering: Caller,
    grant_ids: list[str],
    args: argparse.Namespace,
    service_pid: int,
) -> Phase:
    seconds, clients = args.seconds, args.concurrency
    phase = Phase(name)
    service_before, client_before = process_cpu_s(service_pid), own_cpu_s()
    stop_at = time.monotonic() + seconds
    rng = random.Random(name)
    amount = common_pb2.Decimal(value=HOLD)

    async def client(number: int) -> None:
        while time.monotonic() < stop_at:
            grant_id = rng.choice(grant_ids)
            try:
                started = time.perf_counter()
                hold = await scheduler.call(
                    "PlaceHold",
                    grant_pb2.PlaceHoldRequest(
                        request_id=uuid.uuid4().hex,
                        grant_id=grant_id,
                        job_id=f"job-{number}",
                        amount_pf_days=amount,
                    ),
                )
                held = time.perf_counter()
                assert isinstance(hold, grant_pb2.Hold)
                await metering.call(
                    "CommitCharges",
                    grant_pb2.CommitChargesRequest(
                        charges=[
                            grant_pb2.ChargeItem(
                                request_id=uuid.uuid4().hex,
                                hold_id=hold.hold_id,
                                amount_pf_days=amount,
                            )
                        ]
                    ),
                )
                done = time.perf_counter()
            except grpc.aio.AioRpcError as error:
                phase.failures += 1
                print(f"  call failed: {error.code().name}: {error.details()}", file=sys.stderr)
                continue
            phase.latencies_ms += [(held - started) * 1000, (done - held) * 1000]
            phase.calls += 2
            phase.operations += 2

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    phase.seconds = time.monotonic() - started
    phase.service_cpu_s = process_cpu_s(service_pid) - service_before
    phase.client_cpu_s = own_cpu_s() - client_before
    return phase


async def run_items_phase(
    name: str,
    scheduler: Caller,
    metering: Caller,
    grant_ids: list[str],
    args: argparse.Namespace,
    clients: int,
    service_pid: int,
) -> Phase:
    """Run ``clients`` loops of one PlaceHolds call of K holds, then one CommitCharges call of
    a charge per placed hold, for ``args.seconds``."""
    items = args.items_per_call
    phase = Phase(name)
    service_before, client_before = process_cpu_s(service_pid), own_cpu_s()
    stop_at = time.monotonic() + args.seconds
    rng = random.Random(name)
    amount = common_pb2.Decimal(value=HOLD)

    async def place(number: int) -> list[str]:
        holds = [
            grant_pb2.PlaceHoldRequest(
                request_id=uuid.uuid4().hex,
                grant_id=rng.choice(grant_ids),
                job_id=f"job-{number}-{index}",
                amount_pf_days=amount,
                placement_regions=[PLACEMENT_REGION],
                accelerator_model=PLACEMENT_MODEL,
            )
            for index in range(items)
        ]
        started = time.perf_counter()
        response = await scheduler.call("PlaceHolds", grant_pb2.PlaceHoldsRequest(holds=holds))
        phase.latencies_ms.append((time.perf_counter() - started) * 1000)
        assert isinstance(response, grant_pb2.PlaceHoldsResponse)
        placed = [r.hold.hold_id for r in response.results if r.code == 0]
        for result in response.results:
            if result.code != 0:
                print(f"  hold not placed: {result.code}: {result.message}", file=sys.stderr)
        phase.calls += 1
        phase.operations += len(placed)
        phase.failures += items - len(placed)
        return placed

    async def commit(hold_ids: list[str]) -> None:
        charges = [
            grant_pb2.ChargeItem(request_id=uuid.uuid4().hex, hold_id=h, amount_pf_days=amount)
            for h in hold_ids
        ]
        started = time.perf_counter()
        await metering.call("CommitCharges", grant_pb2.CommitChargesRequest(charges=charges))
        phase.latencies_ms.append((time.perf_counter() - started) * 1000)
        phase.calls += 1
        phase.operations += len(charges)

    async def client(number: int) -> None:
        while time.monotonic() < stop_at:
            try:
                hold_ids = await place(number)
                if hold_ids:
                    await commit(hold_ids)
            except grpc.aio.AioRpcError as error:
                phase.failures += 1
                print(f"  call failed: {error.code().name}: {error.details()}", file=sys.stderr)

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    phase.seconds = time.monotonic() - started
    phase.service_cpu_s = process_cpu_s(service_pid) - service_before
    phase.client_cpu_s = own_cpu_s() - client_before
    return phase


async def run_reference(
    office: Caller, institution_id: str, args: argparse.Namespace, service_pid: int
) -> Phase:
    """Time GetInstitution, one indexed read and no ledger work, as the RPC stack's ceiling."""
    phase = Phase("reference")
    service_before, client_before = process_cpu_s(service_pid), own_cpu_s()
    stop_at = time.monotonic() + args.seconds
    request = grant_pb2.GetInstitutionRequest(institution_id=institution_id)

    async def client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await office.call("GetInstitution", request)
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            phase.calls += 1
            phase.operations += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    phase.seconds = time.monotonic() - started
    phase.service_cpu_s = process_cpu_s(service_pid) - service_before
    phase.client_cpu_s = own_cpu_s() - client_before
    return phase


async def run_mode(
    dsn: str, data_dir: Path, public_key: Path, key_path: Path, args: argparse.Namespace, batch: int
) -> tuple[list[Phase], list[str]]:
    process, address = await start_service(dsn, data_dir, public_key, batch, args.workers)
    key = load_signing_key(key_path)
    channel = grpc.aio.insecure_channel(address)
    try:
        office = Caller(channel, mint_token(key, "bench-office", ["program_office"]))
        pi = Caller(channel, mint_token(key, "bench-pi", ["pi"]))
        scheduler = Caller(channel, mint_token(key, "scheduler", ["service"]))
        metering = Caller(channel, mint_token(key, "metering", ["service"]))
        tag = f"b{batch}"
        grant_ids = await seed(office, pi, args.grants, tag)
        phases = [
            await run_phase("spread", scheduler, metering, grant_ids, args, process.pid),
            await run_phase("hot", scheduler, metering, grant_ids[:1], args, process.pid),
        ]
        if args.items_per_call > 0:
            for name, clients in (
                ("items", args.items_concurrency),
                ("items-lat", args.latency_concurrency),
            ):
                phases.append(
                    await run_items_phase(
                        name, scheduler, metering, grant_ids, args, clients, process.pid
                    )
                )
        if batch > 1:
            phases.append(await run_reference(office, f"uni-{tag}", args, process.pid))
        summary = await office.call("GetLedgerSummary", grant_pb2.GetLedgerSummaryRequest())
        assert isinstance(summary, grant_pb2.GetLedgerSummaryResponse)
        if summary.postings_sum_pf_days.value != "0" or summary.negative_grant_ids:
            raise AssertionError(f"the ledger does not balance: {summary}")
        print(f"{tag}: postings sum to 0, no grant negative", flush=True)
        return phases, grant_ids
    finally:
        await channel.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)


async def run_direct(dsn: str, grant_ids: list[str], args: argparse.Namespace, batch: int) -> Phase:
    """Run the spread phase against the ledger in this process, without gRPC or tokens."""
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=args.workers + 2, server_settings={"search_path": '"grant"'}
    )
    assert pool is not None
    database = Database(pool, "grant", acquire_timeout_s=30)
    batcher = LedgerBatcher(Ledger(database), workers=args.workers, max_batch=batch)
    runner = asyncio.create_task(batcher.run())
    await asyncio.sleep(0)  # run() marks the batcher running before its first await
    assert batcher.running
    phase = Phase(f"spread-{'batched' if batch > 1 else 'naive'}")
    rng = random.Random(batch)
    amount = Decimal(HOLD)
    cause = Cause(actor="bench", trigger="bench")
    client_before = own_cpu_s()
    stop_at = time.monotonic() + args.seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            hold = await batcher.submit(
                HoldRequest(uuid.uuid4().hex, rng.choice(grant_ids), None, None, "j", amount, cause)
            )
            held = time.perf_counter()
            assert isinstance(hold, EntryResult) and hold.hold_id is not None, hold
            charge = await batcher.submit(
                ChargeRequest(uuid.uuid4().hex, hold.hold_id, amount, cause)
            )
            done = time.perf_counter()
            assert isinstance(charge, EntryResult), charge
            phase.latencies_ms += [(held - started) * 1000, (done - held) * 1000]
            phase.calls += 2
            phase.operations += 2

    started = time.monotonic()
    try:
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    finally:
        phase.seconds = time.monotonic() - started
        phase.client_cpu_s = own_cpu_s() - client_before
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await database.close()
    return phase


async def count_entries(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval('SELECT count(*) FROM "grant".ledger_entries'))
    finally:
        await conn.close()


def report(label: str, phase: Phase) -> str:
    median = statistics.median(phase.latencies_ms or [0])
    service_ms, client_ms = phase.cpu_ms_per_op()
    pairs = ""
    if phase.name in ("spread", "hot") or phase.name.startswith("spread-"):
        pairs = f"{phase.ops_per_s() / 2:6.0f} pairs/s "
    if label == "direct":
        # The ledger runs in this process, so its CPU is in the client figure.
        cpu = f"CPU/op ledger and client {client_ms:.2f} ms"
    else:
        cpu = f"CPU/op service {service_ms:.2f} ms client {client_ms:.2f} ms"
    return (
        f"{label:<8} {phase.name:<9} {pairs:>14}"
        f"{phase.ops_per_s():7.0f} ops/s {phase.calls_per_s():6.0f} calls/s  "
        f"p50/call {median:6.1f} ms p99/call {phase.percentile(0.99):6.1f} ms  {cpu}  "
        f"failures {phase.failures}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--grants", type=int, default=1000, help="grants in the spread phase")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent client loops")
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        help="ledger worker queues, one transaction at a time each",
    )
    parser.add_argument("--batch", type=int, default=64, help="ledger requests per transaction")
    parser.add_argument(
        "--items-per-call",
        type=int,
        default=32,
        help="holds per PlaceHolds call and charges per CommitCharges call in the items "
        "phases; 0 skips them",
    )
    parser.add_argument(
        "--items-concurrency",
        type=int,
        default=8,
        help="concurrent client loops in the items phase",
    )
    parser.add_argument(
        "--latency-concurrency",
        type=int,
        default=1,
        help="concurrent client loops in the items-lat phase",
    )
    args = parser.parse_args()
    if args.items_per_call < 0 or args.items_per_call > 1000:
        parser.error(
            f"--items-per-call is {args.items_per_call}; use 0 (skip) to 1000, the most "
            "holds one PlaceHolds call may carry"
        )

    name = f"grant_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            data_dir = Path(folder)
            key_path, public_key = generate_signing_key(data_dir)
            results: list[tuple[str, Phase]] = []
            seeded: list[str] = []
            for label, batch in (("batched", args.batch), ("naive", 1)):
                phases, grant_ids = await run_mode(dsn, data_dir, public_key, key_path, args, batch)
                seeded = seeded or grant_ids
                results += [(label, p) for p in phases]
                for phase in phases:
                    print(report(label, phase), flush=True)
            for batch in (args.batch, 1):
                phase = await run_direct(dsn, seeded, args, batch)
                results.append(("direct", phase))
                print(report("direct", phase), flush=True)
            entries = await count_entries(dsn)
            operations = sum(p.operations for _, p in results if p.name != "reference")
            expected = 2 * args.grants + operations
            print(f"ledger entries {entries}, expected {expected} (awards + holds + charges)")
            assert entries == expected
            by_key = {(label, p.name): p for label, p in results}
            for phase_name in ("spread", "hot"):
                ratio = (
                    by_key[("batched", phase_name)].ops_per_s()
                    / by_key[("naive", phase_name)].ops_per_s()
                )
                print(f"{phase_name}: batched / naive = {ratio:.2f}x")
            if args.items_per_call > 0:
                ratio = (
                    by_key[("batched", "items")].ops_per_s()
                    / by_key[("naive", "items")].ops_per_s()
                )
                print(f"items: batched / naive = {ratio:.2f}x")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(
        "command: python bench/ledger_bench.py "
        f"--grants {args.grants} --seconds {args.seconds:g} --concurrency {args.concurrency} "
        f"--workers {args.workers} --batch {args.batch} --items-per-call {args.items_per_call} "
        f"--items-concurrency {args.items_concurrency} "
        f"--latency-concurrency {args.latency_concurrency}"
    )


if __name__ == "__main__":
    asyncio.run(main())
