"""The fleet and its free-capacity index.

Nodes are grouped into pools, one per ``provider/region/model``. Each pool indexes its up
nodes by their count of free whole accelerators (one sorted bucket per count), its partly
used shared accelerators by free millis, and its interconnect domains by free whole
accelerators. Allocating or releasing an accelerator updates these in O(log n), so placement
never scans every node. A failed accelerator is in none of these indexes, whatever its use,
so no placement (whole or shared) lands on it until it recovers.

A node with a job limit (``NodeSpec.max_jobs``, the size of its agent's pool of task users)
leaves the indexes while it runs that many jobs, and returns when one of them is released, so
the placement searches stay as cheap as without the limit. A node whose agent rejected a start
as busy leaves them too, until the caller clears the mark (:meth:`Fleet.set_busy`).
"""

from __future__ import annotations

from sortedcontainers import SortedList

from scheduler.engine.spec import MILLIS_PER_ACCELERATOR, InvalidInputError, NodeSpec, NodeState

TENTATIVE_OWNER = "~tentative"
"""Owner id of an allocation made only while planning and released before it returns."""

PoolKey = tuple[str, str, str]
"""``(provider, region, model)``."""


class Domain:
    """An interconnect domain inside one pool."""

    __slots__ = ("free", "indexed_free", "name", "nodes", "ordinal")

    def __init__(self, name: str, ordinal: int) -> None:
        self.name = name
        self.ordinal = ordinal
        self.nodes: list[NodeRecord] = []
        self.free = 0
        """Free whole accelerators on the domain's up nodes."""
        self.indexed_free = 0
        """``free`` as the pool's domain index last recorded it."""


class NodeRecord:
    """Mutable state of one node."""

    __slots__ = (
        "busy",
        "domain",
        "draining",
        "failed",
        "fenced",
        "free_whole",
        "full",
        "jobs",
        "max_jobs",
        "ordinal",
        "owners",
        "pool",
        "spec",
        "state",
        "used",
    )

    def __init__(self, spec: NodeSpec, ordinal: int, pool: Pool, domain: Domain) -> None:
        self.spec = spec
        self.ordinal = ordinal
        self.pool = pool
        self.domain = domain
        self.state = NodeState.UP
        self.draining = False
        """The operator's drain, kept while the node is unknown or down so that it returns
        draining instead of up."""
        size = len(spec.accelerator_ids)
        self.used = [0] * size
        """Millis allocated on each accelerator."""
        self.owners: list[dict[str, int]] = [{} for _ in range(size)]
        """Per accelerator: owner id -> millis allocated to it."""
        self.free_whole = size
        self.jobs: dict[str, list[int]] = {}
        """Owner id -> indices of the accelerators allocated to it here."""
        self.fenced: set[str] = set()
        """Jobs whose tasks here were lost but are not confirmed stopped."""
        self.failed: dict[int, str] = {}
        """Index of each failed accelerator -> the health event that failed it."""
        self.max_jobs = spec.max_jobs
        """Jobs (owners) the node runs at once at most; 0 is no limit."""
        self.busy = False
        """Whether the node's agent rejected a start because it ran as many jobs as it can."""
        self.full = False
        """Whether the node is busy or runs ``max_jobs`` jobs, which keeps it out of the
        indexes."""

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP

    @property
    def schedulable(self) -> bool:
        """Whether the node is up and may take another job, and so is in the indexes."""
        return self.state is NodeState.UP and not self.full

    def free_indices(self, count: int) -> list[int]:
        """Return the first ``count`` wholly free accelerator indices."""
        if self.free_whole == len(self.used):
            return list(range(min(count, self.free_whole)))
        failed = self.failed
        free = [i for i, used in enumerate(self.used) if used == 0 and i not in failed]
        return free[:count]

    def usage_with_failed(self) -> list[int]:
        """Return the millis used on each accelerator, with failed ones counted as full."""
        used = list(self.used)
        for index in self.failed:
            used[index] = MILLIS_PER_ACCELERATOR
        return used


class Pool:
    """The nodes of one ``provider/region/model`` and their free-capacity index."""

    def __init__(self, key: PoolKey, ordinal: int) -> None:
        self.key = key
        self.ordinal = ordinal
        self.name = "/".join(key)
        self.nodes: list[NodeRecord] = []
        self.buckets: list[SortedList] = [SortedList()]
        """``buckets[n]``: ordinals of up nodes with exactly ``n`` free whole accelerators."""
        self.nonempty = 0
        """Bit ``n`` is set when ``buckets[n]`` is not empty."""
        self._slots: dict[int, int] = {}
        """Accelerators per task -> :meth:`whole_slots`, until the buckets change."""
        self.shared: SortedList = SortedList()
        """``(free_millis, node_ordinal, index)`` of partly used accelerators on up nodes."""
        self.domains: dict[str, Domain] = {}
        self.domain_list: list[Domain] = []
        """Domains by ordinal."""
        self._domain_free: SortedList = SortedList()
        self._stale_domains: set[Domain] = set()
        """Domains whose ``free`` changed since ``_domain_free`` recorded it."""
        self.used_millis = 0
        """Millis allocated on this pool's nodes in any state."""
        self.total_millis = 0
        self.up_accelerators = 0
        self.ends: SortedList = SortedList()
        """``(expected end, sequence, job id)`` of running jobs here with a wall-time limit."""
        self.cap_millis: int | None = None
        """Millis the plan may use now (pledges, recalls and pool limits); ``None`` is no cap."""
        self.protected_millis: int | None = None
        self.pledge_millis: int | None = None
        """Millis the pool's pledges allow after recalls, before the pool limit; ``None`` when
        no pledge names the pool."""
        self.recall_id = ""
        """The recall lowering the cap now, or empty."""
        self.jobs: set[str] = set()
        """Ids of running jobs with accelerators allocated here."""
        self.preemptible_nodes: dict[int, int] = {}
        """Node ordinal -> tasks of preemptible jobs running there, in insertion order."""

    @property
    def provider(self) -> str:
        return self.key[0]

    @property
    def region_key(self) -> str:
        return f"{self.key[0]}/{self.key[1]}"

    @property
    def model(self) -> str:
        return self.key[2]

    @property
    def max_accelerators(self) -> int:
        return len(self.buckets) - 1

    def bucket_add(self, free: int, ordinal: int) -> None:
        self.buckets[free].add(ordinal)
        self.nonempty |= 1 << free
        if self._slots:
            self._slots.clear()

    def bucket_remove(self, free: int, ordinal: int) -> None:
        bucket = self.buckets[free]
        bucket.remove(ordinal)
        if not bucket:
            self.nonempty &= ~(1 << free)
        if self._slots:
            self._slots.clear()

    def whole_slots(self, per_task: int) -> int:
        """Count tasks of ``per_task`` whole accelerators the up nodes can take, ignoring caps.

        Kept until a node's free count changes, because a gang search reads every candidate
        pool while a placement changes only one.
        """
        slots = self._slots.get(per_task)
        if slots is None:
            slots = 0
            buckets = self.buckets
            for free in range(per_task, len(buckets)):
                slots += len(buckets[free]) * (free // per_task)
            self._slots[per_task] = slots
        return slots

    def domain_free(self) -> SortedList:
        """Return ``(free whole accelerators, domain ordinal)`` of every domain, sorted.

        Placements only mark domains stale. The index catches up here, when a search for an
        interconnect domain reads it, so a pass that places many small jobs does not pay for it.
        """
        stale = self._stale_domains
        if stale:
            index = self._domain_free
            # The order of the updates does not change the sorted result.
            for domain in stale:
                if domain.free != domain.indexed_free:
                    index.remove((domain.indexed_free, domain.ordinal))
                    index.add((domain.free, domain.ordinal))
                    domain.indexed_free = domain.free
            stale.clear()
        return self._domain_free

    def add_domain(self, domain: Domain) -> None:
        self.domains[domain.name] = domain
        self.domain_list.append(domain)
        self._domain_free.add((domain.indexed_free, domain.ordinal))

    def move_domain(self, domain: Domain, delta: int) -> None:
        """Change a domain's free whole accelerators by ``delta``."""
        if delta:
            domain.free += delta
            self._stale_domains.add(domain)

    def trim_buckets(self) -> None:
        """Drop the free-count buckets above the size of the pool's largest node.

        Called after a node left the pool. Those buckets are empty, and
        :func:`scheduler.engine.reasons.largest_node` counts them.
        """
        largest = max((len(node.used) for node in self.nodes), default=0)
        if len(self.buckets) > largest + 1:
            del self.buckets[largest + 1 :]
            self.nonempty &= (1 << (largest + 1)) - 1
            self._slots.clear()

    def smallest_fit(self, count: int) -> int | None:
        """Return the smallest free count >= ``count`` that some up node has, if any."""
        above = self.nonempty >> count
        if not above:
            return None
        return count + (above & -above).bit_length() - 1

    def available_millis(self) -> int:
        """Millis the cap still allows on top of what is held."""
        if self.cap_millis is None:
            return self.total_millis
        return max(0, self.cap_millis - self.used_millis)


class Fleet:
    """All nodes, their pools, and the allocate and release operations that keep the index right."""

    def __init__(self) -> None:
        self.nodes: list[NodeRecord] = []
        """Every node ever added, by ordinal. A removed node's record stays here, out of every
        pool, domain and index, so that the ordinals an earlier pass kept stay valid."""
        self.by_id: dict[str, NodeRecord] = {}
        """The nodes in the fleet by id, removed ones not included."""
        self.pools: dict[PoolKey, Pool] = {}
        self.version = 0
        """Bumped whenever a pool or node is added or a node removed, so cached pool lists can
        be rebuilt."""
        self.freed = 0
        """Bumped whenever capacity is released or a node comes up."""

    def add_node(self, spec: NodeSpec) -> NodeRecord:
        if spec.node_id in self.by_id:
            raise InvalidInputError(f"node {spec.node_id}: already in the fleet")
        if not spec.accelerator_ids:
            raise InvalidInputError(f"node {spec.node_id}: accelerator_ids must not be empty")
        if len(set(spec.accelerator_ids)) != len(spec.accelerator_ids):
            raise InvalidInputError(f"node {spec.node_id}: accelerator_ids must be unique")
        if spec.max_jobs < 0:
            raise InvalidInputError(f"node {spec.node_id}: max_jobs must be >= 0")
        key = (spec.provider, spec.region, spec.model)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(key, len(self.pools))
            self.pools[key] = pool
        domain_name = spec.interconnect_domain or f"node:{spec.node_id}"
        domain = pool.domains.get(domain_name)
        if domain is None:
            domain = Domain(domain_name, len(pool.domains))
            pool.add_domain(domain)
        node = NodeRecord(spec, len(self.nodes), pool, domain)
        self.nodes.append(node)
        self.by_id[spec.node_id] = node
        pool.nodes.append(node)
        domain.nodes.append(node)
        size = len(spec.accelerator_ids)
        pool.total_millis += size * MILLIS_PER_ACCELERATOR
        while len(pool.buckets) <= size:
            pool.buckets.append(SortedList())
        pool.up_accelerators += size
        self._index_add(node)
        self.version += 1
        return node

    def remove_node(self, node: NodeRecord) -> None:
        """Take ``node`` out of its pool, its domain and every index, and forget its id.

        Raises :class:`InvalidInputError`, changing nothing, while any of its accelerators is
        allocated to a job, a fenced copy included. A node added later with the same id is a
        new node with a new ordinal.
        """
        node_id = node.spec.node_id
        if self.by_id.get(node_id) is not node:
            raise InvalidInputError(f"node {node_id}: not in the fleet")
        if node.jobs:
            owners = ", ".join(sorted(node.jobs))
            raise InvalidInputError(f"node {node_id}: accelerators are still allocated to {owners}")
        if node.schedulable:
            self._index_remove(node)
        pool = node.pool
        if node.up:
            pool.up_accelerators -= len(node.used) - len(node.failed)
        node.state = NodeState.DOWN
        pool.nodes.remove(node)
        node.domain.nodes.remove(node)
        pool.total_millis -= len(node.used) * MILLIS_PER_ACCELERATOR
        pool.trim_buckets()
        del self.by_id[node_id]
        self.version += 1

    def node(self, node_id: str) -> NodeRecord:
        try:
            return self.by_id[node_id]
        except KeyError:
            raise InvalidInputError(f"node {node_id}: not in the fleet") from None

    def set_state(self, node: NodeRecord, state: NodeState) -> None:
        if node.state is state:
            return
        if node.schedulable:
            self._index_remove(node)
        if node.up:
            node.pool.up_accelerators -= len(node.used) - len(node.failed)
        node.state = state
        if node.up:
            node.pool.up_accelerators += len(node.used) - len(node.failed)
        if node.schedulable:
            self._index_add(node)
            self.freed += 1

    def set_max_jobs(self, node: NodeRecord, max_jobs: int) -> None:
        """Set the number of jobs ``node`` runs at once at most; 0 is no limit."""
        if max_jobs < 0:
            raise InvalidInputError(f"node {node.spec.node_id}: max_jobs must be >= 0")
        node.max_jobs = max_jobs
        self._refresh_full(node)

    def set_busy(self, node: NodeRecord, busy: bool) -> None:
        """Mark ``node`` as taking no more jobs, whatever its limit, or clear the mark."""
        node.busy = busy
        self._refresh_full(node)

    def _refresh_full(self, node: NodeRecord, freed: bool = True) -> None:
        self._set_full(node, node.busy or 0 < node.max_jobs <= len(node.jobs), freed)

    def _set_full(self, node: NodeRecord, full: bool, freed: bool = True) -> None:
        """Take ``node`` out of the indexes, or put it back; ``freed`` False keeps a release
        of a planning allocation from counting as freed capacity."""
        if node.full is full:
            return
        if node.schedulable:
            self._index_remove(node)
        node.full = full
        if node.schedulable:
            self._index_add(node)
            if freed:
                self.freed += 1

    def allocate(self, node: NodeRecord, index: int, job_id: str, millis: int) -> None:
        """Give ``millis`` of accelerator ``index`` on ``node`` to ``job_id``."""
        self.allocate_many(node, (index,), job_id, millis)

    def allocate_many(
        self, node: NodeRecord, indices: tuple[int, ...], job_id: str, millis: int
    ) -> None:
        """Give ``millis`` of each accelerator in ``indices`` on ``node`` to ``job_id``."""
        indexed = node.schedulable
        newly_used = 0
        owned = node.jobs.setdefault(job_id, [])
        used = node.used
        failed = node.failed
        for index in indices:
            before = used[index]
            after = before + millis
            # Only partly used accelerators sit in the shared index; a whole accelerator
            # taken from free skips it (inlined: this loop runs for every placed accelerator).
            if indexed and 0 < before < MILLIS_PER_ACCELERATOR:
                self._index_remove_accelerator(node, index)
            used[index] = after
            owners = node.owners[index]
            owners[job_id] = owners.get(job_id, 0) + millis
            owned.append(index)
            if before == 0 and index not in failed:
                newly_used += 1
            if indexed and after < MILLIS_PER_ACCELERATOR:
                self._index_add_accelerator(node, index)
        node.pool.used_millis += millis * len(indices)
        if newly_used:
            self._set_free_whole(node, node.free_whole - newly_used)
        if 0 < node.max_jobs <= len(node.jobs):
            self._set_full(node, True)

    def release_job(self, node: NodeRecord, job_id: str) -> int:
        """Release everything allocated to ``job_id`` on ``node``; return the millis released."""
        indices = node.jobs.pop(job_id, [])
        node.fenced.discard(job_id)
        indexed = node.schedulable
        released = 0
        newly_free = 0
        for index in sorted(set(indices)):
            if indexed:
                self._index_remove_accelerator(node, index)
            millis = node.owners[index].pop(job_id, 0)
            node.used[index] -= millis
            released += millis
            if node.used[index] == 0 and index not in node.failed:
                newly_free += 1
            if indexed:
                self._index_add_accelerator(node, index)
        node.pool.used_millis -= released
        if newly_free:
            self._set_free_whole(node, node.free_whole + newly_free)
        if released and job_id != TENTATIVE_OWNER:
            self.freed += 1
        if node.full:
            self._refresh_full(node, freed=job_id != TENTATIVE_OWNER)
        return released

    def fail_accelerator(self, node: NodeRecord, index: int, event_id: str) -> bool:
        """Take accelerator ``index`` out of every index; return False if it already was.

        Shares that jobs hold on it stay allocated until the caller stops those jobs, and
        releasing them does not make the accelerator free.
        """
        if index in node.failed:
            return False
        if node.schedulable:
            self._index_remove_accelerator(node, index)
        if node.up:
            node.pool.up_accelerators -= 1
        node.failed[index] = event_id
        if node.used[index] == 0:
            self._set_free_whole(node, node.free_whole - 1)
        return True

    def recover_accelerator(self, node: NodeRecord, index: int) -> bool:
        """Put a failed accelerator back into the indexes; return False if it was not failed."""
        if node.failed.pop(index, None) is None:
            return False
        if node.schedulable:
            self._index_add_accelerator(node, index)
        if node.up:
            node.pool.up_accelerators += 1
        if node.used[index] == 0:
            self._set_free_whole(node, node.free_whole + 1)
        self.freed += 1
        return True

    def _set_free_whole(self, node: NodeRecord, free: int) -> None:
        if node.schedulable:
            pool = node.pool
            pool.bucket_remove(node.free_whole, node.ordinal)
            pool.bucket_add(free, node.ordinal)
            node.pool.move_domain(node.domain, free - node.free_whole)
        node.free_whole = free

    def _index_add(self, node: NodeRecord) -> None:
        node.pool.bucket_add(node.free_whole, node.ordinal)
        node.pool.move_domain(node.domain, node.free_whole)
        for index in range(len(node.used)):
            self._index_add_accelerator(node, index)

    def _index_remove(self, node: NodeRecord) -> None:
        node.pool.bucket_remove(node.free_whole, node.ordinal)
        node.pool.move_domain(node.domain, -node.free_whole)
        for index in range(len(node.used)):
            self._index_remove_accelerator(node, index)

    @staticmethod
    def _index_add_accelerator(node: NodeRecord, index: int) -> None:
        used = node.used[index]
        if 0 < used < MILLIS_PER_ACCELERATOR and index not in node.failed:
            node.pool.shared.add((MILLIS_PER_ACCELERATOR - used, node.ordinal, index))

    @staticmethod
    def _index_remove_accelerator(node: NodeRecord, index: int) -> None:
        used = node.used[index]
        if 0 < used < MILLIS_PER_ACCELERATOR and index not in node.failed:
            node.pool.shared.remove((MILLIS_PER_ACCELERATOR - used, node.ordinal, index))
