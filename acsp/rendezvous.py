"""The rendezvous port of a job's tasks, which the scheduler and the agents agree on.

The scheduler picks the port from the range that the node of the job's task 0 reports
(``ACSP_AGENT_RENDEZVOUS_PORTS``). It starts at a hash of the job id and attempt and moves past
the ports that other started jobs hold on that node (``scheduler.service.rendezvous``). Nothing
checks the node itself, so a process outside acsp may already listen on the port.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

DEFAULT_PORT_RANGE: Final = (29500, 29999)
"""Ports used when a node reports no range: 29500 is torch.distributed's default port."""


MAX_HOST_CHARACTERS: Final = 100
"""Longest host a node reports (ACSP_AGENT_HOST). A start command lists the hosts of a gang's
nodes, and 4,096 hosts of this length (the most tasks a job has) encode to 420 KiB, which stays
within the half of NATS's default max_payload of 1 MiB that the scheduler leaves for more than
the job's spec."""
_HOST_PATTERN: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_HOST_CHARACTERS}}}")


def is_valid_host(text: str) -> bool:
    """Return whether ``text`` is an address or hostname that fits one line of a hosts file
    and the start command size limit: 1 to 100 of ``A-Z a-z 0-9 . - _ :``."""
    return _HOST_PATTERN.fullmatch(text) is not None


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
    """Return the hashed port in ``low..high`` for attempt ``attempt`` of ``job_id``, where
    the scheduler's search for a free port starts.

    CRC-32 rather than ``hash()``, because the port must not change with the process's hash
    seed. The attempt is part of the key, so a requeued job starts its search elsewhere than
    the previous attempt, whose process may still hold its port.
    """
    key = f"{job_id}/{attempt}".encode()
    return low + zlib.crc32(key) % (high - low + 1)
