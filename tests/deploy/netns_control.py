"""Run PostgreSQL, query it, or read the usage stream, from inside the control namespace.

Run by test_netns_regions.py with ``ip netns exec``, because the database and the hub are
reachable only from inside the namespaces::

    python -m tests.deploy.netns_control postgres DATA_DIR READY_FILE
    python -m tests.deploy.netns_control query DSN SQL
    python -m tests.deploy.netns_control usage URL CA USER PASSWORD SUBJECT_PREFIX

``postgres`` starts the embedded PostgreSQL on 127.0.0.1, writes its URL to READY_FILE and
serves until SIGTERM. ``query`` prints the rows as a JSON list of objects. ``usage`` prints
one JSON object per stored usage message whose subject starts with SUBJECT_PREFIX: its
Nats-Msg-Id and the ids of the samples it carries.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path

import asyncpg
import nats

from acsp import subjects
from acsp.mesh.passwords import postgres_password
from acsp.mesh.postgres import EmbeddedPostgres, cluster_dir_for
from acsp.v1 import agent_pb2

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


async def serve_postgres(data_dir: str, ready_file: str) -> None:
    directory = Path(data_dir)
    server = EmbeddedPostgres(
        cluster_dir_for(directory),
        log_path=directory / "postgres.log",
        password=postgres_password(directory),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await server.start(START_TIMEOUT_S)
    try:
        await asyncio.to_thread(Path(ready_file).write_text, server.url_with_password() + "\n")
        await stop.wait()
    finally:
        await server.stop(STOP_GRACE_S)


async def query(dsn: str, sql: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(sql, timeout=30)
    finally:
        await connection.close(timeout=5)
    print(json.dumps([dict(row) for row in rows], default=str))


async def usage(url: str, ca: str, user: str, password: str, prefix: str) -> None:
    client = await nats.connect(
        servers=[url],
        user=user,
        password=password,
        tls=ssl.create_default_context(cafile=ca),
        connect_timeout=5,
        allow_reconnect=False,
    )
    js = client.jetstream(timeout=10)
    try:
        info = await js.stream_info(subjects.USAGE_STREAM)
        messages = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(subjects.USAGE_STREAM, sequence)
            if not (message.subject or "").startswith(prefix):
                continue
            report = agent_pb2.UsageReport.FromString(message.data or b"")
            messages.append(
                {
                    "msg_id": (message.headers or {}).get("Nats-Msg-Id"),
                    "sample_ids": [sample.sample_id for sample in report.samples],
                }
            )
    finally:
        await client.close()
    print(json.dumps(messages))


def main(command: str, *args: str) -> None:
    if command == "postgres":
        asyncio.run(serve_postgres(*args))
    elif command == "query":
        asyncio.run(query(*args))
    elif command == "usage":
        asyncio.run(usage(*args))
    else:
        raise SystemExit(f"unknown command {command!r}: use postgres, query or usage")


if __name__ == "__main__":
    main(*sys.argv[1:])
