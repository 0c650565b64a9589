"""Time the local mesh: start until every service reports SERVING, and stop.

Run:  python bench/mesh_start.py [--runs 3] [--agents 4]

Each run uses a fresh data directory, so the time includes initdb and TLS and key generation.
Set ACSP_DATABASE_URL and ACSP_NATS_URL to time the configuration with external servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from acsp.mesh import LocalMesh, MeshConfig


async def one_run(data_dir: Path, agents: int) -> tuple[float, float]:
    mesh = LocalMesh(MeshConfig.from_env(data_dir, agents=agents))
    started = time.perf_counter()
    await mesh.start()
    up_s = time.perf_counter() - started
    started = time.perf_counter()
    await mesh.stop()
    down_s = time.perf_counter() - started
    return up_s, down_s


def fresh_data_dir() -> Path:
    """Create a data directory that PostgreSQL's unprivileged user can reach when run as root."""
    data_dir = Path(tempfile.mkdtemp(prefix="acsp-bench-"))
    data_dir.chmod(0o755)
    return data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of start/stop cycles")
    parser.add_argument("--agents", type=int, default=4, help="simulated nodes per mesh")
    args = parser.parse_args()
    ups, downs = [], []
    for _ in range(args.runs):
        data_dir = fresh_data_dir()
        try:
            up_s, down_s = asyncio.run(one_run(data_dir, args.agents))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        ups.append(up_s)
        downs.append(down_s)
        print(f"start {up_s:6.2f} s   stop {down_s:6.2f} s", flush=True)
    external = bool(os.environ.get("ACSP_DATABASE_URL") or os.environ.get("ACSP_NATS_URL"))
    print(
        f"command: python bench/mesh_start.py --runs {args.runs} --agents {args.agents}"
        f" ({'external' if external else 'embedded'} servers, {os.cpu_count()} CPUs)"
    )
    print(f"start median {statistics.median(ups):.2f} s, max {max(ups):.2f} s")
    print(f"stop  median {statistics.median(downs):.2f} s, max {max(downs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
