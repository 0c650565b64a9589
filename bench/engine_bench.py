"""Benchmark the placement engine on a synthetic fleet, against a naive first-fit scan.

Fleet: 10,000 nodes x 8 accelerators, four models over three providers and nine regions,
interconnect domains of four nodes. Figures:

1. placements per second for 1-accelerator jobs (one pass placing 50,000 jobs);
2. latency of placing one 64-accelerator gang (8 tasks x 8, same region) on a fleet that is
   60 % used, p50 and p99 over 200 placements;
3. one full pass over 100,000 pending mixed jobs.

Each figure is compared with a naive scheduler run in the same process, which scans every
node for every job (first fit, no index). The naive pass over 100,000 jobs would take hours, so
its rate is measured on a sample and the figure extrapolated, as the output states.

Times are process CPU time by default, because the development machine is shared and its
wall-clock times swing with other people's load; ``--wall`` measures wall-clock time instead.
The load average at the start is printed with the figures.

Run: python bench/engine_bench.py [--quick] [--wall]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, replace

from scheduler.engine import (
    Engine,
    EngineConfig,
    JobEnded,
    JobOutcome,
    JobSpec,
    NodeSpec,
    Place,
    PriorityClass,
    Topology,
)

CLOCK = [time.process_time]
"""Timer of every figure: process CPU time, or wall-clock time with ``--wall``."""

MODELS = ("A100-SXM4-80GB", "H100-SXM5-80GB", "MI300X", "T4")
PROVIDERS = ("cloud-a", "cloud-b", "chipmaker-c")
REGIONS_PER_PROVIDER = 3
ACCELERATORS_PER_NODE = 8
NODES_PER_DOMAIN = 4


def build_fleet(node_count: int) -> list[NodeSpec]:
    nodes = []
    for i in range(node_count):
        provider = PROVIDERS[i % len(PROVIDERS)]
        region = f"region-{(i // len(PROVIDERS)) % REGIONS_PER_PROVIDER}"
        model = MODELS[(i // 7) % len(MODELS)]
        node_id = f"node-{i:05d}"
        nodes.append(
            NodeSpec(
                node_id,
                provider,
                region,
                model,
                tuple(f"{node_id}/gpu{k}" for k in range(ACCELERATORS_PER_NODE)),
                f"{provider}/{region}/{model}/dom-{i // (NODES_PER_DOMAIN * 84)}-{i % 21}",
            )
        )
    return nodes


def new_engine(nodes: list[NodeSpec]) -> Engine:
    engine = Engine(EngineConfig(half_life_s=86_400.0))
    engine.add_nodes(nodes)
    settle()
    return engine


def settle() -> None:
    """Move everything built so far out of the cyclic garbage collector's reach.

    A long-running scheduler does the same after loading its fleet; otherwise full collections
    over millions of long-lived objects show up as latency spikes.
    """
    gc.collect()
    gc.freeze()


def one_accelerator_jobs(count: int, prefix: str) -> list[JobSpec]:
    return [
        JobSpec(f"{prefix}{i}", f"proj-{i % 200}", f"inst-{i % 20}", float(i)) for i in range(count)
    ]


def mixed_jobs(count: int, seed: int = 1) -> list[JobSpec]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        roll = rng.random()
        tasks, millis, topology = 1, 1000, Topology.SAME_PROVIDER
        if roll < 0.25:
            millis = rng.choice((250, 500))
        elif roll < 0.75:
            millis = rng.choice((1000, 2000, 4000, 8000))
        elif roll < 0.95:
            tasks, millis, topology = rng.choice((2, 4)), 8000, Topology.SAME_REGION
        else:
            tasks, millis = 8, 8000
            topology = rng.choice((Topology.SAME_REGION, Topology.SAME_INTERCONNECT_DOMAIN))
        models = (
            frozenset(rng.sample(MODELS, rng.choice((1, 2)))) if rng.random() < 0.6 else frozenset()
        )
        jobs.append(
            JobSpec(
                job_id=f"m{i}",
                project=f"proj-{rng.randrange(200)}",
                institution=f"inst-{rng.randrange(20)}",
                submit_time=float(i),
                priority=rng.choice(list(PriorityClass)),
                task_count=tasks,
                millis_per_task=millis,
                topology=topology,
                models=models,
                wall_time_s=rng.choice((None, 3600.0, 86_400.0)),
            )
        )
    return jobs


@dataclass
class NaiveNode:
    spec: NodeSpec
    free: list[int]
    """Free millis per accelerator."""


class NaiveScheduler:
    """First fit by scanning every node for every job: the baseline."""

    def __init__(self, nodes: list[NodeSpec]) -> None:
        self.nodes = [NaiveNode(n, [1000] * len(n.accelerator_ids)) for n in nodes]

    def place(self, job: JobSpec) -> bool:
        if job.task_count > 1:
            return self._place_gang(job)
        for node in self.nodes:
            if job.models and node.spec.model not in job.models:
                continue
            if job.fractional:
                for index, free in enumerate(node.free):
                    if free >= job.millis_per_task:
                        node.free[index] -= job.millis_per_task
                        return True
            else:
                whole = [i for i, free in enumerate(node.free) if free == 1000]
                if len(whole) >= job.accelerators_per_task:
                    for index in whole[: job.accelerators_per_task]:
                        node.free[index] = 0
                    return True
        return False

    def _place_gang(self, job: JobSpec) -> bool:
        by_region: dict[tuple[str, str, str], list[NaiveNode]] = {}
        for node in self.nodes:
            if job.models and node.spec.model not in job.models:
                continue
            if node.free.count(1000) >= job.accelerators_per_task:
                key = (node.spec.provider, node.spec.region, node.spec.model)
                by_region.setdefault(key, []).append(node)
        for candidates in by_region.values():
            if len(candidates) >= job.task_count:
                for node in candidates[: job.task_count]:
                    whole = [i for i, free in enumerate(node.free) if free == 1000]
                    for index in whole[: job.accelerators_per_task]:
                        node.free[index] = 0
                return True
        return False


def fill(engine: Engine, fraction: float, seed: int = 2) -> None:
    """Run 1-accelerator and 4-accelerator jobs until about ``fraction`` of the fleet is used."""
    rng = random.Random(seed)
    total = sum(len(n.used) for n in engine.fleet.nodes)
    target = int(total * fraction)
    used = 0
    i = 0
    while used < target:
        size = rng.choice((1, 1, 2, 4))
        engine.submit(
            JobSpec(f"fill{i}", "filler", "filler-inst", 0.0, millis_per_task=size * 1000)
        )
        used += size
        i += 1
    engine.schedule(0.0)


def naive_copy(nodes: list[NodeSpec], engine: Engine) -> NaiveScheduler:
    """Return a naive scheduler whose nodes are used exactly as ``engine``'s are now."""
    naive = NaiveScheduler(nodes)
    for node, record in zip(naive.nodes, engine.fleet.nodes, strict=True):
        node.free = [1000 - used for used in record.used]
    return naive


def bench_single(nodes: list[NodeSpec], count: int, naive_sample: int) -> dict[str, float]:
    engine = new_engine(nodes)
    jobs = one_accelerator_jobs(count, "s")
    half = count // 2
    for job in jobs[:half]:
        engine.submit(job)
    settle()
    started = CLOCK[0]()
    placed = sum(1 for d in engine.schedule(1.0).decisions if isinstance(d, Place))
    elapsed = CLOCK[0]() - started
    # First fit of 1-accelerator jobs fills nodes in order. After the first half, the naive
    # scheduler's own fleet has its first half // 8 nodes full, so it is built that way.
    naive = NaiveScheduler(nodes)
    for node in naive.nodes[: half // ACCELERATORS_PER_NODE]:
        node.free = [0] * ACCELERATORS_PER_NODE
    started = CLOCK[0]()
    for job in jobs[half : half + naive_sample]:
        naive.place(job)
    naive_elapsed = CLOCK[0]() - started
    for job in jobs[half:]:
        engine.submit(job)
    settle()
    started = CLOCK[0]()
    placed += sum(1 for d in engine.schedule(2.0).decisions if isinstance(d, Place))
    elapsed += CLOCK[0]() - started
    rate = placed / elapsed
    naive_rate = naive_sample / naive_elapsed
    return {"placed": placed, "seconds": elapsed, "rate": rate, "naive_rate": naive_rate}


def bench_gang(nodes: list[NodeSpec], rounds: int) -> dict[str, float]:
    engine = new_engine(nodes)
    fill(engine, 0.6)
    settle()
    latencies = []
    now = 10.0
    for i in range(rounds):
        job_id = f"gang{i}"
        engine.submit(
            JobSpec(
                job_id,
                "gangs",
                "gang-inst",
                now,
                task_count=8,
                millis_per_task=8000,
                topology=Topology.SAME_REGION,
            )
        )
        started = CLOCK[0]()
        result = engine.schedule(now)
        latencies.append(CLOCK[0]() - started)
        assert any(isinstance(d, Place) and d.job_id == job_id for d in result.decisions)
        engine.apply(JobEnded(job_id, JobOutcome.COMPLETED), now=now + 1)
        now += 2.0
    naive = naive_copy(nodes, engine)
    naive_latencies = []
    gang = JobSpec(
        "naive-gang",
        "g",
        "g",
        0.0,
        task_count=8,
        millis_per_task=8000,
        topology=Topology.SAME_REGION,
    )
    for _ in range(max(10, rounds // 10)):
        started = CLOCK[0]()
        naive._place_gang(gang)
        naive_latencies.append(CLOCK[0]() - started)
    return {
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "naive_p50": percentile(naive_latencies, 0.50),
        "naive_p99": percentile(naive_latencies, 0.99),
    }


def bench_full_pass(nodes: list[NodeSpec], count: int, naive_sample: int) -> dict[str, float]:
    engine = new_engine(nodes)
    jobs = mixed_jobs(count)
    for job in jobs:
        engine.submit(job)
    settle()
    started = CLOCK[0]()
    result = engine.schedule(1.0)
    elapsed = CLOCK[0]() - started
    placed = sum(1 for d in result.decisions if isinstance(d, Place))
    # A pass after arrivals only (nothing freed) tries just the new jobs.
    for job in mixed_jobs(100, seed=3):
        engine.submit(replace(job, job_id=f"late-{job.job_id}", submit_time=2.0))
    started = CLOCK[0]()
    engine.schedule(2.0)
    incremental = CLOCK[0]() - started
    # The naive pass is timed on every n-th job against the fleet the engine left, where most
    # jobs find no room and scan every node. Its total is that rate times the job count.
    naive = naive_copy(nodes, engine)
    step = max(1, count // naive_sample)
    sample = jobs[::step][:naive_sample]
    started = CLOCK[0]()
    for job in sample:
        naive.place(job)
    naive_elapsed = CLOCK[0]() - started
    naive_estimate = naive_elapsed / len(sample) * count
    return {
        "seconds": elapsed,
        "incremental": incremental,
        "placed": placed,
        "waiting": len(result.waiting),
        "naive_estimate": naive_estimate,
        "naive_sample": len(sample),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the sizes, for a smoke run"
    )
    parser.add_argument("--wall", action="store_true", help="time with the wall clock")
    args = parser.parse_args()
    if args.wall:
        CLOCK[0] = time.perf_counter
    scale = 10 if args.quick else 1
    nodes = build_fleet(10_000 // scale)
    flags = "".join(flag for flag, on in ((" --quick", args.quick), (" --wall", args.wall)) if on)
    print(f"command: python bench/engine_bench.py{flags}")
    timer = "wall-clock" if args.wall else "process CPU"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs, "
        f"load average {load}), {len(nodes)} nodes x 8, {timer} time"
    )

    single = bench_single(nodes, 50_000 // scale, 2_000 // scale)
    print(
        f"1-accelerator placements: {single['placed']:.0f} in {single['seconds']:.3f} s = "
        f"{single['rate']:,.0f}/s (target >= 10,000/s); naive first fit "
        f"{single['naive_rate']:,.0f}/s on {2_000 // scale} jobs from its own half-full "
        f"fleet; ratio {single['rate'] / single['naive_rate']:.1f}x"
    )
    gang = bench_gang(nodes, 200 // scale)
    print(
        f"64-accelerator gang at 60% used: p50 {gang['p50'] * 1e3:.2f} ms, p99 "
        f"{gang['p99'] * 1e3:.2f} ms (target p99 < 10 ms); naive scan p50 "
        f"{gang['naive_p50'] * 1e3:.2f} ms, p99 {gang['naive_p99'] * 1e3:.2f} ms; ratio (p99) "
        f"{gang['naive_p99'] / gang['p99']:.1f}x"
    )
    full = bench_full_pass(nodes, 100_000 // scale, 2_000 // scale)
    print(
        f"full pass over {100_000 // scale:,} pending mixed jobs: {full['seconds']:.3f} s "
        f"(target < 1 s), {full['placed']:,.0f} placed, {full['waiting']:,.0f} waiting; naive "
        f"first fit estimated {full['naive_estimate']:.1f} s from every "
        f"{100_000 // scale // full['naive_sample']:.0f}th job on the final fleet; ratio "
        f"{full['naive_estimate'] / full['seconds']:.1f}x"
    )
    print(
        f"next pass after 100 arrivals (nothing freed): {full['incremental'] * 1e3:.1f} ms for "
        f"{100_000 // scale:,} pending"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
