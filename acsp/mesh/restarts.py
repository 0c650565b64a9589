"""The delay before the local mesh starts an exited child again, and the reason it reports."""

from __future__ import annotations

from typing import Final

from acsp.mesh._process import ChildProcess

MAX_DOUBLINGS: Final = 60
"""Doublings of the first delay past which the cap applies anyway, so the power stays a float."""
REASON_LINES: Final = 5
"""Last log lines searched for the error that ended a child."""
FATAL_MARKERS: Final = ("FATAL:", "PANIC:")
"""Severities with which PostgreSQL logs the error that ends the server. Its last line is
usually "database system is shut down", which gives no reason."""


def restart_delay(first_s: float, max_s: float, restarts: int) -> float:
    """Return the seconds to wait before the next restart of a child.

    The delay starts at ``first_s`` and doubles with each of the ``restarts`` already made in
    the window, up to ``max_s``.
    """
    return min(first_s * 2 ** min(restarts, MAX_DOUBLINGS), max_s)


def exit_reason(child: ChildProcess) -> str:
    """Return how ``child`` ended and the log line that most likely gives the cause.

    That line is the last FATAL or PANIC line among the last few, or else the last line.
    """
    lines = child.tail(REASON_LINES).splitlines()
    fatal = [line for line in lines if any(marker in line for marker in FATAL_MARKERS)]
    line = (fatal or lines or [""])[-1].strip()
    reason = child.describe_exit()
    return f"{reason}; from its log: {line}" if line else reason
