"""Jobs that wait for other jobs to complete before they enter the engine's queue.

A job submitted with ``after_job_ids`` stays out of the engine until every job it names
(``awaited_job_ids``, with arrays replaced by their elements) has completed. When one of them
ends in any other state, the job is cancelled with a reason that names it, and so are the jobs
that wait for that one in turn. Ends are kept for the most recent :data:`RECENT_ENDS` jobs. A
job named as a dependency that is neither open nor among them is read from the store, once per
turn for all such ids, and its stored state is applied then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

RECENT_ENDS: Final = 100_000
"""Ended jobs whose final state is kept, so that a new dependent of one needs no store read."""

NOT_FOUND: Final = "not_found"
"""The state of a dependency that the store does not hold."""

_SHOWN: Final = 3
"""Job ids that a waiting message names before it gives only the count of the others."""


class Dependencies:
    """The waits between open jobs, and the ends that decide them."""

    def __init__(self) -> None:
        self._waiting_on: dict[str, set[str]] = {}
        """Job id to the ids of the jobs it waits for that have not completed yet."""
        self._dependents: dict[str, set[str]] = {}
        """Job id to the ids of the jobs that wait for it."""
        self._recent: OrderedDict[str, str] = OrderedDict()
        """Final state of recently ended jobs, oldest first. An OrderedDict, because the first
        key of a plain dict that keeps losing its first keys is found by a scan over the
        deleted slots: about 50 µs per end at the bound (CPython 3.11, a Xeon server)."""
        self._unresolved: set[str] = set()
        """Ids to read from the store: named as dependencies, neither open nor recently ended."""
        self._ends: list[tuple[str, str]] = []
        """Ends of jobs that others wait for, not yet applied to those others."""

    def register(
        self, job_id: str, after: Iterable[str], is_open: Callable[[str], bool]
    ) -> tuple[str, str] | None:
        """Record the jobs of ``after`` that ``job_id`` still waits for.

        When one of them ended without completing, returns its id and state and records
        nothing, because the job can never start.
        """
        waiting: set[str] = set()
        for other in after:
            if is_open(other):
                waiting.add(other)
                continue
            state = self._recent.get(other)
            if state is None:
                waiting.add(other)
                self._unresolved.add(other)
            elif state != "completed":
                return other, state
        if waiting:
            self._waiting_on[job_id] = waiting
            for other in waiting:
                self._dependents.setdefault(other, set()).add(job_id)
        return None

    def waits(self, job_id: str) -> bool:
        return job_id in self._waiting_on

    def forget(self, job_id: str) -> bool:
        """Drop what ``job_id`` waits for; return whether it waited for anything."""
        waiting = self._waiting_on.pop(job_id, None)
        if waiting is None:
            return False
        for other in waiting:
            dependents = self._dependents.get(other)
            if dependents is not None:
                dependents.discard(job_id)
                if not dependents:
                    del self._dependents[other]
        return True

    def ended(self, job_id: str, state: str) -> None:
        """Record that ``job_id`` ended in ``state``."""
        self._recent[job_id] = state
        if len(self._recent) > RECENT_ENDS:
            self._recent.popitem(last=False)
        if job_id in self._dependents:
            self._ends.append((job_id, state))

    def take_unresolved(self) -> list[str]:
        """Return and forget the ids to read from the store."""
        ids = sorted(self._unresolved)
        self._unresolved.clear()
        return ids

    def apply_stored(self, states: Mapping[str, str]) -> None:
        """Apply the stored states of ids that :meth:`take_unresolved` returned.

        An id that is open in the store is open in this scheduler too, so its end arrives
        through :meth:`ended` like any other.
        """
        for job_id, state in states.items():
            if state in _FINAL_STATES:
                self.ended(job_id, state)

    def next_end(self) -> tuple[str, str, list[str]] | None:
        """Return the next end to apply with the ids of the jobs that waited for it."""
        while self._ends:
            other, state = self._ends.pop()
            dependents = self._dependents.pop(other, None)
            if dependents:
                return other, state, sorted(dependents)
        return None

    def completed(self, job_id: str, other: str) -> bool:
        """Record that ``other``, which ``job_id`` waited for, completed; return whether
        ``job_id`` waits for nothing more (it is then forgotten here)."""
        waiting = self._waiting_on.get(job_id)
        if waiting is None:
            return False
        waiting.discard(other)
        if waiting:
            return False
        del self._waiting_on[job_id]
        return True

    def message(self, job_id: str) -> str:
        """Return the waiting message of ``job_id``: which jobs it waits for."""
        waiting = sorted(self._waiting_on.get(job_id, ()))
        if len(waiting) == 1:
            return f"waiting for job {waiting[0]} to complete"
        names = ", ".join(waiting[:_SHOWN])
        more = len(waiting) - _SHOWN
        if more > 0:
            names += f" and {more} more"
        return f"waiting for {len(waiting)} jobs to complete: {names}"


_FINAL_STATES: Final = frozenset({"completed", "failed", "cancelled", "timed_out", NOT_FOUND})
