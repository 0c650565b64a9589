"""One node's agent logic: readings, health, usage accounting, commands. No network here.

:class:`NodeAgent` turns backend readings into health events, task state changes into task
events and runner intervals into usage samples, and hands every payload to the
:class:`~agents.outbox.Outbox`. The process around it (``agents.process``) owns the NATS
connection and the timers; the simulated fleet runs thousands of these in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from acsp import subjects
from acsp.rendezvous import DEFAULT_PORT_RANGE
from agents import wire
from agents.backends.base import Backend, BackendError
from agents.checkpoints import CheckpointFiles, PlayedCheckpoints
from agents.health import HealthSettings, HealthTracker
from agents.model import (
    WHOLE_MILLI,
    AcceleratorHealth,
    AcceleratorReading,
    DeviceEvent,
    HealthEvent,
    HealthState,
    NodeInventory,
    TaskEvent,
    TaskSpec,
    TaskState,
    UsageSample,
    task_index_of,
)
from agents.outbox import Outbox
from agents.rendezvous import HostFiles, Placement, task_environment
from agents.runner import TaskInterval, TaskRunner
from agents.state import StateStore, TaskRecord
from agents.task_cgroups import TaskCgroups
from agents.task_logs import TASK_LOG_MAX_BYTES
from agents.task_process import TaskLauncher
from agents.task_user import TaskUser
from agents.task_users import TaskUserPool

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(slots=True)
class _Accumulator:
    """Sums of one accelerator's readings since the last usage report."""

    utilization_sum: float = 0.0
    utilization_count: int = 0
    memory_sum: int = 0
    memory_count: int = 0

    def add(self, reading: AcceleratorReading) -> None:
        if reading.utilization_percent is not None:
            self.utilization_sum += reading.utilization_percent
            self.utilization_count += 1
        if reading.memory_used_bytes is not None:
            self.memory_sum += reading.memory_used_bytes
            self.memory_count += 1

    def utilization(self) -> float | None:
        if not self.utilization_count:
            return None
        return self.utilization_sum / self.utilization_count

    def memory(self) -> int | None:
        return self.memory_sum // self.memory_count if self.memory_count else None


class NodeAgent:
    """The agent of one node, driven by timers and commands from the process around it."""

    def __init__(
        self,
        ref: wire.NodeRef,
        backend: Backend,
        backend_name: str,
        state: StateStore,
        work_dir: Path,
        outbox: Outbox,
        boot_id: str,
        clock: Callable[[], float],
        health_settings: HealthSettings | None = None,
        blocking_backend: bool = False,
        backend_timeout_s: float = 30.0,
        play_speed: float = 1.0,
        agent_version: str = "",
        launcher: TaskLauncher | None = None,
        task_user: TaskUser | None = None,
        task_log_max_bytes: int = TASK_LOG_MAX_BYTES,
        task_users: TaskUserPool | None = None,
        task_cgroups: TaskCgroups | None = None,
        host: str = "",
        rendezvous_ports: tuple[int, int] = DEFAULT_PORT_RANGE,
    ) -> None:
        """``host`` is where other nodes' tasks reach this node's tasks (the node id when
        empty), and ``rendezvous_ports`` the range it reports for rendezvous ports."""
        self.ref = ref
        self.backend = backend
        self._backend_name = backend_name
        self._state = state
        self._work_dir = work_dir
        self._outbox = outbox
        self.boot_id = boot_id
        self._clock = clock
        self._health_settings = health_settings or HealthSettings()
        self._blocking = blocking_backend
        self._backend_timeout_s = backend_timeout_s
        self._play_speed = play_speed
        self._launcher = launcher
        self._task_user = task_user
        self._task_users = task_users
        self._task_cgroups = task_cgroups
        self._task_log_max_bytes = task_log_max_bytes
        self._agent_version = agent_version
        self._event_counter = 0
        self._heartbeat_counter = 0
        self._inventory_counter = 0
        self._accumulators: dict[str, _Accumulator] = {}
        self._failure_events: dict[str, str] = {}
        """Failed accelerator UUID -> id of the health event that failed it."""
        self._last_usage = clock()
        self.fencing_token = state.node(ref.key).fencing_token
        """Highest fencing token acted on. Commands with a lower one are ignored."""
        self.reading_gaps = 0
        self.inventory: NodeInventory | None = None
        self.health: HealthTracker | None = None
        self.runner: TaskRunner | None = None
        self._checkpoints = CheckpointFiles(work_dir / "tasks", per_job=task_users is not None)
        self._played_checkpoints = PlayedCheckpoints()
        self._host = host or ref.node
        self._rendezvous_ports = rendezvous_ports
        self._host_files = HostFiles(work_dir)
        self._hosts_update_lock = asyncio.Lock()
        self._usage_subject = subjects.usage_subject(ref.provider, ref.region, ref.node)
        self._health_subject = subjects.health_subject(ref.provider, ref.region, ref.node)
        self._task_subject = subjects.task_subject(ref.provider, ref.region, ref.node)
        self._inventory_subject = subjects.inventory_subject(ref.provider, ref.region, ref.node)

    # Start -----------------------------------------------------------------------------------

    async def start(self, group: asyncio.TaskGroup) -> None:
        """Discover the accelerators, load persisted health, and find running tasks again.

        The inventory goes out when the process connects to NATS.
        """
        inventory = await self._call(self.backend.discover)
        self.inventory = inventory
        uuids = [info.uuid for info in inventory.accelerators]
        persisted = self._state.node(self.ref.key).health
        self.health = HealthTracker(uuids, self._health_settings, persisted)
        if persisted:
            logger.warning(
                "node %s starts with persistent health conditions: %s", self.ref.key, persisted
            )
        runner = TaskRunner(
            self.ref.key,
            self._state,
            self._work_dir,
            self._on_task_event,
            self._clock,
            uuids,
            self.backend.visible_devices_env,
            allow_played_tasks=self._backend_name == "simulated",
            play_speed=self._play_speed,
            launcher=self._launcher,
            after_spooled=self._outbox.call_when_spooled,
            task_user=self._task_user,
            task_log_max_bytes=self._task_log_max_bytes,
            task_users=self._task_users,
            task_cgroups=self._task_cgroups,
        )
        runner.attach(group)
        self.runner = runner
        self._update_unusable()
        runner.recover()
        # Tasks found again ran while the agent was down, and ended tasks ran until their
        # recorded end: report their usage from where the previous agent stopped. NOTE: a task
        # reported lost gets no usage for that time, because when it ended is unknown.
        reported_until = self._state.node(self.ref.key).usage_reported_until
        if reported_until and (runner.running or runner.has_unreported_ends):
            self._last_usage = min(reported_until, self._clock())

    async def _call(self, function: Callable[[], _T]) -> _T:
        if not self._blocking:
            return function()
        async with asyncio.timeout(self._backend_timeout_s):
            return await asyncio.to_thread(function)

    # Readings and health ---------------------------------------------------------------------

    async def sample(self) -> None:
        """Read the backend once: feed health and the usage accumulators."""
        assert self.health is not None
        events: list[DeviceEvent] = []
        readings: list[AcceleratorReading] = []
        try:
            events = await self._call(self.backend.poll_events)
            readings = await self._call(self.backend.read)
        except (BackendError, TimeoutError) as error:
            self.reading_gaps += 1
            logger.warning("node %s: reading skipped (%s)", self.ref.key, error or "timed out")
        now = self._clock()
        for reading in readings:
            accumulator = self._accumulators.get(reading.uuid)
            if accumulator is None:
                accumulator = self._accumulators[reading.uuid] = _Accumulator()
            accumulator.add(reading)
        changes = self.health.observe(now, readings, events)
        if changes:
            self._publish_health(changes)

    def clear_health(self, uuid: str, cause: str | None = None) -> list[HealthEvent]:
        assert self.health is not None
        changes = self.health.clear(self._clock(), uuid, cause)
        if changes:
            self._publish_health(changes)
        return changes

    def _publish_health(self, changes: list[HealthEvent]) -> None:
        assert self.health is not None and self.runner is not None
        states = {h.uuid: h.state for h in self.health.health()}
        tasks_by_uuid = self._tasks_by_accelerator()
        for change in changes:
            log = logger.info if change.cleared else logger.warning
            log(
                "node %s accelerator %s: %s%s",
                self.ref.key,
                change.uuid or "(node)",
                change.message,
                " (cleared)" if change.cleared else "",
            )
            event_id = self._next_event_id()
            if not change.cleared and states.get(change.uuid) is HealthState.FAILED:
                self._failure_events.setdefault(change.uuid, event_id)
            message = wire.health_event_message(
                event_id,
                self.ref,
                change,
                states.get(change.uuid, HealthState.OK),
                tasks_by_uuid.get(change.uuid, []),
            )
            self._outbox.add(
                self._health_subject, f"health:{event_id}", message.SerializeToString()
            )
        self._state.set_health(self.ref.key, self.health.persistent_conditions())
        self._update_unusable()

    def _update_unusable(self) -> None:
        # The agent does not stop tasks on a failed accelerator itself. The scheduler stops
        # them, with the rest of each job's gang on other accelerators and nodes, after it has
        # taken the accelerator out of placement. A task stopped on its own here could be
        # requeued and placed on the same accelerator before the health event reached the
        # scheduler. Each task that then ends without success ends as FAILED_HARDWARE with
        # the event id recorded here (empty for a condition loaded from the state file).
        assert self.health is not None and self.runner is not None
        failed = {h.uuid for h in self.health.health() if h.state is HealthState.FAILED}
        self._failure_events = {
            uuid: event_id for uuid, event_id in self._failure_events.items() if uuid in failed
        }
        self.runner.set_unusable({uuid: self._failure_events.get(uuid, "") for uuid in failed})

    def accelerator_health(self) -> list[AcceleratorHealth]:
        assert self.health is not None
        return self.health.health()

    # Tasks -----------------------------------------------------------------------------------

    def _on_task_event(self, event: TaskEvent) -> None:
        if event.state.value == "stopping":
            return
        if event.state.terminal:
            # A task stopped with a grace period may write its last checkpoint just before
            # it exits, so the file is read once more and the end event carries the change.
            reference = self._checkpoints.changed(event.task_id)
            self._checkpoints.forget(event.task_id, event.job_id)
            self._host_files.forget(event.task_id)
            self._played_checkpoints.forget(event.task_id)
            if reference is not None:
                event = replace(
                    event, checkpoint_reference=reference, checkpoint_time=self._clock()
                )
        elif event.state is TaskState.RUNNING:
            self._checkpoints.watch(event.task_id, event.job_id)
        self._publish_task_event(event)

    def report_checkpoints(self) -> int:
        """Publish a CHECKPOINTED event for each running task whose reference changed.

        Return the number of events. A task with a process reports what it wrote to its
        checkpoint file, and a played task what :class:`PlayedCheckpoints` makes up for it.
        """
        assert self.runner is not None
        count = 0
        now = self._clock()
        for record in self.runner.running:
            if record.pid:
                reference = self._checkpoints.changed(record.task_id)
            else:
                played_s = (now - record.started_at) * self._play_speed
                reference = self._played_checkpoints.changed(record.task_id, played_s)
            if reference is None:
                continue
            event = TaskEvent(
                job_id=record.job_id,
                task_id=record.task_id,
                state=TaskState.CHECKPOINTED,
                time=now,
                reason="checkpoint written",
                accelerators=tuple(record.accelerators),
                checkpoint_reference=reference,
                checkpoint_time=now,
            )
            self._publish_task_event(event)
            count += 1
        return count

    def _publish_task_event(self, event: TaskEvent) -> None:
        event_id = self._next_event_id()
        message = wire.task_event_message(event_id, self.ref, event)
        self._outbox.add(self._task_subject, f"task:{event_id}", message.SerializeToString())

    def accept_fencing_token(self, token: int) -> bool:
        """Take ``token`` as the node's fencing token if it is higher, without saving.

        Return whether it was higher. The caller must save the state before the command that
        carries the token acts, as :meth:`handle` does when it raises the token itself.
        """
        if token <= self.fencing_token:
            return False
        self._state.set_fencing_token(self.ref.key, token)
        self.fencing_token = token
        return True

    async def handle(self, command: wire.Command) -> None:
        """Act on one command addressed to this node."""
        assert self.runner is not None
        if command.fencing_token < self.fencing_token:
            logger.warning(
                "node %s ignores command %s: fencing token %d is older than %d",
                self.ref.key,
                command.command_id,
                command.fencing_token,
                self.fencing_token,
            )
            return
        if command.fencing_token > self.fencing_token:
            self._state.raise_fencing_token(self.ref.key, command.fencing_token)
            self.fencing_token = command.fencing_token
        if command.kind == "start" and command.spec is not None:
            spec = command.spec
            if self._backend_name == "simulated":
                self._played_checkpoints.add(spec.task_id, spec.env)
            if spec.command:
                files = self._checkpoints.environment(
                    spec.task_id, spec.checkpoint_reference, spec.job_id
                )
                rendezvous = await self._rendezvous_env(spec, command)
                spec = replace(spec, env=spec.env + files + rendezvous)
            await self.runner.start(spec)
        elif command.kind == "stop":
            await self.runner.stop(command.task_id, command.reason)
        elif command.kind == "hosts" and command.placement is not None:
            await self._update_hosts(command, command.placement)
        elif command.kind == "reconcile":
            self.runner.report_running()
            self.publish_inventory()

    async def _rendezvous_env(
        self, spec: TaskSpec, command: wire.Command
    ) -> tuple[tuple[str, str], ...]:
        """Write the task's hosts file and return its rendezvous variables.

        The start ``command``'s placement version and time order the hosts that later
        commands send. A hosts file that cannot be written leaves ``ACSP_TASK_HOSTS_FILE``
        naming no file, with a warning, while the other variables still let the task start.
        The file of a task that runs a process, of a job of two or more tasks, is synced to
        disk before the task starts, as a rewrite is. The fsyncs run in a worker thread, so
        they delay neither the other commands nor the heartbeats. A played task's file is not
        synced, because no process reads it and a played start saves its task record without
        an fsync too. Nor is a one-task job's file, which no UPDATE_HOSTS command rewrites.
        """
        assert self.runner is not None
        index = task_index_of(spec.task_id)
        task_index = int(index) if index is not None else 0
        placement = Placement(spec.node_hosts, spec.task_node_indexes)
        path = self._host_files.path(spec.task_id)
        # A redelivered start of a task that ended here would leave a file that no end deletes.
        if not self.runner.knows(spec.task_id):
            write = functools.partial(
                self._host_files.write,
                spec.task_id,
                placement.task_hosts(self._host),
                command.issued_at_ns,
                command.placement_version,
            )
            try:
                # A one-task job's file names only this host, and no rewrite orders hosts
                # against it, so syncing it would add fsyncs to every start for nothing.
                if self.runner.plays(spec) or not placement.task_node_indexes:
                    write()
                else:
                    await _run_to_end_in_thread(functools.partial(write, sync=True))
            except OSError as error:
                logger.warning("hosts file of task %s was not written: %s", spec.task_id, error)
            except asyncio.CancelledError:
                # The task does not start, so nothing else deletes the file just written.
                self._host_files.forget(spec.task_id)
                raise
        return task_environment(task_index, placement, self._host, spec.rendezvous_port, path)

    async def _update_hosts(self, command: wire.Command, placement: Placement) -> None:
        """Rewrite the hosts file of ``command``'s task while that copy runs here.

        :func:`wire.parse_command` has checked ``placement`` against the task's index. A copy
        that ended or never ran here, and one played without a process or file, is ignored.
        The synced rewrite runs in a worker thread, as the write at the start does. Rewrites
        run one at a time in the order of their calls, so each one compares its version with
        what the previous one wrote.
        """
        assert self.runner is not None
        task_id = command.task_id
        record = self._running_record(task_id)
        path = self._host_files.path(task_id)
        if record is None or not (record.pid or path.exists()):
            logger.debug(
                "hosts update of task %s ignored: no copy with a hosts file runs here", task_id
            )
            return
        update = functools.partial(
            self._host_files.update,
            task_id,
            placement.task_hosts(self._host),
            command.issued_at_ns,
            command.placement_version,
        )
        async with self._hosts_update_lock:
            try:
                written = await _run_to_end_in_thread(update)
            except OSError as error:
                logger.warning("hosts file of task %s was not rewritten: %s", task_id, error)
                return
            finally:
                # If the task ended during the write, its end deleted the file before the
                # rename restored it, and no later event deletes it.
                if self._running_record(task_id) is None:
                    self._host_files.forget(task_id)
        if written:
            logger.info(
                "rewrote the hosts file of task %s with placement version %d",
                task_id,
                command.placement_version,
            )
        else:
            logger.debug("hosts update of task %s ignored: the file has later hosts", task_id)

    def _running_record(self, task_id: str) -> TaskRecord | None:
        assert self.runner is not None
        return next((r for r in self.runner.running if r.task_id == task_id), None)

    def _tasks_by_accelerator(self) -> dict[str, list[str]]:
        assert self.runner is not None
        result: dict[str, list[str]] = {}
        for record in self.runner.running:
            for uuid in record.accelerators:
                result.setdefault(uuid, []).append(record.task_id)
        return result

    def busy(self) -> dict[str, tuple[str, float]]:
        """Return, per busy accelerator, its task and the task's start time."""
        if self.runner is None:
            return {}
        return {
            uuid: (record.task_id, record.started_at)
            for record in self.runner.running
            for uuid in record.accelerators
        }

    # Usage -----------------------------------------------------------------------------------

    def report_usage(self) -> int:
        """Publish the usage since the last report, and any new checkpoint references first.

        Return the number of usage samples.
        """
        assert self.runner is not None
        assert self.inventory is not None
        self.report_checkpoints()
        now = self._clock()
        start, self._last_usage = self._last_usage, now
        intervals = self.runner.intervals(start, now)
        accumulators, self._accumulators = self._accumulators, {}
        if not intervals:
            self._mark_reported(now)
            return 0
        shares = {info.uuid: info.share_milli for info in self.inventory.accelerators}
        models = {info.uuid: info.model for info in self.inventory.accelerators}
        samples = []
        for interval, start_us, end_us in _pieces(intervals):
            for uuid in interval.accelerators:
                sequence = self._state.next_sequence(self.ref.key)
                accumulator = accumulators.get(uuid, _Accumulator())
                share = _task_share(interval, uuid, shares.get(uuid, WHOLE_MILLI))
                samples.append(
                    UsageSample(
                        sample_id=self._state.sample_id(self.ref.key, sequence),
                        sequence=sequence,
                        job_id=interval.job_id,
                        task_id=interval.task_id,
                        accelerator_uuid=uuid,
                        start_time=start_us / 1_000_000,
                        end_time=end_us / 1_000_000,
                        share_milli=share,
                        accelerator_seconds_us=(end_us - start_us) * share // WHOLE_MILLI,
                        utilization_percent=accumulator.utilization(),
                        memory_used_bytes=accumulator.memory(),
                    )
                )

        # Split, because a report after a long outage or of many tasks can outgrow max_payload.
        for report in wire.usage_report_messages(self.ref, self.boot_id, samples, models):
            self._outbox.add(
                self._usage_subject,
                f"usage:{report.samples[0].sample_id}",
                report.SerializeToString(),
            )
        # Marked when the samples go into the spool, with the state saved just before. Marked
        # now, a save while they wait in memory would skip them after a crash.
        self._outbox.call_before_spool(lambda: self._mark_reported(now))
        return len(samples)

    def _mark_reported(self, until: float) -> None:
        self._state.mark_usage_reported(self.ref.key, until)
        self._state.prune_ended(self.ref.key, until)

    # Heartbeat and inventory -----------------------------------------------------------------

    def heartbeat_payload(self, stopping: bool = False) -> bytes:
        assert self.health is not None and self.runner is not None
        self._heartbeat_counter += 1
        message = wire.heartbeat_message(
            self.ref,
            self.boot_id,
            self._heartbeat_counter,
            self.health.drain_requested(),
            stopping,
            self.health.health(),
            [record.task_id for record in self.runner.running],
            self._outbox.pending,
            self._clock(),
        )
        return message.SerializeToString()

    def publish_inventory(self) -> None:
        assert self.inventory is not None
        assert self.health is not None
        assert self.runner is not None
        used: dict[str, int] = {}
        shares = {info.uuid: info.share_milli for info in self.inventory.accelerators}
        for record in self.runner.running:
            for uuid in record.accelerators:
                used[uuid] = shares.get(uuid, WHOLE_MILLI)
        message = wire.inventory_message(
            self.ref,
            self._backend_name,
            self._agent_version,
            self.boot_id,
            self.inventory,
            self.health.health(),
            used,
            [record.task_id for record in self.runner.running],
            self._clock(),
            # NOTE: nodes that one agent process serves share its pool, yet each reports the
            # whole pool, so together they are offered more jobs than they can take. Their
            # agent rejects the extra starts as busy.
            max_jobs=len(self._task_users) if self._task_users is not None else 0,
            host=self._host,
            rendezvous_ports=self._rendezvous_ports,
        )
        self._inventory_counter += 1
        msg_id = f"inventory:{self.ref.key}/{self.boot_id}/{self._inventory_counter}"
        self._outbox.add(self._inventory_subject, msg_id, message.SerializeToString())

    def _next_event_id(self) -> str:
        self._event_counter += 1
        return f"{self.ref.key}/{self.boot_id}/{self._event_counter}"


async def _run_to_end_in_thread(function: Callable[[], _T]) -> _T:
    """Run ``function`` in a worker thread and return its result.

    A cancellation waits for the thread to end before it propagates, because a thread cannot
    be stopped. So a caller's cleanup (deleting a task's hosts file, releasing the rewrite
    lock) comes after the thread's last write, and no write follows the agent's stop.
    """
    future = asyncio.ensure_future(asyncio.to_thread(function))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # The agent's stop cancels its loops again every second, and each wait must outlast
        # a slow disk's fsyncs.
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled() and future.exception() is not None:
            logger.warning(
                "hosts file write failed after its command was cancelled: %s", future.exception()
            )
        raise


MAX_SAMPLE_US = 3600 * 1_000_000
"""Longest interval of one sample; longer ones (after an agent outage) are split."""


def _pieces(intervals: list[TaskInterval]) -> list[tuple[TaskInterval, int, int]]:
    """Return each interval as microsecond pieces of at most :data:`MAX_SAMPLE_US`."""
    pieces = []
    for interval in intervals:
        start_us = round(interval.start * 1_000_000)
        end_us = round(interval.end * 1_000_000)
        while start_us < end_us:
            piece_end = min(end_us, start_us + MAX_SAMPLE_US)
            pieces.append((interval, start_us, piece_end))
            start_us = piece_end
    return pieces


def _task_share(interval: TaskInterval, uuid: str, inventory_share: int) -> int:
    """Return the milli-shares a task held of ``uuid``.

    That is the task's share of a shared accelerator, but never more than the device's own
    share (a partition of a parent device).
    """
    return min(interval.share_of(uuid), inventory_share)
