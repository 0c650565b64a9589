"""Declare the usage stream on the hub, or list the message ids stored for one subject.

Run by test_netns_nats.py with ``ip netns exec`` inside the hub's namespace::

    python -m tests.deploy.netns_hub declare URL CA PASSWORD
    python -m tests.deploy.netns_hub ids URL CA PASSWORD SUBJECT

``ids`` prints a JSON list of the Nats-Msg-Id header of every stored message on SUBJECT.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

import nats
from nats.js.api import StreamConfig

from acsp import subjects
from tests.deploy.jetstream_retry import until_answered


async def main(command: str, url: str, ca: str, password: str, *rest: str) -> None:
    nc = await nats.connect(
        servers=[url],
        user="scheduler",
        password=password,
        tls=ssl.create_default_context(cafile=ca),
    )
    js = nc.jetstream(timeout=10)
    try:
        if command == "declare":
            config = StreamConfig(
                name=subjects.USAGE_STREAM,
                subjects=list(subjects.USAGE_SUBJECTS),
                num_replicas=3,
                duplicate_window=120.0,
            )
            # Stays under the 60 s timeout that the test gives this process.
            await until_answered(lambda: js.add_stream(config), timeout_s=45.0)
            return
        (subject,) = rest
        info = await js.stream_info(subjects.USAGE_STREAM)
        ids = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(subjects.USAGE_STREAM, sequence)
            if message.subject == subject:
                ids.append((message.headers or {}).get("Nats-Msg-Id"))
        print(json.dumps(ids))
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
