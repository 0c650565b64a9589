"""Bounded exponential backoff for the agent's cleanup retries.

The agent retries a pool user whose processes outlive SIGKILL, a job folder that cannot be
given back, and a task cgroup that stays populated after ``cgroup.kill``, until they clear.
So the node gets its capacity back without an agent restart. The first retry comes soon, for
a process that ends a few seconds late. The delay then doubles up to a maximum, so that one
stuck on a hung file system or device for hours costs a few checks an hour.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

CLEANUP_FIRST_RETRY_S: Final = 5.0
CLEANUP_MAX_RETRY_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between the attempts of a retry: ``first_s``, doubled up to ``max_s``."""

    first_s: float = CLEANUP_FIRST_RETRY_S
    """Seconds before the first retry."""
    max_s: float = CLEANUP_MAX_RETRY_S
    """Maximum seconds between two attempts."""

    def __post_init__(self) -> None:
        if not self.first_s > 0:
            raise ValueError(f"first_s must be positive, got {self.first_s}")
        if self.max_s < self.first_s:
            raise ValueError(f"max_s ({self.max_s}) must be at least first_s ({self.first_s})")

    def delays(self) -> Iterator[float]:
        """Yield the seconds to wait before each retry, without end."""
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


CLEANUP_BACKOFF: Final = Backoff()
"""Delays between the attempts to free a pool user whose processes outlive SIGKILL or whose job
folder cannot be given back, and to empty and remove a task cgroup."""
