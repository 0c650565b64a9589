"""The scheduling loop: one task that owns the job book, the fleet view and the engine.

Inputs arrive on a bounded queue. Each turn takes the queued inputs (up to a batch) and applies
them. It runs an engine pass when something changed or a tick elapsed, then commits the job
changes and dispatch records in batched statements. Only after the commit does it publish
commands and events, acknowledge NATS messages, reply to waiting requests and notify watchers.
Hold requests run as owned tasks whose results come back as inputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Final

import asyncpg
from opentelemetry import metrics

from services.runtime.errors import Unavailable
from services.runtime.evolve import evolve

from .admission import GrantAdmission, HoldOutcome, RateCard
from .award_check import settle_final_hold
from .dependencies import NOT_FOUND
from .engine_adapter import AcceleratorHealth
from .fleet import DrainChange, FleetView, NodeChange
from .inputs import (
    AcceleratorHealthReported,
    Ack,
    AgentDrainRequested,
    CancelRequested,
    DependencyStates,
    DrainRequested,
    HeartbeatReceived,
    HoldDone,
    Input,
    InventoryReceived,
    NodeDeleteRequested,
    NodeDownRequested,
    PledgeChanged,
    ProviderRegistered,
    RecallAdded,
    Submitted,
    TaskReported,
)
from .jobbook import Effects, JobBook
from .model import Job
from .node_deletion import NodeDeletion, delete_node
from .node_store import NodeStore
from .publisher import Publisher, PublishResult
from .purge import AckedRowPurge
from .store import DispatchRecord, JobStore, OutboxEvent
from .watch import WatchHub

if TYPE_CHECKING:
    from .projects import GrantRecord, ProjectDirectory

logger = logging.getLogger(__name__)

_meter = metrics.get_meter(__name__)
_dead_events = _meter.create_counter(
    "acsp.scheduler.dead_events",
    description="job events moved to scheduler.dead_events after JetStream rejected them",
)


APPLY_SLICE: Final = 100
"""Inputs a turn applies between two yields to the event loop."""
ENDED_TASK_STATES: Final = frozenset({"exited", "stopped", "timed_out", "lost", "failed_hardware"})
"""Task states that end a task that ran, which frees its task user. A failed start is not
among them, because a start rejected as busy is one."""


@dataclass(frozen=True, slots=True)
class LoopSettings:
    max_batch: int = 2000
    """Inputs applied per turn at most, which bounds the work of one turn."""
    tick_s: float = 1.0
    """Maximum interval between passes, for heartbeat expiry and time-based decisions."""
    min_pass_interval_s: float = 0.05
    """Shortest interval between passes: inputs arriving faster share one pass."""
    pass_share: float = 0.25
    """Largest share of the process's time that passes may take. A pass that took d seconds
    is followed by at least d / pass_share - d seconds without one, so RPCs keep running."""
    max_holds_in_flight: int = 1024
    """Holds requested from the grant service at once, at most."""
    holds_per_call: int = 256
    """Holds sent in one ``PlaceHolds`` call, at most."""
    budget_retry_s: float = 30.0
    """Seconds before a project whose hold failed for budget is tried again."""
    start_timeout_s: float = 120.0
    """Seconds a job may stay starting before it is requeued (lost or rejected commands)."""
    stats_interval_s: float = 10.0
    """Seconds between the loop's INFO lines with its counters."""
    republish_after_s: float = 5.0
    """Age of a recorded but unacknowledged command before it is published again."""
    max_event_rejections: int = 5
    """Rejections for good after which a job event moves to ``scheduler.dead_events``. Tries
    are about ``republish_after_s`` apart, so one wrong reply of a restarting JetStream does
    not move an event."""
    outbox_retention_s: float = 86_400.0
    """Seconds that acknowledged commands and job events are kept. Commands also stay until their
    job has ended."""
    purge_interval_s: float = 60.0
    """Seconds between purges of acknowledged commands and job events."""


class SchedulingLoop:
    """Runs the shard for one leader epoch; any :class:`~.store.Fenced` error ends it."""

    def __init__(
        self,
        *,
        book: JobBook,
        fleet: FleetView,
        store: JobStore,
        nodes: NodeStore,
        admission: GrantAdmission,
        rates: RateCard,
        publisher: Publisher,
        watchers: WatchHub,
        settings: LoopSettings,
        inbox: asyncio.Queue[Input],
        projects: ProjectDirectory | None = None,
    ) -> None:
        """``projects`` is read for whether a grant has had its supplement. Without it, a job
        whose hold exceeds all its grant was ever credited waits instead of failing."""
        self.book = book
        self.projects = projects
        self.fleet = fleet
        self.store = store
        self.nodes = nodes
        self.admission = admission
        self.rates = rates
        self.publisher = publisher
        self.watchers = watchers
        self.settings = settings
        self.inbox = inbox
        self.epoch = book.epoch
        self._hold_calls = asyncio.Semaphore(
            max(1, settings.max_holds_in_flight // settings.holds_per_call)
        )
        self._no_budget: dict[tuple[str, str], float] = {}
        """When the latest hold failed for lack of budget, per budget block (project, payer)."""
        self._unpublishable: list[tuple[DispatchRecord, str]] = []
        self._published: list[tuple[str, int, int, str]] = []
        self._published_events: list[str] = []
        """Commands and events JetStream stored, to mark in the next turn's transaction."""
        """Commands NATS rejected for good, with the reason, to fail in the next turn."""
        self._drains: dict[str, DrainChange] = {}
        """Drains started or ended this turn by node key, written with the turn's commit."""
        self._delete_requests: list[NodeDeleteRequested] = []
        """Delete requests that the next turn applies first, against the state that this
        turn's commit stores."""
        self._deletions: list[NodeDeletion] = []
        """Nodes deleted this turn, written first in the turn's commit."""
        self._last_pass = 0.0
        self._pass_gap = settings.min_pass_interval_s
        self._pass_due = False
        self._last_republish = 0.0
        self._purge = AckedRowPurge(store, settings.outbox_retention_s, settings.purge_interval_s)
        self._clock = 0.0
        self.passes = 0
        self._pass_seconds = 0.0
        self._turns = 0
        self._holds_in_flight = 0
        self._last_stats = time.monotonic()

    def now(self) -> float:
        """Wall-clock seconds, never going back (the engine rejects time that does)."""
        self._clock = max(self._clock, time.time())
        return self._clock

    async def run(self) -> None:
        """Run turns until cancelled or fenced; hold requests run in an owned task group."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            await self._republish(older_than_s=0.0)
            while True:
                batch = await self._next_batch()
                await self._turn(batch)

    async def _next_batch(self) -> list[Input]:
        batch: list[Input] = []
        wait_s = self.settings.tick_s
        if self._delete_requests:
            wait_s = 0.0
        elif self._pass_due:
            wait_s = max(0.0, self._last_pass + self._pass_gap - time.time())
        try:
            first = await asyncio.wait_for(self.inbox.get(), timeout=wait_s)
        except TimeoutError:
            return batch
        batch.append(first)
        while len(batch) < self.settings.max_batch:
            try:
                batch.append(self.inbox.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _turn(self, batch: list[Input]) -> None:
        now = self.now()
        fx = Effects(now)
        acks: list[Ack] = []
        replies: list[tuple[asyncio.Future[object], object]] = []
        inventories: list[InventoryReceived] = []
        self._apply_deletions(fx, replies)
        self.book.settle_reloaded(fx)
        for record, reason in self._unpublishable:
            self.book.fail_unpublishable(record, reason, fx)
        self._unpublishable.clear()
        for index, item in enumerate(batch, 1):
            self._apply(item, fx, acks, replies, inventories)
            if index % APPLY_SLICE == 0:
                # Let calls waiting on the event loop (submissions, reads) run between slices.
                await asyncio.sleep(0)
        self.book.settle_reloaded(fx)  # Fail now the submissions the engine rejected.
        for change in self.fleet.expire(now):
            self._on_node_change(change, fx)
        self._retry_budgets(now)
        self.book.engine.expire_busy(now)
        self.book.expire_starts(self.settings.start_timeout_s, fx)
        self._pass_due = self._pass_due or bool(batch)
        since = now - self._last_pass
        if since >= self._pass_gap and (self._pass_due or since >= self.settings.tick_s):
            self._run_pass(now, fx)
        self._confirm_stops_on_down_nodes(fx)
        self._stamp_changes(fx)
        await self._commit(fx, inventories)
        step = self.settings.holds_per_call
        for first in range(0, len(fx.admit), step):
            self._tasks.create_task(self._holds(fx.admit[first : first + step]))
        unresolved = self.book.dependencies.take_unresolved()
        if unresolved:
            self._tasks.create_task(self._read_dependencies(unresolved))
        await self._send(fx.commands, fx.events)
        for ack in acks:
            await ack()
        for future, value in replies:
            if isinstance(value, Job) and value.job_id in fx.changed:
                value = evolve(value, updated_at=fx.now)
            if not future.done():
                future.set_result(value)
        self.watchers.publish(job for job, _ in fx.changed.values())
        self._turns += 1
        self._log_stats()
        if now - self._last_republish >= self.settings.republish_after_s:
            self._last_republish = now
            await self._republish(self.settings.republish_after_s)
        if self._purge.claim():
            # Beside the turns, because the first purge of a large backlog takes many statements.
            self._tasks.create_task(self._purge.run(), name="outbox-purge")

    async def _read_dependencies(self, job_ids: list[str]) -> None:
        """Read the states of jobs that others wait for and hand them to the loop.

        Reads that fail are tried again, because the waiting jobs stay pending until then.
        """
        delay = 0.1
        while True:
            try:
                states = await self.store.job_states(job_ids)
                break
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                logger.warning(
                    "reading the states of %d awaited jobs failed, retrying in %.1f s: %s",
                    len(job_ids),
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        found = tuple((job_id, states.get(job_id, NOT_FOUND)) for job_id in job_ids)
        await self.inbox.put(DependencyStates(found))

    def _confirm_stops_on_down_nodes(self, fx: Effects) -> None:
        """Confirm the stops that this turn sent to nodes marked down.

        The down mark confirmed the copies that waited on the node then. A job that is
        requeued later, e.g. by the first pass after the mark, leaves a copy there too. No
        heartbeat will confirm it, so it would keep the node's job listed, and the node from
        being deleted, for good. The mark covers it, because it declares that nothing runs there.
        """
        for key in sorted(self.book.nodes_with_new_copies()):
            node = self.fleet.get(key)
            if node is not None and node.status == "down":
                self.book.node_down(key, fx)

    def _stamp_changes(self, fx: Effects) -> None:
        """Record the turn's clock as the update time of every job the turn changed.

        The book's copy gets the stamped value too, so that a reply built from it later
        carries the time of its latest change.
        """
        for job_id, (job, cause) in fx.changed.items():
            stamped = evolve(job, updated_at=fx.now)
            fx.changed[job_id] = (stamped, cause)
            if self.book.jobs.get(job_id) is job:
                self.book.jobs[job_id] = stamped

    def _run_pass(self, now: float, fx: Effects) -> None:
        began = time.perf_counter()
        self._last_pass = now
        self._pass_due = False
        self.passes += 1
        self.book.apply_pass(self.book.engine.schedule(now), fx)
        took = time.perf_counter() - began
        self._pass_seconds += took
        share = self.settings.pass_share
        self._pass_gap = max(self.settings.min_pass_interval_s, took / share - took)

    def _apply(
        self,
        item: Input,
        fx: Effects,
        acks: list[Ack],
        replies: list[tuple[asyncio.Future[object], object]],
        inventories: list[InventoryReceived],
    ) -> None:
        match item:
            case Submitted(jobs):
                self.book.add(list(jobs), fx.now)
            case DependencyStates(states):
                self.book.dependencies.apply_stored(dict(states))
            case TaskReported(node_key, task_id, state, exit_code, message, ack):
                if state in ENDED_TASK_STATES:
                    self.book.engine.clear_busy(node_key)
                if item.checkpoint_ref:
                    self.book.apply_checkpoint(
                        task_id, item.checkpoint_ref, item.checkpoint_at or fx.now, fx
                    )
                self.book.apply_task(
                    node_key, task_id, state, exit_code, message, fx, node_busy=item.node_busy
                )
                if ack is not None:
                    acks.append(ack)
            case HoldDone(job_id, attempt, outcome):
                self.book.apply_hold(job_id, attempt, outcome, fx)
                if outcome.status == "no_budget":
                    blocked = self.book.engine.budget_key(job_id)
                    if blocked is not None:
                        self._no_budget[blocked] = fx.now
            case HeartbeatReceived():
                self._apply_heartbeat(item, fx)
            case InventoryReceived(node, _, ack):
                change = self.fleet.apply_inventory(node, fx.now)
                self._on_node_change(change, fx)
                for failure in self.book.engine.inventory_failures(node):
                    self._set_accelerator_health(failure, fx)
                self.book.apply_node_running(node.key, node.running_task_ids, fx)
                inventories.append(item)
                if ack is not None:
                    acks.append(ack)
            case AcceleratorHealthReported(change, ack):
                self._set_accelerator_health(change, fx)
                if ack is not None:
                    acks.append(ack)
            case CancelRequested(job_id, reason, cause, reply):
                job = self.book.cancel(job_id, reason, cause, fx)
                replies.append((reply, job))  # type: ignore[arg-type]
            case PledgeChanged(pledge):
                self.book.engine.set_pledge(pledge)
            case RecallAdded(recall, pledge):
                logger.info(
                    "recall %s takes %d accelerators of pledge %s from %s",
                    recall.recall_id,
                    recall.count,
                    pledge.pledge_id,
                    recall.effective_at,
                )
                self.book.engine.add_recall(recall, pledge)
            case ProviderRegistered(provider, applied):
                engine = self.book.engine
                engine.set_providers(engine.providers.with_provider(provider))
                if applied is not None:
                    replies.append((applied, None))  # type: ignore[arg-type]
            case DrainRequested(key, draining, reason, reply):
                if self.fleet.get(key) is not None:
                    self._drain(self.fleet.operator_drain(key, draining, reason, fx.now), fx)
                replies.append((reply, self.fleet.get(key)))  # type: ignore[arg-type]
            case AgentDrainRequested(key, reason, sent_at, ack):
                if self.fleet.get(key) is not None:
                    self._drain(self.fleet.agent_drain(key, reason, sent_at), fx)
                if ack is not None:
                    acks.append(ack)
            case NodeDownRequested(key, reason, reply):
                node_view = self.fleet.get(key)
                if node_view is not None:
                    down = self.fleet.set_down(key, reason)
                    if down is not None:
                        logger.warning("node %s is down: %s", key, reason)
                        self.book.node_down(key, fx)
                        self.book.engine.node_down(key, fx.now)
                        fx.nodes_down[key] = reason
                        node_view = down.node
                replies.append((reply, node_view))  # type: ignore[arg-type]
            case NodeDeleteRequested():
                self._delete_requests.append(item)

    def _apply_deletions(
        self, fx: Effects, replies: list[tuple[asyncio.Future[object], object]]
    ) -> None:
        """Apply the delete requests of the last turn, before anything else in this one.

        The last turn's commit stored every change it made, so a node is deleted only when
        the stored jobs and task copies leave nothing on it too. Deciding within the turn that
        confirmed its last stop would write the deletion before that stop, and a crash between
        the two writes would leave a stored job with a live task on a node that is gone. The
        deletion is written before this turn's other node writes, so an inventory that reaches
        the node later in the turn adds it again.
        """
        requests, self._delete_requests = self._delete_requests, []
        for request in requests:
            deleted = delete_node(
                self.fleet,
                self.book,
                request.node_key,
                request.reason,
                request.request_id,
                request.deleted_by,
            )
            if deleted.deletion is not None:
                self._deletions.append(deleted.deletion)
            replies.append((request.reply, deleted))  # type: ignore[arg-type]

    def _apply_heartbeat(self, item: HeartbeatReceived, fx: Effects) -> None:
        key = item.node_key
        node = self.fleet.get(key)
        last_running = frozenset() if node is None else node.running_task_ids
        if item.replayed:
            if node is None or node.status == "down":
                # The stored heartbeat a new leader's watch replays may predate the down mark.
                return
            change = self.fleet.replay_heartbeat(
                key, item.boot_id, item.running, item.sent_at, fx.now
            )
            # An overdue heartbeat is no sign of life, and its task list may predate tasks
            # that started before the node was lost, so it confirms no stop.
            alive = not self.fleet.overdue(item.sent_at, fx.now)
        else:
            change, alive = self.fleet.receive_heartbeat(
                key, item.boot_id, item.running, item.received_at, fx.now
            )
        if change is not None:
            self._on_node_change(change, fx)
        if alive:
            self.book.apply_node_running(key, item.running, fx)
            if not last_running <= item.running:
                # A task that the last heartbeat listed ended, so a node that rejected a start
                # as busy may have a free task user again.
                self.book.engine.clear_busy(key)
        if self.fleet.get(key) is None:
            return
        if item.drain_requested:
            reason = "agent requested a drain in its heartbeat"
            self._drain(self.fleet.agent_drain(key, reason, item.agent_time), fx)
        elif item.drain_requested is False:
            self._drain(self.fleet.agent_withdraw(key, item.agent_time), fx)

    def _drain(self, change: DrainChange | None, fx: Effects) -> None:
        """Apply a drain that started or ended to the engine, and keep it for the commit."""
        if change is None:
            return
        key, cause = change.node_key, change.cause
        if change.draining:
            logger.warning(
                "node %s drains at the %s's request: %s", key, cause.source, cause.reason
            )
        else:
            logger.info(
                "node %s stops draining at the %s's request: %s", key, cause.source, cause.reason
            )
        self.book.engine.set_draining(change.node_key, change.draining, fx.now)
        self._drains[change.node_key] = change

    def _set_accelerator_health(self, change: AcceleratorHealth, fx: Effects) -> None:
        if self.book.engine.set_accelerator_health(change, fx.now):
            fx.accelerators.append(change)

    def _on_node_change(self, change: NodeChange, fx: Effects) -> None:
        node = change.node
        now = fx.now
        engine = self.book.engine
        if change.previous == "down" and node.status != "down":
            fx.nodes_down[node.key] = None
        if change.previous is None or not engine.has_node(node.key):
            engine.add_node(node)
            if node.draining:
                engine.set_draining(node.key, True, now)
        elif node.status == "unknown":
            logger.warning("node %s is unknown: %s", node.key, change.reason)
            engine.node_unknown(node.key, now)
        elif change.previous in ("unknown", "down"):
            logger.info("node %s is back: %s", node.key, change.reason)
            engine.node_back(node.key, now)
        # An agent restarted with another pool of task users reports another limit.
        engine.set_max_jobs(node.key, node.max_jobs)

    def _retry_budgets(self, now: float) -> None:
        for (project, payer), since in list(self._no_budget.items()):
            if now - since >= self.settings.budget_retry_s:
                del self._no_budget[project, payer]
                self.book.engine.lift_budget_block(project, payer)

    async def _commit(self, fx: Effects, inventories: list[InventoryReceived]) -> None:
        deletions, self._deletions = self._deletions, []
        await self.nodes.delete(deletions)
        if inventories:
            await self.nodes.upsert_inventories(
                [(i.node.provider, i.node.region, i.node.node, i.payload) for i in inventories]
            )
        if fx.accelerators:
            await self.nodes.record_accelerator_health(fx.accelerators)
        # Written before the commit that deletes the orphans these marks confirmed. A crash
        # between the two writes leaves the node stored down, and a new leader confirms them.
        await self.nodes.set_down(fx.nodes_down)
        jobs = [job for job, _ in fx.changed.values()]
        causes = [cause for _, cause in fx.changed.values()]
        # Every record is new unless a reloaded job repeats one; repeats stay unpublished.
        published, published_events = self._published, self._published_events
        self._published, self._published_events = [], []
        orphans, confirmed = self.book.take_orphan_writes()
        drains = list(self._drains.values())
        self._drains.clear()
        fx.commands[:] = await self.store.commit_turn(
            jobs,
            causes,
            fx.commands,
            fx.events,
            self.epoch,
            published,
            published_events,
            orphans,
            confirmed,
            drains,
        )

    async def _send(self, commands: list[DispatchRecord], events: list[OutboxEvent]) -> None:
        if commands or events:
            result = await self.publisher.publish_all(commands, events)
            # A rejected command is marked done so it is not republished, and the next turn fails
            # its attempt. The marks are written in the next turn's transaction. A crash before
            # that republishes them, which JetStream and the agents deduplicate.
            self._published.extend(result.command_keys)
            self._published.extend(record.key for record, _ in result.rejected_commands)
            self._published_events.extend(result.event_ids)
            self._unpublishable.extend(result.rejected_commands)
            await self._reject_events(result)

    async def _reject_events(self, result: PublishResult) -> None:
        """Count the job events JetStream rejected for good, and move those at the limit.

        A moved event leaves the outbox for ``scheduler.dead_events``, so it is not retried
        forever, and is logged at ERROR and counted.
        """
        # An event stored earlier in this turn, whose mark is not yet written, was published.
        stored = set(self._published_events)
        rejected = [
            (event.msg_id, reason)
            for event, reason in result.rejected_events
            if event.msg_id not in stored
        ]
        limit = self.settings.max_event_rejections
        for dead in await self.store.reject_events(rejected, limit, self.epoch):
            logger.error(
                "job event %s on %s moved to scheduler.dead_events after %d rejections: %s",
                dead.event_id,
                dead.subject,
                dead.rejections,
                dead.reason,
            )
            _dead_events.add(1)

    async def _republish(self, older_than_s: float) -> None:
        records = await self.store.unacked_dispatches(older_than_s)
        if records:
            logger.info("publishing %d recorded but unacknowledged commands", len(records))
        events = await self.store.unacked_events(older_than_s)
        if events:
            logger.info("publishing %d recorded but unacknowledged job events", len(events))
        await self._send(records, events)

    def _log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < self.settings.stats_interval_s:
            return
        states: dict[str, int] = {}
        for job in self.book.jobs.values():
            states[job.state] = states.get(job.state, 0) + 1
        logger.info(
            "loop: %d turns, %d passes taking %.2f s in %.0f s; inbox %d; holds in flight %d;"
            " open jobs %s",
            self._turns,
            self.passes,
            self._pass_seconds,
            now - self._last_stats,
            self.inbox.qsize(),
            self._holds_in_flight,
            states,
        )
        self._turns = self.passes = 0
        self._pass_seconds = 0.0
        self._last_stats = now

    async def _holds(self, admitted: list[tuple[Job, str]]) -> None:
        """Place the holds of ``admitted`` in one call and queue each outcome as an input."""
        outcomes: dict[str, HoldOutcome] = {}
        priced: list[tuple[Job, Decimal]] = []
        for job, model in admitted:
            try:
                priced.append((job, self.rates.hold_amount(job, model)))
            except KeyError:
                message = f"no rate for accelerator model {model!r}"
                outcomes[job.job_id] = HoldOutcome("rejected", message=message)
        if priced:
            async with self._hold_calls:
                self._holds_in_flight += len(priced)
                try:
                    models = {job.job_id: model for job, model in admitted}
                    placed = await self.admission.place_holds(priced, models)
                finally:
                    self._holds_in_flight -= len(priced)
            for (job, _), outcome in zip(priced, placed, strict=True):
                outcomes[job.job_id] = outcome
        # Grants read again in this batch, each after every hold of the batch was rejected.
        reread: dict[str, GrantRecord | None] = {}
        for job, _ in admitted:
            outcome = outcomes[job.job_id]
            if outcome.beyond_credited:
                outcome = await self._settle_beyond_credited(job, outcome, reread)
            await self.inbox.put(HoldDone(job.job_id, job.attempt, outcome))

    async def _settle_beyond_credited(
        self, job: Job, outcome: HoldOutcome, reread: dict[str, GrantRecord | None]
    ) -> HoldOutcome:
        """Fail a job whose hold exceeds all its pot can ever be credited.

        A sub-allocation never grows. A grant grows only by its one supplement, of at most the
        limit that the grant service returns, and by any amount when an older grant service
        returns no limit. The project cache reports the supplement and the limit up to its
        time to live late, so a job accepted just before either changed fails at a later retry
        of its hold. Before such a job fails, its grant is read again past the cache, once per
        grant in ``reread``. A supplement that lands after the grant service rejected the hold
        makes the rejection's credited total stale, while the cache may already show the
        supplement.
        """
        spec = job.spec
        catalog = self.book.engine.engine.catalog
        if not spec.grant_id:
            return outcome
        if spec.sub_allocation_id:
            return settle_final_hold(job, outcome, self.rates, catalog)
        if self.projects is None:
            return outcome
        try:
            grant = await self.projects.grant(spec.grant_id)
        except Unavailable as exc:
            logger.warning(
                "job %s: could not look up grant %s after its hold failed: %s",
                job.job_id,
                spec.grant_id,
                exc,
            )
            return outcome
        if grant is None or not _growth_bounded(grant):
            return outcome
        settled = settle_final_hold(job, outcome, self.rates, catalog, _growth_limit(grant))
        if settled.status != "rejected":
            return settled
        if spec.grant_id not in reread:
            reread[spec.grant_id] = await self._reload_grant(self.projects, job, spec.grant_id)
        fresh = reread[spec.grant_id]
        if fresh is None or fresh.credited is None or outcome.credited is None:
            # The grant could not be read again, so the job waits and its hold is tried again.
            return outcome
        if not _growth_bounded(fresh):
            return outcome
        credited = max(fresh.credited, outcome.credited)
        return settle_final_hold(
            job, replace(outcome, credited=credited), self.rates, catalog, _growth_limit(fresh)
        )

    @staticmethod
    async def _reload_grant(
        projects: ProjectDirectory, job: Job, grant_id: str
    ) -> GrantRecord | None:
        try:
            return await projects.reload_grant(grant_id)
        except Unavailable as exc:
            logger.warning(
                "job %s: could not read grant %s again before failing the job: %s",
                job.job_id,
                grant_id,
                exc,
            )
            return None


def _growth_bounded(grant: GrantRecord) -> bool:
    """Return whether ``grant`` can grow by a known amount, nothing once supplemented."""
    return grant.supplemented or grant.supplement_limit is not None


def _growth_limit(grant: GrantRecord) -> Decimal | None:
    """Return the maximum PF-days ``grant`` may still gain, or None when it can no longer grow."""
    return None if grant.supplemented else grant.supplement_limit
