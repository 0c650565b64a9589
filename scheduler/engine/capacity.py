"""Pool caps from pledges, recalls and pool limits at a point in virtual time."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.engine.events import RecallAnnounced
from scheduler.engine.fleet import Pool, PoolKey
from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, InvalidInputError, Pledge


@dataclass(frozen=True, slots=True)
class PoolCap:
    """Caps of one pool at one time, in millis; ``None`` fields mean no cap."""

    placement_millis: int | None
    """Cap on new placements: pledge cap (after recalls) and the pool limit."""
    pledge_millis: int | None
    """Cap running jobs are preempted down to: pledges minus recalls only."""
    protected_millis: int | None
    recall_id: str
    """The recall that lowers the cap now, or empty."""


@dataclass(frozen=True, slots=True)
class ShrinkStep:
    """A cap that running jobs of a pool must be down to by a deadline."""

    deadline: float
    pledge_millis: int
    """Pledges minus the recalls in force at ``deadline``."""
    recall_id: str
    """The recall that takes effect at ``deadline``, or empty for the pledges alone."""


class CapacityPlan:
    """Pledges, recalls and pool limits, evaluated per pool at a time."""

    def __init__(self) -> None:
        self.pledges: dict[str, Pledge] = {}
        self.recalls: dict[str, RecallAnnounced] = {}
        self.pool_limits: dict[str, int] = {}
        self._pledged_pools: dict[PoolKey, list[Pledge]] = {}

    def add_pledge(self, pledge: Pledge) -> None:
        if pledge.protected < 0 or pledge.recallable < 0:
            raise InvalidInputError(f"pledge {pledge.pledge_id}: counts must be >= 0")
        if not math.isfinite(pledge.start) or not math.isfinite(pledge.end):
            raise InvalidInputError(
                f"pledge {pledge.pledge_id}: start ({pledge.start}) and end ({pledge.end}) "
                "must be finite numbers of seconds"
            )
        if pledge.end <= pledge.start:
            raise InvalidInputError(f"pledge {pledge.pledge_id}: end must be after start")
        self.remove_pledge(pledge.pledge_id)
        self.pledges[pledge.pledge_id] = pledge
        key = (pledge.provider, pledge.region, pledge.model)
        self._pledged_pools.setdefault(key, []).append(pledge)

    def remove_pledge(self, pledge_id: str) -> None:
        old = self.pledges.pop(pledge_id, None)
        if old is not None:
            key = (old.provider, old.region, old.model)
            self._pledged_pools[key].remove(old)

    def add_recall(self, recall: RecallAnnounced) -> None:
        if recall.count < 0:
            raise InvalidInputError(f"recall {recall.recall_id}: count must be >= 0")
        until = recall.until
        if not math.isfinite(recall.effective_at) or (
            until is not None and not math.isfinite(until)
        ):
            raise InvalidInputError(
                f"recall {recall.recall_id}: effective_at ({recall.effective_at}) and until "
                f"({until}) must be finite numbers of seconds. Set until to None for a recall "
                "that lasts until RecallEnded."
            )
        self.recalls[recall.recall_id] = recall

    def cap(self, pool: Pool, now: float) -> PoolCap:
        """Return the caps of ``pool`` at ``now``.

        A recall lowers the cap on new placements from its announcement, so that no job starts
        on capacity it would have to leave. Recalls add up only where their windows overlap,
        so the cap counts the largest number recalled at one instant from ``now`` on.
        """
        limit = self.pool_limits.get(pool.name)
        pledges = self._pledged_pools.get(pool.key)
        if not pledges:
            # A pool nobody pledged explicitly is usable whole, as its nodes were registered.
            return PoolCap(limit, None, None, "")
        protected, recallable = self._pledged(pledges, now)
        windows = self._windows(pool, now)
        recalled, peak_at = peak_overlap((start, end, r.count) for start, end, r in windows)
        # The recall named is the earliest of those in force at the peak.
        recall_id = next((r.recall_id for s, e, r in windows if s <= peak_at < e), "")
        pledge_millis = recalled_cap_millis(protected, recallable, recalled, pool.total_millis)
        placement = pledge_millis if limit is None else min(limit, pledge_millis)
        return PoolCap(placement, pledge_millis, protected * MILLIS_PER_ACCELERATOR, recall_id)

    def shrink_steps(self, pool: Pool, now: float) -> list[ShrinkStep]:
        """Return the caps that running jobs of ``pool`` must meet, earliest deadline first.

        The first step is the pledges without recalls, due at ``now``. Then comes one step per
        time a recall takes effect, with every recall in force at that time, so that a recall
        booked for later does not shorten the notice of the jobs that an earlier one stops.
        """
        pledges = self._pledged_pools.get(pool.key)
        if not pledges:
            return []
        protected, recallable = self._pledged(pledges, now)
        registered = pool.total_millis
        steps = [ShrinkStep(now, recalled_cap_millis(protected, recallable, 0, registered), "")]
        windows = self._windows(pool, now)
        for start, _, recall in windows:
            if steps[-1].recall_id and steps[-1].deadline == start:
                continue
            level = sum(r.count for s, e, r in windows if s <= start < e)
            cap_millis = recalled_cap_millis(protected, recallable, level, registered)
            steps.append(ShrinkStep(start, cap_millis, recall.recall_id))
        return steps

    def freed_millis(self, pool: Pool, at: float, until: float | None, count: int) -> int:
        """Return the millis a new recall of ``count`` accelerators from ``at`` to ``until``
        takes from the cap of ``pool`` with the fleet as it is now; 0 means it frees nothing.

        Only the recalls whose windows overlap the new one count, at the instant of that
        window where most are recalled.
        """
        pledges = self._pledged_pools.get(pool.key)
        if not pledges:
            return 0
        protected, recallable = self._pledged(pledges, at)
        end = math.inf if until is None else until
        recalled, _ = peak_overlap(
            (max(start, at), min(stop, end), r.count) for start, stop, r in self._windows(pool, at)
        )
        registered = pool.total_millis
        before = recalled_cap_millis(protected, recallable, recalled, registered)
        after = recalled_cap_millis(protected, recallable, recalled + count, registered)
        # Without a recall the cap is the pledge, which may be above the registered hardware.
        return min(before, registered) - after

    def recalled_millis(self, pool: Pool, now: float) -> int:
        """Return the millis of ``pool`` that the recalls in force at ``now`` take from use.

        A recall counts from its announcement, when it lowers the cap on new placements.
        """
        pledges = self._pledged_pools.get(pool.key)
        recalled, _ = peak_overlap((s, e, r.count) for s, e, r in self._windows(pool, now))
        if not pledges or not recalled:
            return 0
        protected, recallable = self._pledged(pledges, now)
        registered = pool.total_millis
        before = min(recalled_cap_millis(protected, recallable, 0, registered), registered)
        after = recalled_cap_millis(protected, recallable, recalled, registered)
        return max(0, before - after)

    def above_cap_millis(self, pool: Pool, now: float) -> int:
        """Return the millis of ``pool``'s up accelerators that its cap at ``now`` keeps from
        new jobs, beyond those that :meth:`recalled_millis` counts."""
        cap = self.cap(pool, now).placement_millis
        if cap is None:
            return 0
        up = pool.up_accelerators * MILLIS_PER_ACCELERATOR
        return max(0, up - self.recalled_millis(pool, now) - cap)

    @staticmethod
    def _pledged(pledges: list[Pledge], now: float) -> tuple[int, int]:
        active = [p for p in pledges if p.start <= now < p.end]
        return sum(p.protected for p in active), sum(p.recallable for p in active)

    def _recalls_of(self, pool: Pool, now: float) -> list[RecallAnnounced]:
        return [
            recall
            for recall in sorted(self.recalls.values(), key=lambda r: r.recall_id)
            if (recall.provider, recall.region, recall.model) == pool.key
            and (recall.until is None or recall.until > now)
            and self._pledge_lasts(recall, now)
        ]

    def _windows(self, pool: Pool, now: float) -> list[tuple[float, float, RecallAnnounced]]:
        """Return the recalls of ``pool`` in force at ``now`` with the window each takes
        capacity in, from ``now`` at the earliest, ordered by start and then id."""
        windows = []
        for recall in self._recalls_of(pool, now):
            end = math.inf if recall.until is None else recall.until
            pledge = self.pledges.get(recall.pledge_id) if recall.pledge_id else None
            if pledge is not None:
                end = min(end, pledge.end)
            windows.append((max(now, recall.effective_at), end, recall))
        windows.sort(key=lambda w: (w[0], w[2].recall_id))
        return windows

    def _pledge_lasts(self, recall: RecallAnnounced, now: float) -> bool:
        # A recall stops counting when its pledge ends, so it cannot lower the cap of the pool's
        # next pledge, even if it was stored with a later end or its pledge was shortened since.
        if not recall.pledge_id:
            return True
        pledge = self.pledges.get(recall.pledge_id)
        return pledge is not None and now < pledge.end


def recalled_cap_millis(protected: int, recallable: int, recalled: int, registered: int) -> int:
    """Return the millis a pledged pool may use while ``recalled`` accelerators are recalled.

    ``registered`` is the millis of the pool's registered accelerators. A recall takes from
    what the pool can use, the lesser of the pledge and the registered accelerators, so that
    a pledge above the hardware does not absorb it. It never takes the protected accelerators
    that are registered, nor more than the recallable count.
    """
    pledged = (protected + recallable) * MILLIS_PER_ACCELERATOR
    if recalled == 0:
        return pledged
    usable = min(pledged, registered)
    taken = min(recalled, recallable) * MILLIS_PER_ACCELERATOR
    floor = min(protected * MILLIS_PER_ACCELERATOR, registered)
    return max(usable - taken, floor)


def peak_overlap(windows: Iterable[tuple[float, float, int]]) -> tuple[int, float]:
    """Return the largest sum of counts of windows ``[start, end)`` in force at one instant,
    and the first instant with that sum (``-inf`` when no window is open).

    Windows that only touch, one ending where the other starts, do not add up.
    """
    events: list[tuple[float, int, int]] = []
    for start, end, count in windows:
        if start < end:
            events.append((start, 1, count))
            events.append((end, 0, -count))
    # At one instant the ends (0) sort before the starts (1).
    events.sort()
    peak, peak_at, level = 0, -math.inf, 0
    for at, _, delta in events:
        level += delta
        if level > peak:
            peak, peak_at = level, at
    return peak, peak_at
