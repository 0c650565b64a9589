"""The order in which one pass serves pending jobs of one priority class.

Programs, institutions and projects each sit in a heap keyed by their fair-share part
(lowest first). The next job is the head of the first project of the first institution of the
first program. Each account's part is computed once when the order is built and again only
after one of its jobs is placed, because only a placement charges usage inside a pass.

The account that served the last job is always on top of its heap, so moving past that job
replaces the top entry in place and the heaps never hold stale entries. While nothing is
placed, a project's jobs are served in one run until another project's head comes first, at
the cost of one heap update per run.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from scheduler.engine.fairshare import FairShare, Level

if TYPE_CHECKING:
    from scheduler.engine.records import JobRecord

QueueItem = tuple[float, int, "JobRecord"]
"""``(submit_time, sequence, record)``; sequences are unique, so records are never compared."""


class JobQueue:
    """Pending jobs of one class and project, first come first served.

    Jobs mostly arrive in order, so the queue is a dictionary in insertion order that is
    sorted again only after an earlier job was queued behind a later one (a requeue). Removing
    a started job is then one dictionary deletion.
    """

    __slots__ = ("_items", "_last", "_ordered")

    def __init__(self) -> None:
        self._items: dict[str, QueueItem] = {}
        self._last: QueueItem | None = None
        self._ordered = True

    def __len__(self) -> int:
        return len(self._items)

    def add(self, record: JobRecord) -> None:
        item = (record.spec.submit_time, record.sequence, record)
        if self._last is not None and item[:2] < self._last[:2]:
            self._ordered = False
        else:
            self._last = item
        self._items[record.spec.job_id] = item

    def remove(self, job_id: str) -> None:
        del self._items[job_id]

    def snapshot(self) -> list[QueueItem]:
        """Return the queued items in order."""
        if not self._ordered:
            ordered = sorted(self._items.items(), key=lambda entry: entry[1][:2])
            self._items = dict(ordered)
            self._ordered = True
        return list(self._items.values())


class _ProjectQueue:
    """One project's pending jobs of the class and the position of its head."""

    __slots__ = ("institution", "items", "position", "program", "project")

    def __init__(
        self, project: str, institution: str, program: str, items: Sequence[QueueItem]
    ) -> None:
        self.project = project
        self.institution = institution
        self.program = program
        self.items = items
        self.position = 0


ProjectEntry = tuple[float, float, int, str, _ProjectQueue]
"""``(fair-share part, head's submit_time, head's sequence, project, queue)``; project names
are unique in a heap, so comparisons never reach the queue."""


class ShareOrder:
    """Hierarchical fair-share order over the projects of one class.

    Call :meth:`next_run`, try jobs of the queue it returns, then call :meth:`end_run`.
    """

    def __init__(self, fair_share: FairShare, queues: Mapping[str, Sequence[QueueItem]]) -> None:
        self._share = fair_share
        self._root: list[tuple[float, str]] = []
        self._programs: dict[str, list[tuple[float, str]]] = {}
        self._institutions: dict[str, list[ProjectEntry]] = {}
        self._live_projects: dict[str, int] = {}
        """Projects with jobs left, per institution."""
        self._live_institutions: dict[str, int] = {}
        """Institutions with jobs left, per program."""
        self._heap: list[ProjectEntry] | None = None
        """The project heap of the institution that the last job came from."""

        component = fair_share.component
        for project in sorted(queues):
            items = queues[project]
            if not items:
                continue
            institution = fair_share.parent(Level.PROJECT, project)
            program = fair_share.parent(Level.INSTITUTION, institution)
            if institution not in self._live_projects:
                self._live_projects[institution] = 0
                if program not in self._live_institutions:
                    self._live_institutions[program] = 0
                    self._root.append((component(Level.PROGRAM, program), program))
                self._live_institutions[program] += 1
                entry = (component(Level.INSTITUTION, institution), institution)
                self._programs.setdefault(program, []).append(entry)
            self._live_projects[institution] += 1
            submit, sequence, _ = items[0]
            key = component(Level.PROJECT, project)
            queue = _ProjectQueue(project, institution, program, items)
            self._institutions.setdefault(institution, []).append(
                (key, submit, sequence, project, queue)
            )

        heapq.heapify(self._root)
        for heap in self._programs.values():
            heapq.heapify(heap)
        for projects in self._institutions.values():
            heapq.heapify(projects)

    def next_run(self) -> tuple[_ProjectQueue, tuple[float, int] | None] | None:
        """Return the project queue whose head comes next, and how long it stays first.

        While nothing is placed no key changes, so the project's following jobs come next
        until one sorts after the best other project of its institution. The bound is that
        project's ``(submit_time, sequence)`` when both have the same fair-share part, and
        ``None`` when every job left in the queue comes first. Returns ``None`` when every
        queue is done. Call :meth:`end_run` before the next call.
        """
        heap = self._heap
        if heap is None:
            if not self._root:
                return None
            program = self._root[0][1]
            heap = self._institutions[self._programs[program][0][1]]
            self._heap = heap
        top = heap[0]
        bound = None
        if len(heap) > 1:
            rival = heap[1] if len(heap) == 2 or heap[1] < heap[2] else heap[2]
            if rival[0] <= top[0]:
                bound = (rival[1], rival[2])
        return top[4], bound

    def end_run(self, position: int, placed: bool) -> None:
        """Move the run's queue to ``position``; re-key its accounts if its last job was placed."""
        heap = self._heap
        assert heap is not None
        key, _, _, project, queue = heap[0]
        queue.position = position
        if position < len(queue.items):
            if placed:
                key = self._share.component(Level.PROJECT, project)
            submit, sequence, _ = queue.items[position]
            heapq.heapreplace(heap, (key, submit, sequence, project, queue))
            if not placed:
                return
        else:
            heapq.heappop(heap)
            self._live_projects[queue.institution] -= 1
        self._heap = None
        self._reinsert(queue.institution, queue.program, placed)

    def _reinsert(self, institution: str, program: str, placed: bool) -> None:
        """Re-key the institution and program of a placed job, or drop exhausted ones."""
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
