"""One leader term of a shard: the state a leader builds, runs and drops when deposed.

:class:`Leadership` campaigns forever. Each time it wins the lock it bumps the epoch and loads
the fleet and the open jobs from PostgreSQL into a fresh engine. It then republishes recorded
but unacknowledged commands and runs the loop, the submission batcher and the agent consumers
in one task group. Losing the lock connection, or a write fenced by a newer epoch, ends the
term: the task group is cancelled and nothing of it dispatches again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import asyncpg
from nats.aio.client import Client
from nats.js import JetStreamContext

from acsp.v1 import agent_pb2
from scheduler.engine.catalog import Catalog
from scheduler.engine.engine import Engine
from scheduler.engine.spec import EngineConfig
from services.runtime.errors import Unavailable

from .admission import GrantAdmission, RateCard
from .agent_feed import AgentFeed, node_from_inventory
from .capacity_summary import NodeCapacity, RegionCapacity, split_capacity
from .engine_adapter import EngineAdapter
from .fleet import FleetView
from .inputs import Input
from .jobbook import JobBook
from .leader import LeaderLease, LeadershipLost
from .loop import LoopSettings, SchedulingLoop
from .node_store import NodeStore
from .pledges import PledgeStore
from .projects import ProjectDirectory
from .provider_store import ProviderStore
from .providers import ProviderDirectory
from .publisher import Publisher
from .store import Fenced, JobStore
from .submitter import SubmissionBatcher
from .validation import DEFAULT_MAX_PAYLOAD
from .watch import WatchHub

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Term:
    """State and workers owned by one leader term."""

    epoch: int
    inbox: asyncio.Queue[Input]
    batcher: SubmissionBatcher
    fleet: FleetView
    book: JobBook
    nodes: NodeStore
    watchers: WatchHub = field(default_factory=WatchHub)
    rates: RateCard | None = None
    """The rate card this term prices holds with, which submissions are checked against."""

    def capacity_by_region(self, now: float) -> RegionCapacity:
        """Milli-accelerators per ``provider/region``: in use, in total, and the total split
        into usable, recalled, above a pledge or pool limit, unknown and out of service."""
        engine = self.book.engine.engine
        recalled: dict[str, int] = {}
        above_cap: dict[str, int] = {}
        for pool in engine.fleet.pools.values():
            region = f"{pool.key[0]}/{pool.key[1]}"
            millis = engine.capacity.recalled_millis(pool, now)
            if millis:
                recalled[region] = recalled.get(region, 0) + millis
            above = engine.capacity.above_cap_millis(pool, now)
            if above:
                above_cap[region] = above_cap.get(region, 0) + above
        used: dict[str, int] = {}
        for job in self.book.jobs.values():
            for task in job.placement:
                region = f"{task.provider}/{task.region}"
                used[region] = used.get(region, 0) + task.millis * max(1, len(task.accelerators))
        nodes = (
            NodeCapacity(
                f"{node.provider}/{node.region}", node.status, 1000 * len(node.accelerators)
            )
            for node in self.fleet.nodes()
        )
        return split_capacity(nodes, recalled, used, above_cap)


@dataclass(frozen=True, slots=True)
class TermConfig:
    dsn: str
    shard: str
    heartbeat_timeout_s: float
    half_life_s: float
    loop: LoopSettings
    poll_s: float = 1.0
    inbox_size: int = 100_000


class Leadership:
    """Campaign for a shard and run each term; readers use :attr:`store` at any time."""

    def __init__(
        self,
        config: TermConfig,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        admission: GrantAdmission,
        rates: Callable[[], Awaitable[RateCard]],
        projects: ProjectDirectory,
        nats: Client,
    ) -> None:
        self.config = config
        self._nats = nats
        self.store = JobStore(pool, config.shard)
        self.pool = pool
        self._pool = pool
        self._js = js
        self._admission = admission
        self._rates = rates
        self.holder = f"{uuid.uuid4().hex[:8]}"
        self.catalog = Catalog()
        """The engine's accelerator models, which submissions are checked against."""
        self.projects = projects
        """Projects and grant owners, which submitters are checked against."""
        self.current: Term | None = None
        self.terms = 0

    @property
    def nats(self) -> Client:
        """The service's NATS connection."""
        return self._nats

    @property
    def max_payload(self) -> int:
        """Largest NATS message in bytes, as the connected server reports it."""
        if not self._nats.is_connected:
            return DEFAULT_MAX_PAYLOAD
        return self._nats.max_payload

    @property
    def leading(self) -> bool:
        return self.current is not None

    def require(self) -> Term:
        """Return the running term; raise UNAVAILABLE on a standby."""
        term = self.current
        if term is None:
            raise Unavailable(
                f"this scheduler replica is a standby for shard {self.config.shard!r}; "
                "call the leader, or retry once this replica takes over"
            )
        return term

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign and lead until ``stop`` is set; a lost term campaigns again."""
        while not stop.is_set():
            lease = LeaderLease(
                self.config.dsn,
                self.config.shard,
                self.holder,
                poll_interval_s=self.config.poll_s,
                check_interval_s=self.config.poll_s,
            )
            epoch = await lease.acquire()
            try:
                await self._lead(lease, epoch, stop)
            except* (LeadershipLost, Fenced) as group:
                logger.warning(
                    "leader term %d of shard %s ended: %s",
                    epoch,
                    self.config.shard,
                    group.exceptions[0],
                )
            except* _TermStopped:
                logger.info("leader term %d of shard %s stopped", epoch, self.config.shard)
            except* (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as group:
                # Everything a term holds is rebuilt from PostgreSQL, so a new term is safe.
                logger.error(
                    "leader term %d of shard %s failed, campaigning again: %r",
                    epoch,
                    self.config.shard,
                    group.exceptions[0],
                )
                await asyncio.sleep(self.config.poll_s)
            finally:
                self.current = None
                await lease.release()

    async def _lead(self, lease: LeaderLease, epoch: int, stop: asyncio.Event) -> None:
        self.terms += 1
        cfg = self.config
        inbox: asyncio.Queue[Input] = asyncio.Queue(cfg.inbox_size)
        engine = EngineAdapter(Engine(EngineConfig(half_life_s=cfg.half_life_s), self.catalog))
        fleet = FleetView(cfg.heartbeat_timeout_s)
        book = JobBook(engine, epoch, fleet.endpoint, cfg.loop.budget_retry_s)
        nodes = NodeStore(self._pool, fence=(cfg.shard, epoch))
        loop = SchedulingLoop(
            book=book,
            fleet=fleet,
            store=self.store,
            nodes=nodes,
            admission=self._admission,
            rates=await self._rates(),
            publisher=Publisher(self._js),
            watchers=WatchHub(),
            settings=cfg.loop,
            inbox=inbox,
            projects=self.projects,
        )
        await self._restore(loop, nodes)
        batcher = SubmissionBatcher(self.store, epoch, inbox)
        feed = AgentFeed(self._js, inbox, f"scheduler-{cfg.shard}", fleet)
        self.current = Term(epoch, inbox, batcher, fleet, book, nodes, loop.watchers, loop.rates)
        logger.info(
            "leading shard %s: %d nodes, %d open jobs", cfg.shard, len(fleet), len(book.jobs)
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(lease.hold(), name="leader-lease")
            tasks.create_task(loop.run(), name="scheduling-loop")
            tasks.create_task(batcher.run(), name="submission-batcher")
            tasks.create_task(feed.run_stream(stop), name="agent-stream")
            tasks.create_task(feed.run_heartbeats(stop, self._nats), name="heartbeats")
            tasks.create_task(_stop_on(stop), name="stop-watch")

    async def _restore(self, loop: SchedulingLoop, nodes: NodeStore) -> None:
        """Load the fleet and open jobs persisted by earlier terms."""
        now = loop.now()
        registry = await ProviderStore(self._pool).all()
        loop.book.engine.set_providers(ProviderDirectory(registry))
        # Loaded before the nodes, so that each node enters the engine with its failures.
        for failure in await nodes.load_failed_accelerators():
            loop.book.engine.set_accelerator_health(failure, now)
        down = await nodes.load_down()
        for payload, drain, reason in await nodes.load():
            view = node_from_inventory(agent_pb2.Inventory.FromString(payload))
            change = loop.fleet.load(replace(view, drain=drain, status_reason=reason), now)
            loop.book.engine.add_node(change.node)
            if drain is not None:
                loop.book.engine.set_draining(change.node.key, True, now)
            if change.node.key in down:
                loop.fleet.restore_down(change.node.key, down[change.node.key])
        pledges = PledgeStore(self._pool)
        by_id = {}
        for pledge in await pledges.pledges():
            loop.book.engine.set_pledge(pledge)
            by_id[pledge.pledge_id] = pledge
        for recall in await pledges.recalls():
            loop.book.engine.add_recall(recall, by_id[recall.pledge_id])
        jobs = await self.store.load_open_jobs()
        placed = [j for j in jobs if j.state != "pending"]
        missing = [
            j for j in placed if any(not loop.book.engine.has_node(t.node_key) for t in j.placement)
        ]
        if missing:
            logger.warning("%d running jobs sit on nodes with no stored inventory", len(missing))
        loop.book.add([j for j in jobs if j not in missing], now)
        # After the running jobs, so a copy is not fenced where a running job uses its
        # accelerators now (on a live node they were released at once).
        orphans = await self.store.load_orphans()
        loop.book.adopt_orphans(orphans)
        ended = {o.task_id.split("/", 1)[0] for o in orphans} - loop.book.jobs.keys()
        loop.book.adopt_ended(await self.store.ended_jobs(sorted(ended)))
        # Last, so the engine frees what the jobs and copies above took on down nodes. Copies
        # stored there are left only by a crash between the two writes of a down mark.
        for key in down:
            if loop.fleet.get(key) is not None:
                loop.book.reload_down(key)
                loop.book.engine.node_down(key, now)


class _TermStopped(Exception):
    """The service is shutting down; raised to end the term's task group."""


async def _stop_on(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _TermStopped
