"""The order in which one pass serves pending jobs of one priority class.

Programs, institutions and projects each sit in a heap keyed by their fair-share part
(lowest first). The next job is the head of the first project of the first institution of the
first program. Each account's part is computed once when the order is built and again only
after one of its jobs is placed, because only a placement charges usage inside a pass.

The account that served the last job is always on top of its heap, so moving past that job
replaces the top entry in place: a job that is not placed costs one sift of one heap, and the
heaps never hold stale entries.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from scheduler.engine.fairshare import FairShare, Level

QueueItem = tuple[float, int, str]
"""``(submit_time, sequence, job_id)``."""

ProjectEntry = tuple[float, float, int, str]
"""``(fair-share part, head's submit_time, head's sequence, project)``."""


class ShareOrder:
    """Hierarchical fair-share order over the projects of one class.

    Call :meth:`next_job`, then :meth:`advance` once for the job it returned.
    """

    def __init__(self, fair_share: FairShare, queues: Mapping[str, Sequence[QueueItem]]) -> None:
        self._share = fair_share
        self._queues = queues
        self._position = dict.fromkeys(queues, 0)
        self._root: list[tuple[float, str]] = []
        self._programs: dict[str, list[tuple[float, str]]] = {}
        self._institutions: dict[str, list[ProjectEntry]] = {}
        self._live_projects: dict[str, int] = {}
        """Projects with jobs left, per institution."""
        self._live_institutions: dict[str, int] = {}
        """Institutions with jobs left, per program."""
        self._parents: dict[str, tuple[str, str]] = {}
        self._current: tuple[str, str, str, list[ProjectEntry]] | None = None
        """Program, institution, project and project heap of the job last returned."""
        component = fair_share.component
        for project in sorted(queues):
            if not queues[project]:
                continue
            institution = fair_share.parent(Level.PROJECT, project)
            program = fair_share.parent(Level.INSTITUTION, institution)
            self._parents[project] = (institution, program)
            if institution not in self._live_projects:
                self._live_projects[institution] = 0
                if program not in self._live_institutions:
                    self._live_institutions[program] = 0
                    self._root.append((component(Level.PROGRAM, program), program))
                self._live_institutions[program] += 1
                entry = (component(Level.INSTITUTION, institution), institution)
                self._programs.setdefault(program, []).append(entry)
            self._live_projects[institution] += 1
            submit, sequence, _ = queues[project][0]
            key = component(Level.PROJECT, project)
            self._institutions.setdefault(institution, []).append((key, submit, sequence, project))
        heapq.heapify(self._root)
        for heap in self._programs.values():
            heapq.heapify(heap)
        for projects in self._institutions.values():
            heapq.heapify(projects)

    def next_job(self) -> str | None:
        """Return the id of the next job to try, or ``None`` when every queue is done."""
        current = self._current
        if current is None:
            if not self._root:
                return None
            program = self._root[0][1]
            institution = self._programs[program][0][1]
            heap = self._institutions[institution]
            current = (program, institution, heap[0][3], heap)
            self._current = current
        project = current[3][0][3]
        if project != current[2]:
            current = (current[0], current[1], project, current[3])
            self._current = current
        return self._queues[project][self._position[project]][2]

    def advance(self, placed: bool) -> None:
        """Move past the job :meth:`next_job` returned; re-key its accounts when it was placed."""
        current = self._current
        assert current is not None
        program, institution, project, heap = current
        position = self._position[project] + 1
        self._position[project] = position
        queue = self._queues[project]
        if position < len(queue):
            key = self._share.component(Level.PROJECT, project) if placed else heap[0][0]
            submit, sequence, _ = queue[position]
            heapq.heapreplace(heap, (key, submit, sequence, project))
            if not placed:
                return
        else:
            heapq.heappop(heap)
            self._live_projects[institution] -= 1
        self._current = None
        programs = self._programs[program]
        if self._live_projects[institution]:
            if placed:
                key = self._share.component(Level.INSTITUTION, institution)
                heapq.heapreplace(programs, (key, institution))
        else:
            heapq.heappop(programs)
            self._live_institutions[program] -= 1
        if self._live_institutions[program]:
            if placed:
                key = self._share.component(Level.PROGRAM, program)
                heapq.heapreplace(self._root, (key, program))
        else:
            heapq.heappop(self._root)
