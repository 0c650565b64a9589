"""Writing the engine's pending reasons to the jobs that wait, within a bounded cost per pass.

Every pass returns a reason code and a message for each pending job, and a new code is written
at once. The message also changes when the code does not: free counts and reservation times
change on most passes, and a node that joins changes the largest node a reason names. Writing
every such message would rewrite every pending row on every pass. So a message under the same
code is written only when the job's last change is :data:`REASON_REFRESH_S` old, and to a
bounded number of jobs per pass, taken in turn. A stale message is therefore current again
within :data:`REASON_REFRESH_S` plus ``pending jobs / refreshes per pass`` passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from services.runtime.evolve import evolve

from .model import Job

REASON_REFRESH_S: Final = 60.0
"""Seconds a pending job's message may trail the engine's while its reason code is unchanged,
before the job is due for a rewrite."""
REASON_REFRESHES_PER_PASS: Final = 1000
"""Message-only rewrites per pass, so that a pass over 100,000 pending jobs writes at most
1,000 rows for them."""


class ReasonWriter:
    """Decides which pending jobs get the engine's latest reason, and keeps its place between
    passes so that jobs far down the queue get their turn."""

    def __init__(self, refreshes_per_pass: int = REASON_REFRESHES_PER_PASS) -> None:
        if refreshes_per_pass < 1:
            raise ValueError(f"refreshes_per_pass is {refreshes_per_pass}; pass 1 or more")
        self.refreshes_per_pass = refreshes_per_pass
        self._next = 0
        """Position in the pass's waiting list at which the next pass starts refreshing."""

    def write(
        self,
        waiting: Sequence[tuple[str, str, str]],
        current: Callable[[str], Job | None],
        now: float,
    ) -> list[Job]:
        """Return the pending jobs with their new reason, in the order of ``waiting``'s turn.

        ``waiting`` contains a job id, reason code and message per job the pass left waiting.
        ``current`` returns the job as the book has it, or None for a job whose reason the
        book does not take (gone, no longer pending, or awaiting its hold).
        """
        count = len(waiting)
        start = self._next if self._next < count else 0
        stale_before = now - REASON_REFRESH_S
        refreshes_left = self.refreshes_per_pass
        changed: list[Job] = []
        # Visit the list from ``start`` round to ``start - 1``, so that the budget of message
        # rewrites goes to the jobs the last pass did not reach.
        for part, offset in ((waiting[start:], start), (waiting[:start], 0)):
            for index, (job_id, reason, message) in enumerate(part, offset):
                job = current(job_id)
                if job is None:
                    continue
                if job.pending_reason != reason:
                    changed.append(evolve(job, pending_reason=reason, reason=message))
                    continue
                if refreshes_left == 0 or job.reason == message:
                    continue
                if job.updated_at is not None and job.updated_at > stale_before:
                    continue
                changed.append(evolve(job, reason=message))
                refreshes_left -= 1
                if refreshes_left == 0:
                    self._next = index + 1
        if refreshes_left > 0:
            self._next = start
        return changed
