"""The one place the service calls the placement engine, converting to and from its types.

The engine (``scheduler.engine``) is pure: it takes nodes, jobs and events and returns
decisions. This adapter keeps the service's dataclasses (:mod:`.model`, :mod:`.fleet`) on one
side and the engine's (:mod:`scheduler.engine.spec`, ``.events``, ``.decisions``) on the
other. Engine node ids are ``provider.region.node`` keys, which are unique across the fleet.

The provider registry (:class:`~.providers.ProviderDirectory`) shapes a job's engine input:
``jurisdiction:<code>`` entries become the regions of that jurisdiction, and the job's
cross-provider switch holds only where the providers allow it. The paying grant's constraints,
copied into the spec at submit, narrow the allowed regions and models. Pending jobs whose input
depends on the registry or on the regions with nodes are entered again when it changes or a node
of a new provider or region appears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Final

from scheduler.engine import decisions as d
from scheduler.engine import events as ev
from scheduler.engine import spec as es
from scheduler.engine.engine import Engine
from scheduler.engine.reasons import budget_message
from scheduler.engine.records import job_of

from .fleet import NodeView
from .grant_limits import depends_on_known_regions, narrow_models, narrow_regions
from .model import Job, TaskPlacement
from .pledges import PledgeRecord, RecallRecord
from .providers import ProviderDirectory
from .validation import JURISDICTION_PREFIX

logger = logging.getLogger(__name__)

BUSY_RETRY_S: Final = 5.0
"""Seconds a node that rejected a start as busy gets no new jobs, unless one of its tasks ends
first. It bounds how often a node whose job count the fleet has wrong rejects a start."""

_PRIORITY = {
    "interactive": es.PriorityClass.INTERACTIVE,
    "standard": es.PriorityClass.STANDARD,
    "preemptible": es.PriorityClass.PREEMPTIBLE,
}
_OUTCOME = {
    "completed": ev.JobOutcome.COMPLETED,
    "failed": ev.JobOutcome.FAILED,
    "timed_out": ev.JobOutcome.FAILED,
    "cancelled": ev.JobOutcome.CANCELLED,
    "preempted": ev.JobOutcome.PREEMPTED,
}


@dataclass(frozen=True, slots=True)
class AcceleratorHealth:
    """A change of one accelerator between failed and healthy, from its agent."""

    node_key: str
    accelerator_id: str
    failed: bool
    """True: a fatal event failed it. False: its conditions cleared and it recovered."""
    event_id: str
    """The agent's health event, or ``inventory:<node>/<boot id>/<accelerator>`` for a failure
    that only an inventory reported (a condition the agent loaded from its state file)."""
    reason: str = ""


@dataclass(slots=True)
class PassResult:
    """One scheduling pass in the service's terms."""

    places: list[tuple[str, tuple[TaskPlacement, ...]]] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    """Accelerator model of each placed job, which prices its hold."""
    requeues: list[tuple[str, str]] = field(default_factory=list)
    """Job id and message of running jobs that lost tasks and go back to the queue."""
    failed_hardware: list[tuple[str, str, AcceleratorHealth]] = field(default_factory=list)
    """Job id, message and accelerator failure of running jobs that go back to the queue
    because an accelerator under them failed."""
    preempts: list[tuple[str, int, str, str, str, float]] = field(default_factory=list)
    """Job id, grace in seconds, message, trigger (``recall:<id>`` for a recall), preempting
    job id (empty unless a priority preemption) and deadline of jobs to stop."""
    claims: list[tuple[str, str]] = field(default_factory=list)
    """Job id of a stopping job and id of the pending job that now waits for it."""
    waiting: list[tuple[str, str, str]] = field(default_factory=list)
    """Job id, pending reason and message of jobs that did not start."""
    replacements: list[tuple[str, TaskPlacement, str]] = field(default_factory=list)
    """Job id, new placement of one task and the key of the node it was lost on, for running
    gangs whose lost task starts again on new accelerators while the other tasks keep running.
    The lost node's accelerators stay fenced until the old task is confirmed stopped."""


def job_to_engine(
    job: Job,
    providers: ProviderDirectory | None = None,
    fleet_providers: frozenset[str] = frozenset(),
    fleet_regions: frozenset[str] = frozenset(),
) -> es.JobSpec:
    """Build the engine's spec of ``job``.

    With ``providers``, jurisdiction entries resolve to regions and the cross-provider switch
    needs every provider the job may use to allow it. ``fleet_providers`` are the providers
    with nodes, which a job without allowed regions may also use. Without ``providers`` the
    allowed regions and the switch pass through as the job states them. The grant's
    constraints then narrow the regions and models. ``fleet_regions`` are the
    ``<provider>/<region>`` keys with nodes, which with the registered regions are what a grant
    that names only providers allows a job without allowed regions.
    """
    spec = job.spec
    topology = es.Topology(spec.topology) if spec.topology else es.Topology.SAME_PROVIDER
    regions = frozenset(spec.allowed_regions)
    if providers is not None and _names_jurisdiction(spec.allowed_regions):
        regions = providers.resolve_regions(spec.allowed_regions)
    known: frozenset[str] = frozenset()
    if depends_on_known_regions(spec):
        known = _registered_regions(providers) | fleet_regions
    regions = narrow_regions(spec, regions, known)
    cross_provider = spec.allow_cross_provider
    denied_by: frozenset[str] = frozenset()
    if providers is not None and cross_provider:
        denied_by = _providers_denying_spanning(regions, providers, fleet_providers)
        cross_provider = not denied_by
    return es.JobSpec(
        job_id=job.job_id,
        project=spec.project_id,
        institution=job.institution or spec.project_id,
        submit_time=job.submitted_at,
        priority=_PRIORITY[spec.priority],
        task_count=spec.task_count,
        millis_per_task=spec.accelerator_millis_per_task,
        topology=topology,
        allow_cross_provider=cross_provider,
        cross_provider_denied_by=denied_by,
        models=narrow_models(spec),
        constraint=es.ModelConstraint(spec.vendor, spec.min_memory_gib, spec.software_stack),
        regions=regions,
        wall_time_s=float(spec.wall_time_s),
        checkpointable=spec.checkpointable,
        avoid_nodes=frozenset(job.avoid_nodes),
        payer=budget_payer(job),
    )


def budget_payer(job: Job) -> str:
    """Return the engine's key for what pays ``job``'s hold: ``<grant>``,
    ``<grant>/<sub-allocation>``, or empty when the job names no grant.

    A job that named no grant keeps the empty key after the grant service picked a grant for
    its hold, because its next attempt names no grant either.
    """
    spec = job.spec
    if job.grant_picked:
        return ""
    if spec.sub_allocation_id:
        return f"{spec.grant_id}/{spec.sub_allocation_id}"
    return spec.grant_id


def depends_on_providers(job: Job) -> bool:
    """Return whether the provider registry or the regions with nodes shape the job's input."""
    spec = job.spec
    return (
        spec.allow_cross_provider
        or _names_jurisdiction(spec.allowed_regions)
        or depends_on_known_regions(spec)
    )


def _registered_regions(providers: ProviderDirectory | None) -> frozenset[str]:
    if providers is None:
        return frozenset()
    keys: set[str] = set()
    for provider_id in providers.provider_ids():
        record = providers.get(provider_id)
        if record is not None:
            keys.update(f"{provider_id}/{region.region_id}" for region in record.regions)
    return frozenset(keys)


def _names_jurisdiction(allowed: tuple[str, ...]) -> bool:
    return any(entry.startswith(JURISDICTION_PREFIX) for entry in allowed)


def _providers_denying_spanning(
    regions: frozenset[str], providers: ProviderDirectory, fleet_providers: frozenset[str]
) -> frozenset[str]:
    """Return the providers the job may use that do not allow cross-provider gangs.

    A provider with nodes that is not registered allows none.
    """
    # NOTE: the engine has one cross-provider switch per job, not one per provider. So a gang
    # may span providers only when every provider the job may use allows it, and a job that
    # may also use a provider that does not stays within one provider.
    usable: frozenset[str]
    if regions:
        usable = frozenset(key.split("/", 1)[0] for key in regions if "/" in key)
    else:
        usable = providers.provider_ids() | fleet_providers
    return frozenset(p for p in usable if not providers.allows_cross_provider(p))


def node_to_engine(node: NodeView) -> es.NodeSpec:
    domains = {acc.interconnect_domain for acc in node.accelerators}
    domain = domains.pop() if len(domains) == 1 else ""
    return es.NodeSpec(
        node_id=node.key,
        provider=node.provider,
        region=node.region,
        model=node.model,
        # Failed accelerators are listed too: the adapter marks them failed, so that a cleared
        # health event can bring them back.
        accelerator_ids=tuple(acc.accelerator_id for acc in node.accelerators),
        interconnect_domain=f"{node.key}/{domain}" if domain else "",
        display_name=node.name,
        max_jobs=node.max_jobs,
    )


def preemption_message(decision: d.Preempt) -> str:
    """Return how a preempted job's stop reason names ``decision``: ``<cause> <cause id>``."""
    return f"{decision.cause} {decision.cause_id}"


def preemption_of(message: str) -> tuple[d.Cause, str] | None:
    """Return the cause and cause id in a message of :func:`preemption_message`, or None when
    ``message`` is not one."""
    cause, _, cause_id = message.partition(" ")
    if not cause_id:
        return None
    try:
        return d.Cause(cause), cause_id
    except ValueError:
        return None


def preempt_trigger(decision: d.Preempt) -> str:
    """Return the trigger recorded for a preemption, ``recall:<id>`` for a recall."""
    if decision.cause is d.Cause.PROVIDER_RECALL:
        return f"recall:{decision.cause_id}"
    return "engine:preempt"


def placement_from_engine(task: d.TaskPlacement) -> TaskPlacement:
    provider, region, node = task.node_id.split(".", 2)
    return TaskPlacement(
        task_index=task.task_index,
        provider=provider,
        region=region,
        node=node,
        accelerators=task.accelerator_ids,
        millis=task.millis,
    )


class EngineAdapter:
    """Feeds one :class:`scheduler.engine.engine.Engine` and converts its pass results."""

    def __init__(self, engine: Engine, providers: ProviderDirectory | None = None) -> None:
        self.engine = engine
        self.providers = providers or ProviderDirectory()
        self._known_nodes: set[str] = set()
        self._busy_since: dict[str, float] = {}
        """Nodes marked busy (:meth:`mark_busy`) -> when."""
        self._fleet_providers: frozenset[str] = frozenset()
        self._fleet_regions: frozenset[str] = frozenset()
        self._known_regions: frozenset[str] = self.providers.region_keys
        self._dependent: dict[str, Job] = {}
        """Jobs in the engine whose input depends on the registry, by id."""
        self._failed: dict[tuple[str, str], AcceleratorHealth] = {}
        """Failed accelerators by ``(node key, accelerator id)``, also on nodes not yet added."""
        self._failure_events: dict[str, AcceleratorHealth] = {}
        """The same failures by health event id, to resolve the engine's requeues."""

    # Providers.

    def set_providers(self, providers: ProviderDirectory) -> None:
        """Use a changed registry, entering again the pending jobs whose input it changes."""
        self.providers = providers
        self._known_regions = providers.region_keys | self._fleet_regions
        self._reenter_dependent()

    @property
    def known_regions(self) -> frozenset[str]:
        """``provider/region`` keys that a job may name: the registered regions and the regions
        of every node seen this term, including nodes that are down now."""
        return self._known_regions

    def _spec(self, job: Job) -> es.JobSpec:
        if depends_on_providers(job):
            self._dependent[job.job_id] = job
        return job_to_engine(job, self.providers, self._fleet_providers, self._fleet_regions)

    def _reenter_dependent(self) -> None:
        for job_id, job in list(self._dependent.items()):
            record = self.engine.jobs.get(job_id)
            if record is None:
                del self._dependent[job_id]
                continue
            if record.running:
                continue
            spec = job_to_engine(job, self.providers, self._fleet_providers, self._fleet_regions)
            if spec != record.spec:
                logger.info("job %s entered again: the provider registry changed its input", job_id)
                self.engine.remove(job_id)
                self.engine.submit(spec)

    # Fleet.

    def add_node(self, node: NodeView) -> bool:
        """Add a node the first time it is seen; return False if the engine rejects it."""
        if node.key in self._known_nodes:
            return True
        try:
            self.engine.add_node(node_to_engine(node))
        except es.InvalidInputError as exc:
            logger.warning("node %s left out of scheduling: %s", node.key, exc)
            return False
        self._known_nodes.add(node.key)
        for (key, _), failure in sorted(self._failed.items()):
            if key == node.key:
                self._apply_failure(failure)
        region_key = f"{node.provider}/{node.region}"
        if node.provider not in self._fleet_providers or region_key not in self._fleet_regions:
            self._fleet_providers = self._fleet_providers | {node.provider}
            self._fleet_regions = self._fleet_regions | {region_key}
            self._known_regions = self._known_regions | {region_key}
            if self._dependent:
                self._reenter_dependent()
        return True

    def has_node(self, key: str) -> bool:
        return key in self._known_nodes

    def jobs_on_node(self, key: str) -> list[str]:
        """Return the sorted ids of the jobs with accelerators allocated on node ``key``,
        copies whose stop is not confirmed included."""
        node = self.engine.fleet.by_id.get(key) if key in self._known_nodes else None
        if node is None:
            return []
        return sorted({job_of(owner) for owner in node.jobs})

    def remove_node(self, key: str) -> None:
        """Forget node ``key`` and its failed accelerators, e.g. when an operator deletes it.

        Raises :class:`~scheduler.engine.spec.InvalidInputError`, changing nothing, while
        :meth:`jobs_on_node` returns a job. A node with this key added later is a new node.
        """
        if key in self._known_nodes:
            self.engine.remove_node(key)
            self._known_nodes.discard(key)
        self._busy_since.pop(key, None)
        for failure_key in [k for k in self._failed if k[0] == key]:
            failure = self._failed.pop(failure_key)
            self._failure_events.pop(failure.event_id, None)

    def node_model(self, key: str) -> str:
        """Return the accelerator model of node ``key``, or an empty string if it is unknown."""
        node = self.engine.fleet.by_id.get(key) if key in self._known_nodes else None
        return node.spec.model if node is not None else ""

    # Accelerator health.

    def set_accelerator_health(self, change: AcceleratorHealth, now: float) -> bool:
        """Fail or recover one accelerator; return whether that changed anything to persist.

        A failure stays until a recovery for the same accelerator: inventories and heartbeats
        never clear it. A failure on a node not yet known applies once the node is added.
        """
        key = (change.node_key, change.accelerator_id)
        if change.failed:
            if key in self._failed:
                return False
            if change.node_key in self._known_nodes and not self._apply_failure(change, now):
                return False
            self._failed[key] = change
            self._failure_events[change.event_id] = change
            return True
        failure = self._failed.pop(key, None)
        if failure is None:
            return False
        self._failure_events.pop(failure.event_id, None)
        if change.node_key in self._known_nodes:
            self.engine.apply(ev.AcceleratorRecovered(change.node_key, change.accelerator_id), now)
        logger.info(
            "accelerator %s on node %s recovered (health event %s)",
            change.accelerator_id,
            change.node_key,
            change.event_id,
        )
        return True

    def inventory_failures(self, node: NodeView) -> list[AcceleratorHealth]:
        """Return a failure for each accelerator that the inventory reports failed and that is
        not failed here yet."""
        return [
            AcceleratorHealth(
                node.key,
                acc.accelerator_id,
                True,
                f"inventory:{node.key}/{node.boot_id}/{acc.accelerator_id}",
                "reported failed in the node's inventory",
            )
            for acc in node.accelerators
            if not acc.healthy and (node.key, acc.accelerator_id) not in self._failed
        ]

    def failed_accelerators(self) -> list[AcceleratorHealth]:
        return [self._failed[key] for key in sorted(self._failed)]

    def _apply_failure(self, failure: AcceleratorHealth, now: float | None = None) -> bool:
        event = ev.AcceleratorFailed(
            failure.node_key, failure.accelerator_id, failure.event_id, failure.reason
        )
        try:
            self.engine.apply(event, now)
        except es.InvalidInputError as exc:
            logger.warning(
                "ignoring health event %s of accelerator %s on node %s: %s",
                failure.event_id,
                failure.accelerator_id,
                failure.node_key,
                exc,
            )
            return False
        return True

    def node_unknown(self, key: str, now: float) -> None:
        if key in self._known_nodes:
            self.engine.apply(ev.NodeMissedHeartbeats(key), now)

    def node_down(self, key: str, now: float) -> None:
        if key in self._known_nodes:
            self.engine.apply(ev.NodeDown(key), now)

    def set_max_jobs(self, key: str, max_jobs: int) -> None:
        """Apply the job limit a node's latest inventory reports."""
        if key in self._known_nodes:
            self.engine.set_max_jobs(key, max_jobs)

    def mark_busy(self, key: str, now: float) -> None:
        """Keep new jobs off a node that rejected a start as busy, for :data:`BUSY_RETRY_S`
        or until :meth:`clear_busy`."""
        if key in self._known_nodes:
            self._busy_since[key] = now
            self.engine.set_busy(key, True)

    def clear_busy(self, key: str) -> None:
        """Offer jobs to a node marked busy again, because one of its tasks ended."""
        if self._busy_since.pop(key, None) is not None:
            self.engine.set_busy(key, False)

    def expire_busy(self, now: float) -> None:
        """Offer jobs again to the nodes marked busy :data:`BUSY_RETRY_S` ago or earlier."""
        for key, since in list(self._busy_since.items()):
            if now - since >= BUSY_RETRY_S:
                self.clear_busy(key)

    def node_back(self, key: str, now: float) -> None:
        if key in self._known_nodes:
            self.engine.apply(ev.NodeHeartbeat(key), now)

    def set_draining(self, key: str, draining: bool, now: float) -> None:
        if key not in self._known_nodes:
            return
        if draining:
            self.engine.apply(ev.NodeDrain(key), now)
            return
        self.engine.apply(ev.NodeUndrain(key), now)

    def tasks_stopped(self, key: str, job_id: str, keep_running: bool = False) -> None:
        """Free what the engine keeps fenced for ``job_id`` on node ``key``. With
        ``keep_running``, the share of the job's running attempt stays fenced."""
        if key in self._known_nodes:
            self.engine.release_fences(key, job_id, keep_running)

    def fence(
        self, key: str, job_id: str, task_id: str, accelerators: tuple[str, ...], millis: int
    ) -> bool:
        """Keep a stopping task copy's accelerators on node ``key`` from other jobs, after a
        restart, until :meth:`tasks_stopped` for its job there. False when nothing was kept:
        the node or an accelerator is gone, or a running job uses the share now."""
        if key not in self._known_nodes:
            return False
        # The owner names the copy, so it never matches an attempt owner (``job_id#n``) that
        # the restarted engine numbers afresh.
        return self.engine.adopt_fence(key, f"{job_id}#{task_id}", accelerators, millis)

    def set_pledge(self, pledge: PledgeRecord) -> None:
        """Add or replace a pledge; the engine caps its pool by the pledged capacity."""
        self.engine.apply(
            ev.PledgeAdded(
                es.Pledge(
                    pledge.pledge_id,
                    pledge.provider,
                    pledge.region,
                    pledge.model,
                    pledge.protected,
                    pledge.recallable,
                    pledge.start,
                    pledge.end,
                )
            )
        )

    def registered_accelerators(self, pledge: PledgeRecord) -> int:
        """Return the accelerators of ``pledge``'s model registered in its region."""
        pool = self.engine.fleet.pools.get((pledge.provider, pledge.region, pledge.model))
        return pool.total_millis // es.MILLIS_PER_ACCELERATOR if pool is not None else 0

    def healthy_accelerators(self, pledge: PledgeRecord) -> int:
        """Return the accelerators of ``pledge``'s model in its region that are on up nodes
        and not failed."""
        pool = self.engine.fleet.pools.get((pledge.provider, pledge.region, pledge.model))
        return pool.up_accelerators if pool is not None else 0

    def recall_frees(self, pledge: PledgeRecord, recall: RecallRecord) -> int:
        """Return the accelerators a new ``recall`` from ``pledge`` takes from what the region
        may use, with the fleet as it is now.

        A pledge stored a moment ago reaches the engine with the loop's next turn, so one the
        engine does not know yet is added now, or the recall would seem to free nothing. A
        changed pledge is left to the loop, which applies the changes in the order stored.
        """
        pool = self.engine.fleet.pools.get((pledge.provider, pledge.region, pledge.model))
        if pool is None:
            return 0
        if pledge.pledge_id not in self.engine.capacity.pledges:
            self.set_pledge(pledge)
        freed = self.engine.capacity.freed_millis(
            pool, recall.effective_at, recall.end, recall.count
        )
        return freed // es.MILLIS_PER_ACCELERATOR

    def add_recall(self, recall: RecallRecord, pledge: PledgeRecord) -> None:
        self.engine.apply(
            ev.RecallAnnounced(
                recall.recall_id,
                pledge.provider,
                pledge.region,
                pledge.model,
                recall.count,
                recall.effective_at,
                recall.end,
                pledge.pledge_id,
            )
        )

    # Jobs.

    def add_job(self, job: Job) -> None:
        self.engine.submit(self._spec(job))

    def add_running(self, job: Job, now: float) -> bool:
        """Re-enter a job that runs on its persisted placement, after a restart.

        Returns False, with the job queued as pending instead, when the placement no longer
        fits the nodes' inventories (an accelerator gone, or shares that overlap).
        """
        spec = self._spec(job)
        tasks = [
            d.TaskPlacement(t.task_index, t.node_key, t.accelerators, t.millis)
            for t in job.placement
        ]
        try:
            self.engine.adopt(spec, tasks, now)
        except (es.InvalidInputError, KeyError) as exc:
            logger.error("job %s cannot keep its placement after the restart: %s", job.job_id, exc)
            self.engine.submit(spec)
            return False
        return True

    def mark_stopping(self, job_id: str) -> None:
        """Tell the engine that the tasks of a running job are being stopped, so that a node
        it loses meanwhile frees none of the accelerators its other tasks still hold."""
        self.engine.mark_stopping(job_id)

    def mark_preempted(
        self, job_id: str, preemptor_id: str | None, message: str, deadline: float | None
    ) -> None:
        """Tell the engine that a reloaded running job stops for a preemption, so that a job
        that preempted it waits for it again.

        ``preemptor_id`` is the stored id of the job whose priority preemption stops it, and
        ``message`` the stop reason (from :func:`preemption_message`) that names a recall or
        an ended pledge. Without a stored id, ``message`` may name the preempting job too.
        Rows stored before the id was kept hold None. A leader of that earlier version, still
        running while a new one migrates the schema, stores the column default, empty.
        A message that names no preemption changes nothing. ``deadline`` is the stored stop
        deadline, or None for a row stored before deadlines were kept.
        """
        if preemptor_id:
            self.engine.mark_preempted(job_id, d.Cause.PRIORITY, preemptor_id, deadline)
            return
        found = preemption_of(message)
        if found is not None:
            self.engine.mark_preempted(job_id, *found, deadline)

    def running_in_engine(self, job_id: str) -> bool:
        record = self.engine.jobs.get(job_id)
        return record is not None and record.running

    def remove(self, job_id: str) -> None:
        """Forget a job, releasing what it holds (held accelerators of unknown nodes stay)."""
        self._dependent.pop(job_id, None)
        if job_id in self.engine.jobs:
            self.engine.remove(job_id)

    def requeue(
        self,
        job_id: str,
        now: float,
        stopping: tuple[tuple[int, str], ...] = (),
        avoid_nodes: tuple[str, ...] = (),
        *,
        started: bool = True,
    ) -> None:
        """Send a placed job back to the queue, releasing its accelerators.

        ``stopping`` lists the task index and node key of each task that got a stop command
        its node has not confirmed. Their accelerators stay fenced until :meth:`tasks_stopped`
        for the job on that node. The job's later attempts go to ``avoid_nodes`` only when no other
        node has room. ``started`` is False for an attempt that got no start commands, whose
        later pending reasons then do not say the job was requeued.
        """
        if self.running_in_engine(job_id):
            self.engine.apply(ev.JobRequeued(job_id, stopping, avoid_nodes, started), now)
        elif job_id not in self.engine.jobs:
            logger.warning("requeue of job %s that the engine does not know", job_id)

    def end(self, job_id: str, outcome: str, now: float) -> None:
        """Record a finished job: ``completed``, ``failed``, ``timed_out`` or ``cancelled``."""
        if self.running_in_engine(job_id):
            self.engine.apply(ev.JobEnded(job_id, _OUTCOME[outcome]), now)
            if job_id not in self.engine.jobs:
                self._dependent.pop(job_id, None)
        else:
            self.remove(job_id)

    def lift_budget_block(self, project: str, payer: str) -> None:
        """Let the jobs of ``project`` paid by ``payer`` ask for holds again."""
        self.engine.apply(ev.BudgetChanged(project, True, payer=payer))

    def budget_key(self, job_id: str) -> tuple[str, str] | None:
        """Return the project and payer whose budget block holds ``job_id`` back, or None."""
        record = self.engine.jobs.get(job_id)
        if record is None:
            return None
        return record.spec.project, record.spec.payer

    def block_budget(
        self, project: str, job_id: str, message: str = "", retry_at: float | None = None
    ) -> str:
        """Hold back the jobs as large as ``job_id`` that its grant or sub-allocation pays.

        The grant service rejected the hold of ``job_id``. Smaller jobs on the same payer are
        still tried, so one job that its grant cannot pay does not stop the others. Jobs paid
        by another grant or sub-allocation of the project are not held back. Without the job's
        record its payer is unknown, and no job is held back. ``message`` says why the hold
        was rejected, and the jobs held back wait with it until ``retry_at``. Returns the
        pending reason of ``job_id`` itself.

        NOTE: jobs are compared by accelerator-seconds, not by price, so a smaller job on a
        dearer model may still be tried, and fail, once.
        """
        block = ev.BudgetChanged(project, False, 0.0, job_id, message, retry_at)
        record = self.engine.jobs.get(job_id)
        if record is not None:
            spec = record.spec
            block = replace(block, size=spec.budget_size, payer=spec.payer)
            self.engine.apply(block)
        return budget_message(block, job_id)

    # Passes.

    def schedule(self, now: float) -> PassResult:
        result = self.engine.schedule(now)
        out = PassResult()
        for decision in result.decisions:
            if isinstance(decision, d.Place):
                tasks = tuple(placement_from_engine(t) for t in decision.tasks)
                out.places.append((decision.job_id, tasks))
                first = decision.tasks[0].node_id
                out.models[decision.job_id] = self.engine.fleet.node(first).spec.model
            elif isinstance(decision, d.Requeue):
                failure = self._failure_events.get(decision.cause_id)
                if decision.cause is d.Cause.ACCELERATOR_FAILURE and failure is not None:
                    out.failed_hardware.append((decision.job_id, decision.message, failure))
                else:
                    out.requeues.append((decision.job_id, decision.message))
            elif isinstance(decision, d.Preempt):
                grace = max(0, int(decision.deadline - now))
                message = preemption_message(decision)
                trigger = preempt_trigger(decision)
                preemptor = decision.cause_id if decision.cause is d.Cause.PRIORITY else ""
                out.preempts.append(
                    (decision.job_id, grace, message, trigger, preemptor, decision.deadline)
                )
            elif isinstance(decision, d.Claim):
                out.claims.append((decision.job_id, decision.preemptor_id))
            elif isinstance(decision, d.ReplaceTask):
                task = placement_from_engine(decision.task)
                out.replacements.append((decision.job_id, task, decision.lost_node_id))
        for waiting in result.waiting:
            out.waiting.append((waiting.job_id, str(waiting.reason), waiting.message))
        return out
