"""``acsp demo``: the whole system on the real openb trace, checked, with a report."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    positive_number,
    positive_seconds,
    whole_number,
)
from acsp.mesh.supervisor import DATABASE_URL_ENV, NATS_URL_ENV


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the local mesh on the openb trace in compressed time and report",
        description=(
            "Start the local mesh, register three providers, award grants, replay the "
            "Alibaba openb trace through the SDK, and write report.json, report.md and "
            "plots. Exits 1 if one of its checks fails."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--jobs", type=whole_number(1), default=2000, help="jobs to replay (default: 2000)"
    )
    size.add_argument("--full", action="store_true", help="replay every GPU job of the trace")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the project assignment (default: 0)"
    )
    parser.add_argument(
        "--speed",
        type=positive_number("number"),
        default=8000.0,
        help="trace seconds per wall second for arrivals and run times (default: 8000)",
    )
    parser.add_argument(
        "--kill-metering-at",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="kill metering S wall seconds into the replay and restart it 20 s later",
    )
    parser.add_argument(
        "--max-nodes",
        type=whole_number(1),
        default=30,
        help="nodes kept of each real fleet file, by stride (default: 30)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from acsp.demo.runner import DemoConfig, MeshChildExited, run_demo
    from acsp.mesh import MeshStartError

    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} is a file; name a folder for the report", EXIT_USAGE)
    config = DemoConfig(
        out=args.out,
        jobs=None if args.full else args.jobs,
        seed=args.seed,
        speed=args.speed,
        max_nodes=args.max_nodes,
        kill_metering_at_s=args.kill_metering_at,
        database_url=os.environ.get(DATABASE_URL_ENV, "").strip() or None,
        nats_url=os.environ.get(NATS_URL_ENV, "").strip() or None,
    )
    try:
        document = asyncio.run(run_demo(config))
    except (MeshStartError, MeshChildExited) as error:
        raise CommandError(f"acsp demo failed: {error}") from None
    return EXIT_OK if all(c["passed"] for c in document["checks"]) else EXIT_FAILURE
