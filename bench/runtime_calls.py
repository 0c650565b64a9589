"""Measure what the runtime's server interceptors cost per unary call.

Runs the same trivial handler twice on 127.0.0.1, once on a bare ``grpc.aio`` server and once
inside :class:`services.runtime.Service` (request id, tracing, error mapping, deadline, token
verification), and prints calls per second and latency percentiles for each::

    python bench/runtime_calls.py --calls 5000 --concurrency 16

Client and server share one process and event loop, so the figures are a floor for the
server's throughput and an upper bound on its per-call overhead. The ``cpu`` column is the
process's CPU time per call (client and server together), which other load on the machine
disturbs less than the wall-clock columns.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from services.runtime import Role, Runtime, Service, Settings, mint_token
from services.runtime.auth import generate_signing_key, load_signing_key

SERVICE = "acsp.bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def echo(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
    return request


def add_echo(server: grpc.aio.Server) -> list[str]:
    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),)
    )
    return [SERVICE]


async def drive(address: str, calls: int, concurrency: int, token: str | None) -> list[float]:
    """Send ``calls`` unary calls from ``concurrency`` workers; return latencies in seconds."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.unary_unary(
            METHOD,
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        request = wrappers_pb2.StringValue(value="x" * 64)
        await stub(request, metadata=metadata, timeout=10)  # connect before timing
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                await stub(request, metadata=metadata, timeout=10)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def report(label: str, latencies: list[float], elapsed_s: float, cpu_s: float) -> None:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    print(
        f"{label:<10} {len(ordered) / elapsed_s:>9.0f} calls/s   p50 {p50:6.3f} ms   "
        f"p99 {p99:6.3f} ms   mean {statistics.fmean(ordered) * 1000:6.3f} ms   "
        f"cpu {cpu_s / len(ordered) * 1e6:6.0f} us/call"
    )


async def bench_bare(calls: int, concurrency: int) -> None:
    server = grpc.aio.server()
    add_echo(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        latencies = await drive(f"127.0.0.1:{port}", calls, concurrency, None)
        cpu_s = time.process_time() - cpu_started
        report("bare", latencies, time.perf_counter() - started, cpu_s)
    finally:
        await server.stop(0)


async def bench_runtime(calls: int, concurrency: int, data_dir: Path) -> None:
    private_path, public_path = generate_signing_key(data_dir)
    settings = Settings.from_env({"ACSP_TOKEN_PUBLIC_KEY": str(public_path)})

    def register(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
        return add_echo(server)

    service = Service("bench", settings, register)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), timeout=20)
    token = mint_token(load_signing_key(private_path), "bench", [Role.RESEARCHER])
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        latencies = await drive(service.address, calls, concurrency, token)
        cpu_s = time.process_time() - cpu_started
        report("runtime", latencies, time.perf_counter() - started, cpu_s)
    finally:
        service.stop(grace_s=1)
        await asyncio.wait_for(task, timeout=20)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="unary calls per server")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once")
    arguments = parser.parse_args()
    print(
        f"python bench/runtime_calls.py --calls {arguments.calls} "
        f"--concurrency {arguments.concurrency}"
    )
    await bench_bare(arguments.calls, arguments.concurrency)
    with tempfile.TemporaryDirectory() as data_dir:
        await bench_runtime(arguments.calls, arguments.concurrency, Path(data_dir))


if __name__ == "__main__":
    asyncio.run(main())
