"""The rendezvous port of a job's tasks, which the scheduler and the agents agree on.

The scheduler picks the port from the range that the node of the job's task 0 reports
(``ACSP_AGENT_RENDEZVOUS_PORTS``), by a hash of the job id and attempt. Nothing reserves the
port: two jobs whose task 0 share a node get the same port with a probability of about one in
the range's size, and a process outside acsp may already listen on it.
"""

from __future__ import annotations

import zlib
from typing import Final

DEFAULT_PORT_RANGE: Final = (29500, 29999)
"""Ports used when a node reports no range: 29500 is torch.distributed's default port."""


def parse_port_range(text: str) -> tuple[int, int]:
    """Parse ``LOW-HIGH`` (or one port) into an inclusive range of ports 1024-65535.

    Raises ValueError with the reason and the expected form.
    """
    low_text, sep, high_text = text.strip().partition("-")
    if not low_text.strip().isdigit() or (sep and not high_text.strip().isdigit()):
        raise ValueError(f"{text!r} is not a port range LOW-HIGH such as 29500-29999")
    low = int(low_text)
    high = int(high_text) if sep else low
    if not 1024 <= low <= high <= 65535:
        raise ValueError(
            f"{text!r} is not a range of ports from 1024 to 65535 with LOW at or below HIGH"
        )
    return low, high


def rendezvous_port(job_id: str, attempt: int, low: int, high: int) -> int:
    """Return the port in ``low..high`` for attempt ``attempt`` of ``job_id``.

    CRC-32 rather than ``hash()``, because the port must not change with the process's hash
    seed. The attempt is part of the key, so a requeued job does not reuse a port that the
    previous attempt's process may still hold.
    """
    key = f"{job_id}/{attempt}".encode()
    return low + zlib.crc32(key) % (high - low + 1)
