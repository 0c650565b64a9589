"""The order in which one pass serves pending jobs of one priority class.

Programs, institutions and projects each sit in a heap keyed by their fair-share part
(lowest first). The next job is the head of the first project of the first institution of the
first program. After a job is tried only the accounts it touched are re-keyed, so each try
costs a few heap operations however many projects wait.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from scheduler.engine.fairshare import FairShare, Level

QueueItem = tuple[float, int, str]
"""``(submit_time, sequence, job_id)``."""


class ShareOrder:
    """Hierarchical fair-share order over the projects of one class."""

    def __init__(self, fair_share: FairShare, queues: Mapping[str, Sequence[QueueItem]]) -> None:
        self._share = fair_share
        self._queues = queues
        self._position = dict.fromkeys(queues, 0)
        self._version: dict[tuple[Level, str], int] = {}
        self._keys: dict[tuple[Level, str], float] = {}
        """Fair-share parts computed in this pass; dropped when a placement changes them."""
        self._root: list[tuple[float, str, int]] = []
        self._programs: dict[str, list[tuple[float, str, int]]] = {}
        self._institutions: dict[str, list[tuple[float, float, int, str, int]]] = {}
        self._live_projects: dict[str, int] = {}
        self._live_institutions: dict[str, int] = {}
        self._parents: dict[str, tuple[str, str]] = {}
        for project in sorted(queues):
            institution = fair_share.parent(Level.PROJECT, project)
            program = fair_share.parent(Level.INSTITUTION, institution)
            self._parents[project] = (institution, program)
            if institution not in self._live_projects:
                self._live_projects[institution] = 0
                if program not in self._live_institutions:
                    self._live_institutions[program] = 0
                    self._push_program(program)
                self._live_institutions[program] += 1
                self._push_institution(institution, program)
            self._live_projects[institution] += 1
            self._push_project(project, institution)

    def next_job(self) -> str | None:
        """Return the id of the next job to try, or ``None`` when every queue is done."""
        program = self._peek(self._root, Level.PROGRAM, 1)
        if program is None:
            return None
        institution = self._peek(self._programs[program], Level.INSTITUTION, 1)
        assert institution is not None
        project = self._peek(self._institutions[institution], Level.PROJECT, 3)
        assert project is not None
        return self._queues[project][self._position[project]][2]

    def advance(self, project: str, placed: bool) -> None:
        """Move past the head job of ``project``; re-key its accounts when it was placed."""
        institution, program = self._parents[project]
        self._position[project] += 1
        if placed:
            for key in (
                (Level.PROJECT, project),
                (Level.INSTITUTION, institution),
                (Level.PROGRAM, program),
            ):
                self._keys.pop(key, None)
        if self._position[project] < len(self._queues[project]):
            self._push_project(project, institution)
        else:
            self._bump(Level.PROJECT, project)
            self._live_projects[institution] -= 1
            if self._live_projects[institution] == 0:
                self._bump(Level.INSTITUTION, institution)
                self._live_institutions[program] -= 1
                if self._live_institutions[program] == 0:
                    self._bump(Level.PROGRAM, program)
        if placed and self._live_projects[institution]:
            self._push_institution(institution, program)
        if placed and self._live_institutions[program]:
            self._push_program(program)

    def _key(self, level: Level, name: str) -> float:
        key = self._keys.get((level, name))
        if key is None:
            key = self._share.component(level, name)
            self._keys[(level, name)] = key
        return key

    def _bump(self, level: Level, name: str) -> int:
        version = self._version.get((level, name), 0) + 1
        self._version[(level, name)] = version
        return version

    def _push_program(self, program: str) -> None:
        version = self._bump(Level.PROGRAM, program)
        key = self._key(Level.PROGRAM, program)
        heapq.heappush(self._root, (key, program, version))

    def _push_institution(self, institution: str, program: str) -> None:
        version = self._bump(Level.INSTITUTION, institution)
        key = self._key(Level.INSTITUTION, institution)
        heapq.heappush(self._programs.setdefault(program, []), (key, institution, version))

    def _push_project(self, project: str, institution: str) -> None:
        version = self._bump(Level.PROJECT, project)
        key = self._key(Level.PROJECT, project)
        submit, sequence, _ = self._queues[project][self._position[project]]
        entry = (key, submit, sequence, project, version)
        heapq.heappush(self._institutions.setdefault(institution, []), entry)

    def _peek(self, heap: list, level: Level, name_at: int) -> str | None:  # type: ignore[type-arg]
        """Drop stale entries from the top of ``heap`` and return the name on top."""
        while heap:
            top = heap[0]
            if self._version.get((level, top[name_at])) == top[-1]:
                return str(top[name_at])
            heapq.heappop(heap)
        return None
