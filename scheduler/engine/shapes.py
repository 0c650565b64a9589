"""Job shapes: pending jobs that a placement search cannot tell apart.

Two jobs share a shape when they accept the same pools (models, constraint, regions) and ask
for the same tasks (count, millis, topology, cross-provider flag). The providers that deny
a job's request to span providers are part of the shape too, because its pending reason names
them. Capacity only shrinks while a pass serves the queue, so once a search for a shape
fails, every later job of that shape would fail the same way. A shape keeps that failure for
the rest of the pass, or until a new reservation changes which nodes jobs must avoid. The next
job of the shape then gets its reason without a search and without building a key per job.
"""

from __future__ import annotations

import weakref

from scheduler.engine.catalog import Catalog
from scheduler.engine.decisions import ReasonCode
from scheduler.engine.fleet import Fleet, Pool
from scheduler.engine.spec import NO_CONSTRAINT, JobSpec

PoolCacheKey = tuple[object, ...]
"""``(models, regions)``, or ``(models, constraint, regions)`` for a job with a constraint."""


class JobShape:
    """Candidate pools of a group of jobs, and what searches for them found in this pass."""

    __slots__ = (
        "__weakref__",
        "failed",
        "failed_epoch",
        "pool_key",
        "pools",
        "pools_version",
        "preemption_failed_pass",
    )

    def __init__(self, pool_key: PoolCacheKey) -> None:
        self.pool_key = pool_key
        self.pools: tuple[Pool, ...] = ()
        """Candidate pools, valid for ``pools_version`` of the fleet."""
        self.pools_version = -1
        self.failed: dict[int, tuple[ReasonCode, str]] = {}
        """Count of reservations to avoid -> reason of the failed search; valid in
        ``failed_epoch`` only."""
        self.failed_epoch = -1
        self.preemption_failed_pass = -1
        """The pass in which no preemption could make room for this shape."""


class ShapeIndex:
    """Interned job shapes, and candidate pools per accepted models, constraint and regions.

    A shape outlives fleet changes; its pools are looked up again when the fleet gains a pool
    or node (``Fleet.version``).
    """

    def __init__(self, fleet: Fleet, catalog: Catalog) -> None:
        self._fleet = fleet
        self._catalog = catalog
        self._version = -1
        self._pools: dict[PoolCacheKey, tuple[Pool, ...]] = {}
        self._shapes: weakref.WeakValueDictionary[tuple[object, ...], JobShape] = (
            weakref.WeakValueDictionary()
        )
        """Shapes live as long as a job record refers to them."""
        self._epoch = 0

    def next_epoch(self) -> int:
        """Return a number no earlier call returned; it stamps per-pass shape state."""
        self._epoch += 1
        return self._epoch

    def shape_of(self, spec: JobSpec) -> JobShape:
        """Return the shared shape of jobs like ``spec``."""
        key = (
            _pool_cache_key(spec),
            spec.task_count,
            spec.millis_per_task,
            spec.topology,
            spec.allow_cross_provider,
            spec.cross_provider_denied_by,
            spec.avoid_nodes,
        )
        shape = self._shapes.get(key)
        if shape is None:
            shape = JobShape(key[0])
            self._shapes[key] = shape
        return shape

    def pools_of(self, shape: JobShape, spec: JobSpec) -> tuple[Pool, ...]:
        """Return the candidate pools of ``shape`` (whose job ``spec`` is) for the current fleet."""
        if shape.pools_version != self._fleet.version:
            shape.pools = self.candidate_pools(spec)[1]
            shape.pools_version = self._fleet.version
        return shape.pools

    def candidate_pools(self, spec: JobSpec) -> tuple[PoolCacheKey, tuple[Pool, ...]]:
        """Return the cache key and the pools of accepted models in allowed regions.

        A pool whose last node was removed stays in the fleet but is no candidate, so a job
        that only it would accept gets NO_MATCHING_MODEL and not a size or capacity reason.
        """
        if self._version != self._fleet.version:
            self._pools.clear()
            self._version = self._fleet.version
        key = _pool_cache_key(spec)
        pools = self._pools.get(key)
        if pools is None:
            pools = tuple(p for p in self._fleet.pools.values() if self._accepts(spec, p))
            self._pools[key] = pools
        return key, pools

    def _accepts(self, spec: JobSpec, pool: Pool) -> bool:
        if not pool.nodes:
            return False
        if spec.models and pool.model not in spec.models:
            return False
        if spec.regions and pool.region_key not in spec.regions:
            return False
        model = self._catalog.get(pool.model)
        constraint = spec.constraint
        if constraint.vendor and model.vendor != constraint.vendor:
            return False
        if model.memory_gib < constraint.min_memory_gib:
            return False
        return model.software_stack.startswith(constraint.software_stack)


def _pool_cache_key(spec: JobSpec) -> PoolCacheKey:
    if spec.constraint is NO_CONSTRAINT:
        # Hashing the constraint dataclass is the costly part of the key; skip the default.
        return (spec.models, spec.regions)
    return (spec.models, spec.constraint, spec.regions)
