"""Publish usage samples through the agent's own outbox and spool, from inside a namespace.

Run by test_netns_nats.py with ``ip netns exec``: it connects to the region's leaf node,
adds ``--count`` samples one every ``--interval-s`` seconds through
:class:`agents.outbox.Outbox`, waits until every one is acknowledged by the hub's JetStream
(or ``--timeout-s`` passes), and keeps ``--progress`` updated with its counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
from pathlib import Path

import nats

from agents.outbox import Outbox
from agents.spool import Spool


def _write_progress(path: Path, outbox: Outbox, added: int, done: bool) -> None:
    counters = outbox.counters
    state = {
        "added": added,
        "published": counters.published,
        "publish_failures": counters.publish_failures,
        "dropped": counters.dropped,
        "pending": outbox.pending,
        "done": done,
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(path)


async def main(args: argparse.Namespace) -> int:
    context = ssl.create_default_context(cafile=args.ca)
    nc = await nats.connect(
        servers=[args.url],
        user="agent",
        password=args.password,
        tls=context,
        inbox_prefix=f"_INBOX.{args.provider}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )
    outbox = Outbox(Spool(Path(args.spool)), batch_size=32, ack_timeout_s=2.0, retry_s=0.5)
    sender = asyncio.create_task(outbox.run(lambda: nc))
    progress = Path(args.progress)
    deadline = time.monotonic() + args.timeout_s
    try:
        for index in range(args.count):
            outbox.add(args.subject, f"{args.subject}-{index}", f"sample {index}".encode())
            _write_progress(progress, outbox, index + 1, done=False)
            await asyncio.sleep(args.interval_s)
        while outbox.pending and time.monotonic() < deadline:
            _write_progress(progress, outbox, args.count, done=False)
            await asyncio.sleep(0.2)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        _write_progress(progress, outbox, args.count, done=True)
        await nc.close()
    return 0 if outbox.pending == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval-s", type=float, default=0.25)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
