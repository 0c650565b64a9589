"""End-to-end scheduler benchmark: submission to started through every real component.

Starts a fresh stack on this machine: nats-server, a new PostgreSQL database on the server
named by ACSP_TEST_ADMIN_DSN, the grant, metering and scheduler services, and simulated agent
processes serving ``--nodes`` nodes of eight A100s. It funds a grant, then submits
``--jobs`` single-accelerator jobs running ``true`` through gRPC ``SubmitJob`` at ``--rate``
jobs per second with up to ``--concurrency`` calls in flight. Each agent launches a real
process per task.

It reports the submission latency (client-side, per call) and, from the scheduler's rows,
the time from submission to started (every task reported started) and the sustained rate of
starts. It also reports the CPU time per started job of each process it started, from /proc,
with and without the idle rate sampled before submitting; "tasks" is the CPU of the jobs'
own processes, which the agents reap. Run::

    python bench/e2e_bench.py --jobs 3000 --rate 1000 --nodes 250
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acsp.submitter import JobSubmitter
from acsp.v1 import scheduler_pb2
from services.runtime.auth import Role
from tests.scheduler.harness import (
    Stack,
    fund_grant,
    metadata,
    scheduler_stub,
    wait_for,
)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one live process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reaped_children_seconds(pid: int) -> float:
    """User plus system CPU seconds of the children ``pid`` has reaped (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds so far of every live PostgreSQL process on this machine (0 if none can be read).

    Backends that exit between two readings take their time with them, so a difference of two
    readings is a lower bound. The stack keeps its connections open, so little is lost.
    """
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm == "postgres":
                total += cpu_seconds(int(entry.name))
    return total


def launcher_pids(agent_pid: int) -> list[int]:
    """Return the pids of the task launchers that the agent ``agent_pid`` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent_pid and b"launcher.py" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def cpu_by_process(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each process of the stack, PostgreSQL and this benchmark's client."""
    usage: dict[str, float] = {}
    for process in stack.processes:
        name = process.name.split("-")[0]
        usage[name] = usage.get(name, 0.0) + cpu_seconds(process.popen.pid)
        if name == "agents":
            # The tasks themselves: each job's `true`, reaped by its agent, or by the agent's
            # task launcher, whose own CPU counts as the launcher's.
            usage["tasks"] = usage.get("tasks", 0.0) + reaped_children_seconds(process.popen.pid)
            for launcher in launcher_pids(process.popen.pid):
                usage["launcher"] = usage.get("launcher", 0.0) + cpu_seconds(launcher)
                usage["tasks"] += reaped_children_seconds(launcher)
    usage["postgres"] = postgres_cpu_seconds()
    own = resource.getrusage(resource.RUSAGE_SELF)
    usage["client"] = own.ru_utime + own.ru_stime
    return usage


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def submit_all(
    address: str,
    md: tuple[tuple[str, str], ...],
    project: str,
    grant: str,
    args: argparse.Namespace,
) -> tuple[list[float], float, int]:
    """Submit at a fixed rate; return per-call latencies (s), elapsed time and failures."""
    spec = scheduler_pb2.JobSpec(
        name="bench",
        project_id=project,
        grant_id=grant,
        task_count=1,
        accelerator_millis_per_task=1000,
        wall_time_seconds=args.wall_time,
        command=["true"],
    )
    latencies: list[float] = []
    failures = 0
    slots = asyncio.Semaphore(args.concurrency)
    channel, scheduler = scheduler_stub(address)

    submitter = (
        JobSubmitter(scheduler, metadata=md, max_batch=args.submitter_batch)
        if args.submitter
        else None
    )

    async def one(index: int) -> None:
        nonlocal failures
        try:
            started = time.perf_counter()
            if submitter is not None:
                await submitter.submit(
                    scheduler_pb2.SubmitJobRequest(request_id=f"bench-{index}", spec=spec)
                )
            elif args.batch == 1:
                await scheduler.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(request_id=f"bench-{index}", spec=spec),
                    metadata=md,
                    timeout=30,
                )
            else:
                requests = [
                    scheduler_pb2.SubmitJobRequest(request_id=f"bench-{index}-{i}", spec=spec)
                    for i in range(args.batch)
                ]
                await scheduler.SubmitJobs(
                    scheduler_pb2.SubmitJobsRequest(jobs=requests), metadata=md, timeout=30
                )
            latencies.append(time.perf_counter() - started)
        except Exception as exc:
            failures += 1
            if failures <= 3:
                print(f"submit {index} failed: {exc}", file=sys.stderr)
        finally:
            slots.release()

    tasks = []
    begin = time.perf_counter()
    async with channel:
        for index in range(args.jobs // args.batch):
            due = begin + index * args.batch / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        if submitter is not None:
            await submitter.close()
    return latencies, time.perf_counter() - begin, failures


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="acsp-e2e-bench-"))
    state_root = work
    stack = Stack(work)
    try:
        await stack.start_servers()
        await stack.start_grant()
        await stack.start_metering()
        _, address = await stack.start_scheduler()
        state_root = Path(tempfile.mkdtemp(prefix="acsp-e2e-agents-", dir=args.agent_state_dir))
        per_process = -(-args.nodes // args.agent_processes)
        for index in range(args.agent_processes):
            first = index * per_process
            count = min(per_process, args.nodes - first)
            if count > 0:
                stack.start_agents(
                    nodes=count,
                    name=f"agents-{index}",
                    first=first,
                    state_root=state_root,
                    provider=f"prov{index}",
                )
        project, grant, pi = await fund_grant(stack)
        md = metadata(stack.token(pi, Role.PI))
        conn = await asyncpg.connect(stack.dsn, timeout=10)
        try:
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) = $1 FROM scheduler.nodes", args.nodes),
                120,
                "every node's inventory",
                0.2,
            )
            idle_start = cpu_by_process(stack)
            await asyncio.sleep(args.idle_s)
            cpu_before = cpu_by_process(stack)
            idle = {
                name: (cpu_before[name] - idle_start.get(name, 0.0)) / args.idle_s
                for name in cpu_before
            }
            submit_began = time.time()
            latencies, elapsed, failures = await submit_all(address, md, project, grant, args)
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT count(*) = $1 FROM scheduler.jobs WHERE started_at IS NOT NULL",
                    args.jobs - failures * args.batch,
                ),
                args.drain_timeout,
                "every job to start",
                0.5,
            )
            rows = await conn.fetch(
                "SELECT extract(epoch FROM submitted_at) AS s, extract(epoch FROM started_at) AS t"
                " FROM scheduler.jobs WHERE started_at IS NOT NULL"
            )
            cpu_after = cpu_by_process(stack)
            window_s = time.time() - submit_began
            # Metering releases each hold about ACSP_METERING_LATENESS_S (1 s here) after its
            # job ends, so the whole cost of a job shows only once every hold is released.
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT count(*) >= $1 FROM metering.jobs WHERE released_at IS NOT NULL",
                    len(rows),
                ),
                args.drain_timeout,
                "every hold to be released",
                0.5,
            )
            cpu_released = cpu_by_process(stack)
            released_s = time.time() - submit_began
        finally:
            await conn.close()
    finally:
        await stack.close()
        if args.keep_logs:
            print(f"logs kept in {stack.log_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state_root, ignore_errors=True)
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    whole = {name: cpu_released[name] - cpu_before.get(name, 0.0) for name in cpu_released}
    if args.submitter:
        print("each job went through the SDK's JobSubmitter in SubmitJobs calls; a call is one job")
    report(latencies, elapsed, failures, rows, args.batch, cpu, idle, window_s)
    report_whole(whole, idle, released_s, len(rows))


def report(
    latencies: list[float],
    elapsed: float,
    failures: int,
    rows: list[asyncpg.Record],
    batch: int,
    cpu: dict[str, float],
    idle: dict[str, float],
    window_s: float,
) -> None:
    """Print the figures and the command that produced them."""
    to_start = [float(r["t"] - r["s"]) for r in rows]
    first = min(float(r["s"]) for r in rows)
    last = max(float(r["t"]) for r in rows)
    p50, p99 = 1000 * percentile(latencies, 0.5), 1000 * percentile(latencies, 0.99)
    print(" ".join(["command: python bench/e2e_bench.py", *sys.argv[1:]]))
    print(
        f"jobs submitted: {len(latencies) * batch} ok, {failures * batch} failed, in "
        f"{elapsed:.2f} s ({len(latencies) * batch / elapsed:.0f} jobs/s accepted, "
        f"{batch} per call)"
    )
    print(
        f"submission latency per call ms: p50 {p50:.1f}  p99 {p99:.1f}"
        f"  max {1000 * max(latencies):.1f}"
    )
    print(
        f"submission to started s: p50 {percentile(to_start, 0.5):.2f}"
        f"  p99 {percentile(to_start, 0.99):.2f}  max {max(to_start):.2f}"
        f"  mean {statistics.fmean(to_start):.2f}"
    )
    print(
        f"sustained starts: {len(rows)} jobs in {last - first:.2f} s from first submission "
        f"to last start = {len(rows) / (last - first):.0f} jobs/s"
    )
    total = sum(cpu.values())
    parts = "  ".join(f"{name} {1000 * seconds / len(rows):.2f}" for name, seconds in cpu.items())
    print(
        f"CPU ms per started job (submission to last start): "
        f"{1000 * total / len(rows):.2f} = {parts}"
    )
    # Heartbeats and timers cost CPU with no job at all; take that rate out over the window.
    net = {name: cpu[name] - idle.get(name, 0.0) * window_s for name in cpu}
    parts = "  ".join(f"{name} {1000 * seconds / len(rows):.2f}" for name, seconds in net.items())
    print(
        f"  of which idle (no jobs, {sum(idle.values()):.2f} cores over {window_s:.1f} s): "
        f"{1000 * (total - sum(net.values())) / len(rows):.2f}; net of idle: "
        f"{1000 * sum(net.values()) / len(rows):.2f} = {parts}"
    )


def report_whole(cpu: dict[str, float], idle: dict[str, float], window_s: float, jobs: int) -> None:
    """Print the CPU per job from the first submission until every hold was released."""
    net = {name: cpu[name] - idle.get(name, 0.0) * window_s for name in cpu}
    parts = "  ".join(f"{name} {1000 * seconds / jobs:.2f}" for name, seconds in net.items())
    print(
        f"CPU ms per job until every hold was released ({window_s:.1f} s), net of idle: "
        f"{1000 * sum(net.values()) / jobs:.2f} = {parts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs to submit")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered jobs per second")
    parser.add_argument("--nodes", type=int, default=250, help="simulated nodes of 8 A100s")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight at most")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="jobs per call: 1 sends SubmitJob, more send SubmitJobs (latency is per call)",
    )
    parser.add_argument(
        "--submitter",
        action="store_true",
        help="submit each job through the SDK's JobSubmitter, which sends SubmitJobs calls "
        "(latency is per job)",
    )
    parser.add_argument(
        "--submitter-batch", type=int, default=100, help="largest SubmitJobs call of --submitter"
    )
    parser.add_argument("--wall-time", type=int, default=60, help="wall-time limit per job, s")
    parser.add_argument(
        "--agent-processes", type=int, default=1, help="simulated agent processes sharing the nodes"
    )
    parser.add_argument(
        "--agent-state-dir",
        default=None,
        help="parent folder of the agents' state files (e.g. /dev/shm, which makes their "
        "fsync per task start and exit nearly free); default: the system temp folder",
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=5.0,
        help="seconds of CPU sampling with every node up and no job, before submitting",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument(
        "--drain-timeout", type=float, default=300.0, help="seconds to wait for every job to start"
    )
    args = parser.parse_args()
    if args.idle_s <= 0:
        parser.error("--idle-s must be above 0 (the idle CPU rate is divided by it)")
    if args.submitter and args.batch != 1:
        parser.error("--submitter sends one job per submit; leave --batch at 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
