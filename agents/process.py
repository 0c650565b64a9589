"""The agent process: one NATS connection, the timers, and the nodes it serves.

An NVML agent serves one node; the simulated fleet serves thousands in the same process with
the same subjects and payloads. The process connects outbound only and keeps retrying while
NATS is unreachable. Meanwhile readings, health and usage go on, and their messages wait in
the spool.

- Inventory: published at start and again after every reconnect.
- Heartbeat: put in the KV bucket ``acsp_heartbeat`` under ``<provider>.<region>.<node>``
  every ``heartbeat_s``; a heartbeat that cannot be sent is skipped (only the latest counts).
- Health events, task events, usage reports: JetStream, through the outbox and its spool.
- Counters: written every ``state_flush_s`` to ``stats.json`` beside the state file (usage
  samples made, messages published, spooled, dropped, moved to the dead letters and pending),
  so that a supervisor can compare them with what metering ingested.
- Commands: a durable push consumer on ``ACSP_COMMANDS`` named ``agent-<provider>-<region>-<node>``,
  filtered to the node's command subject and delivering to
  ``acsp.deliver.<provider>.<region>.<node>``. The agent creates it itself, with ``name`` set
  so that the create request goes to the subject that the provider's permissions restrict
  (it ends with the filter subject), subscribes to the deliver subject and acks each command
  after handling it. A fleet process uses one consumer per provider region
  (``fleet-<provider>-<region>``, filter ``acsp.cmd.<provider>.<region>.>``, deliver subject
  ``acsp.deliver.<provider>.<region>.fleet.all``), which both a provider's hub user and its
  region's leaf user may create, and routes each command by its subject. The consumer sends
  idle heartbeats; when neither a command nor a heartbeat arrives for a few heartbeat
  intervals, the agent declares the consumer again (a no-op when it exists). Flow control
  is off: its replies go to ``$JS.FC.>``, which the permissions do not allow, and
  ``max_ack_pending`` bounds the commands in flight anyway.
- Connection: with a ``tls://`` URL the server certificate is verified against
  ``ACSP_NATS_TLS_CA`` and a server that does not offer TLS is refused before any
  credential is sent. Replies (JetStream acks) come to ``_INBOX.<provider>``, the only inbox
  a provider's user may subscribe to.

Stopping the agent (SIGTERM) reports the last usage interval, saves the state and exits
within ``stop_grace_s``. By default its tasks keep running and a restarted agent adopts them,
which suits a node agent restarted in production. With ``stop_tasks_on_exit`` (a local mesh
shutting down) their processes are stopped first, so the last usage ends where they ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from acsp import subjects
from agents import wire
from agents.node import NodeAgent
from agents.outbox import Outbox
from agents.private_files import private_opener
from agents.runner import AGENT_EXIT, remove_stale_cgroups
from agents.state import StateStore
from agents.state_lock import StateFolderLock, remove_pid_file, write_pid_file
from agents.task_output import output_reply
from agents.task_process import TaskLauncher
from services.runtime.nats import TlsCheckingClient, TlsRequiredError

logger = logging.getLogger(__name__)

STATS_FILE_NAME = "stats.json"
_MAX_ACK_PENDING = 1000
_MISSED_HEARTBEATS = 3
"""Idle heartbeats missed before the agent declares its command consumer again."""
FLEET_DELIVER_SUFFIX = "fleet.all"
"""Ends a fleet consumer's deliver subject; two tokens, so no node's subject can equal it."""
_DRAIN_S = 5.0
"""Seconds a stopping agent spends publishing what waits in the spool."""
_HEARTBEAT_CHUNK = 500
_OUTPUT_PENDING = 64
"""Output requests queued per subscription; NATS drops those beyond, and the scheduler's
request then times out."""
_COMMAND_BATCH = 256
"""Maximum queued commands handled before the state is saved and they are acknowledged."""
# Nodes handled between yields to the event loop, so that commands wait at most a few ms.
_YIELD_EVERY = 50
_LAUNCHER_EXIT_S = 2.0
"""Maximum seconds a stop waits for an idle task launcher to exit once its socket closes."""


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    servers: Sequence[str]
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None
    name: str = "acsp-agent"
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 1.0
    tls: ssl.SSLContext | None = None
    """Verifies the server; when set, a server that does not offer TLS is refused."""
    inbox_prefix: str | None = None
    """Replaces ``_INBOX`` in reply subjects, e.g. ``_INBOX.<provider>``."""


@dataclass(frozen=True, slots=True)
class Intervals:
    heartbeat_s: float = 5.0
    read_s: float = 5.0
    usage_s: float = 10.0
    tick_s: float = 0.5
    """Seconds between checks of played tasks."""
    log_check_s: float = 1.0
    """Seconds between checks of the size of running tasks' logs."""
    state_flush_s: float = 1.0
    command_heartbeat_s: float = 5.0
    """Idle heartbeat of the command consumers."""
    command_ack_wait_s: float = 60.0
    """Seconds before JetStream redelivers a command that the agent has not acknowledged."""


@dataclass(slots=True)
class ProcessCounters:
    heartbeats_sent: int = 0
    heartbeats_skipped: int = 0
    commands_handled: int = 0
    commands_rejected: int = 0
    command_batches_failed: int = 0
    """Command batches left unacknowledged because the state could not be written."""
    usage_samples: int = 0


class AgentProcess:
    """Runs a set of :class:`NodeAgent` against one NATS server until stopped."""

    def __init__(
        self,
        nodes: Sequence[NodeAgent],
        outbox: Outbox,
        state: StateStore,
        connection: ConnectionOptions,
        intervals: Intervals = Intervals(),
        per_provider_consumers: bool = False,
        clock: Callable[[], float] = time.time,
        stop_tasks_on_exit: bool = False,
        stop_grace_s: float = 10.0,
        launcher: TaskLauncher | None = None,
        state_lock: StateFolderLock | None = None,
    ) -> None:
        """``stop_grace_s`` bounds a stop, from the stop signal to the exit, in seconds.

        ``launcher``, shared by the nodes' runners, is closed when the process stops, and
        reaped then if no task runs.

        ``state_lock`` is the lock on the state file's folder, taken before the state and the
        spool were opened and released when :meth:`run` ends. Without it, :meth:`run` takes the
        lock itself.
        """
        if not nodes:
            raise ValueError("an agent process needs at least one node")
        self.nodes = list(nodes)
        self._by_key = {node.ref.key: node for node in nodes}
        self._outbox = outbox
        self._state = state
        self._connection = connection
        self._intervals = intervals
        self._per_provider = per_provider_consumers
        self._clock = clock
        self._stop_tasks_on_exit = stop_tasks_on_exit
        self._stop_grace_s = stop_grace_s
        self._launcher = launcher
        self._state_lock = state_lock
        self._client: Client | None = None
        self._connected_once = asyncio.Event()
        self._reconnected = asyncio.Event()
        self.counters = ProcessCounters()
        self.started = asyncio.Event()
        self._closing = False
        # The latest error that nats-py reported. A failed connect logs it, because after a
        # rejected password the connect itself ends in a timeout with an empty message.
        self._last_nats_error = ""
        self._stopping = False

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    # Lifecycle -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start every node, run until ``stop`` is set, then shut down in two phases.

        Raises :class:`agents.state_lock.StateFolderLockedError` when the process was built
        without the folder's lock and another process holds it.
        """
        folder = self._state.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        lock = self._state_lock
        if lock is None or not lock.held:
            lock = StateFolderLock.acquire(folder)
        try:
            write_pid_file(folder)
            try:
                await self._run(stop)
            finally:
                remove_pid_file(folder)
        finally:
            lock.release()

    async def _run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for index, node in enumerate(self.nodes):
                await node.start(group)
                if index % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            # After every node has found its tasks again, because they share the cgroup folder.
            remove_stale_cgroups([node.runner for node in self.nodes if node.runner is not None])
            self._state.save()
            loops = [
                group.create_task(self._connect_loop(), name="nats-connect"),
                group.create_task(self._outbox.run(lambda: self._client), name="outbox"),
                group.create_task(self._every(self._intervals.read_s, self._read_all), name="read"),
                group.create_task(self._every(self._intervals.usage_s, self._usage_all)),
                group.create_task(self._every(self._intervals.heartbeat_s, self._heartbeat_all)),
                group.create_task(self._every(self._intervals.tick_s, self._tick_all)),
                group.create_task(self._every(self._intervals.log_check_s, self._trim_logs_all)),
                group.create_task(self._every(self._intervals.state_flush_s, self._flush_state)),
                group.create_task(self._inventory_on_reconnect(), name="inventory"),
                group.create_task(self._command_loop(), name="commands"),
                group.create_task(self._output_loop(), name="output-requests"),
            ]
            self.started.set()
            logger.info("agent serving %d nodes", len(self.nodes))
            await stop.wait()
            deadline = asyncio.get_running_loop().time() + self._stop_grace_s
            if self._stop_tasks_on_exit:
                logger.info("agent stopping; stopping its tasks")
            else:
                logger.info("agent stopping; tasks keep running and are found again on restart")
            await self._stop_loops(loops)
            await self._release_tasks()
            if self._launcher is not None:
                remaining_s = deadline - asyncio.get_running_loop().time()
                await self._launcher.stop(min(_LAUNCHER_EXIT_S, max(remaining_s, 0.1)))
        await self._shutdown(deadline)

    async def _release_tasks(self) -> None:
        """Stop the tasks' processes or leave them running, then end their supervisors.

        The supervisors belong to the task group that :meth:`_run` leaves, which would
        otherwise wait until every task ends.
        """
        runners = [node.runner for node in self.nodes if node.runner is not None]
        # Starts still with the launcher become tasks first, so that they are stopped or
        # detached with the others.
        settling = [asyncio.ensure_future(runner.launches_settled()) for runner in runners]
        await asyncio.wait(settling, timeout=5.0)
        if self._stop_tasks_on_exit:
            # Half the stop budget, so that reporting their ends fits in the other half.
            grace_s = self._stop_grace_s / 2
            stopping = [
                supervisor
                for node in self.nodes
                if node.runner is not None
                for supervisor in node.runner.stop_processes(AGENT_EXIT, grace_s)
            ]
            if stopping:
                logger.info("stopping %d tasks within %g s", len(stopping), grace_s)
                # The supervisors send SIGKILL at the deadline; a second bounds the reaping.
                await asyncio.wait(stopping, timeout=grace_s + 1.0)
        detached = [
            supervisor
            for node in self.nodes
            if node.runner is not None
            for supervisor in node.runner.detach()
        ]
        if detached:
            await asyncio.wait(detached, timeout=5.0)

    async def _stop_loops(self, loops: list[asyncio.Task[Any]]) -> None:
        # Each loop also checks the flag: a cancellation that a library swallows (the
        # asyncio.wait_for race of Python 3.11 inside nats-py) then ends the loop anyway.
        self._stopping = True
        self._outbox.close()
        pending = set(loops)
        for _ in range(30):
            for loop in pending:
                loop.cancel()
            _done, pending = await asyncio.wait(pending, timeout=1.0)
            if not pending:
                return
        logger.error("%d agent loops did not stop: %s", len(pending), pending)

    async def _shutdown(self, deadline: float) -> None:
        """Report the last usage, save the state, and publish what waits until ``deadline``."""
        self._closing = True
        loop = asyncio.get_running_loop()

        def remaining_s(maximum_s: float) -> float:
            # Each step gets at least 0.2 s, so the stopping heartbeats go out after a slow drain.
            return max(0.2, min(maximum_s, deadline - loop.time()))

        # The last usage interval goes out now, so a clean stop leaves no usage unreported.
        for node in self.nodes:
            self.counters.usage_samples += node.report_usage()
        self._outbox.flush_to_spool()
        self._state.save()
        client = self._client
        if client is not None and client.is_connected:
            # A second is kept for the stopping heartbeats and the close.
            drain_s = max(0.2, min(_DRAIN_S, deadline - loop.time() - 1.0))
            await self._outbox.drain(client, drain_s)
        self.write_stats()
        if client is None or client.is_closed:
            return
        if client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                async with asyncio.timeout(remaining_s(5.0)):
                    await self._send_heartbeats(stopping=True)
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            async with asyncio.timeout(remaining_s(5.0)):
                await client.close()
        logger.info("agent stopped; %d messages wait in the spool", self._outbox.pending)

    async def _every(self, interval_s: float, step: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        next_time = loop.time()
        while not self._stopping:
            next_time += interval_s
            try:
                await step()
            except (nats.errors.Error, OSError, TimeoutError) as error:
                logger.warning("%s failed: %s", getattr(step, "__name__", step), error)
            delay = next_time - loop.time()
            if delay < 0:
                # Running late: skip the missed beats instead of bursting.
                next_time = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    # Connection ------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        options = self._connection
        extra: dict[str, Any] = {}
        if options.tls is not None:
            extra["tls"] = options.tls
        if options.inbox_prefix is not None:
            extra["inbox_prefix"] = options.inbox_prefix
        while self._client is None and not self._stopping:
            client = TlsCheckingClient(require_tls=options.tls is not None)
            try:
                async with asyncio.timeout(options.connect_timeout_s * 2 + 1):
                    await client.connect(
                        servers=list(options.servers),
                        name=options.name,
                        user=options.user,
                        password=options.password,
                        user_credentials=options.creds_file,
                        connect_timeout=max(1, int(options.connect_timeout_s)),
                        reconnect_time_wait=options.reconnect_wait_s,  # type: ignore[arg-type]
                        max_reconnect_attempts=-1,
                        allow_reconnect=True,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        **extra,
                    )
            except TlsRequiredError as error:
                # Rejected before CONNECT, so no credential was sent. The agent retries,
                # because the right server may come back at that address.
                logger.error(
                    "rejected the NATS server: %s; retrying in %g s",
                    error,
                    options.reconnect_wait_s,
                )
                with contextlib.suppress(nats.errors.Error, OSError):
                    await client.close()
                await asyncio.sleep(options.reconnect_wait_s)
                continue
            except (nats.errors.Error, OSError, TimeoutError) as error:
                reason = str(error) or type(error).__name__
                if self._last_nats_error:
                    reason = f"{reason}; the server's last error: {self._last_nats_error}"
                    self._last_nats_error = ""
                logger.warning(
                    "cannot connect to NATS at %s (%s); retrying in %g s",
                    ",".join(options.servers),
                    reason,
                    options.reconnect_wait_s,
                )
                with contextlib.suppress(nats.errors.Error, OSError):
                    await client.close()
                await asyncio.sleep(options.reconnect_wait_s)
                continue
            self._client = client
            self._last_nats_error = ""
            logger.info("connected to NATS at %s", ",".join(options.servers))
            self._connected_once.set()
            self._reconnected.set()

    async def _on_error(self, error: Exception) -> None:
        if isinstance(error, TlsRequiredError):
            logger.error("rejected the NATS server on reconnect: %s", error)
        else:
            self._last_nats_error = str(error) or type(error).__name__
            logger.debug("NATS error: %s", error)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        logger.warning("disconnected from NATS; messages go to the spool until reconnected")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS; replaying %d spooled messages", self._outbox.pending)
        self._reconnected.set()

    # Periodic work ---------------------------------------------------------------------------

    async def _read_all(self) -> None:
        for index, node in enumerate(self.nodes):
            await node.sample()
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    async def _usage_all(self) -> None:
        for index, node in enumerate(self.nodes):
            self.counters.usage_samples += node.report_usage()
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    async def _tick_all(self) -> None:
        for node in self.nodes:
            if node.runner is not None:
                node.runner.tick()

    async def _trim_logs_all(self) -> None:
        for index, node in enumerate(self.nodes):
            if node.runner is not None:
                node.runner.trim_logs()
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    async def _flush_state(self) -> None:
        self._state.flush()
        self.write_stats()

    def write_stats(self) -> None:
        """Write the counters to ``stats.json`` beside the state file, replacing it atomically."""
        stats = {
            **dataclasses.asdict(self.counters),
            "outbox": dataclasses.asdict(self._outbox.counters),
            "outbox_pending": self._outbox.pending,
            "time": self._clock(),
        }
        path = self._state.path.parent / STATS_FILE_NAME
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8", opener=private_opener) as file:
            file.write(json.dumps(stats) + "\n")
        os.replace(temporary, path)

    async def _heartbeat_all(self) -> None:
        if not self.connected:
            self.counters.heartbeats_skipped += len(self.nodes)
            return
        await self._send_heartbeats(stopping=False)

    async def _send_heartbeats(self, stopping: bool) -> None:
        """Put every node's heartbeat in the KV bucket.

        Heartbeats go out as plain publishes on the bucket's subjects, without waiting for
        JetStream acks, because only the latest value matters and a lost one is replaced
        within ``heartbeat_s``. One flush per chunk bounds the client's buffer.
        """
        assert self._client is not None
        client = self._client
        for start in range(0, len(self.nodes), _HEARTBEAT_CHUNK):
            chunk = self.nodes[start : start + _HEARTBEAT_CHUNK]
            for node in chunk:
                subject = f"$KV.{subjects.HEARTBEAT_BUCKET}.{node.ref.key}"
                await client.publish(subject, node.heartbeat_payload(stopping))
            try:
                await client.flush(timeout=5)
            except (nats.errors.Error, TimeoutError) as error:
                self.counters.heartbeats_skipped += len(chunk)
                logger.warning("%d heartbeats may not have been sent: %r", len(chunk), error)
                continue
            self.counters.heartbeats_sent += len(chunk)
            await asyncio.sleep(0)

    async def _inventory_on_reconnect(self) -> None:
        while not self._stopping:
            await self._reconnected.wait()
            self._reconnected.clear()
            for index, node in enumerate(self.nodes):
                node.publish_inventory()
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)

    # Commands --------------------------------------------------------------------------------

    def command_consumers(self) -> list[CommandConsumer]:
        """Return the push consumers that deliver this process's commands."""
        if self._per_provider:
            regions = sorted({(node.ref.provider, node.ref.region) for node in self.nodes})
            return [
                CommandConsumer(
                    name=f"fleet-{provider}-{region}",
                    filter_subject=f"acsp.cmd.{provider}.{region}.>",
                    deliver_subject=f"acsp.deliver.{provider}.{region}.{FLEET_DELIVER_SUFFIX}",
                )
                for provider, region in regions
            ]
        return [
            CommandConsumer(
                name=f"agent-{ref.provider}-{ref.region}-{ref.node}",
                filter_subject=subjects.command_subject(ref.provider, ref.region, ref.node),
                deliver_subject=subjects.command_deliver_subject(
                    ref.provider, ref.region, ref.node
                ),
            )
            for ref in (node.ref for node in self.nodes)
        ]

    async def _command_loop(self) -> None:
        await self._connected_once.wait()
        async with asyncio.TaskGroup() as group:
            for consumer in self.command_consumers():
                group.create_task(self._consume(consumer), name=f"consume-{consumer.name}")

    async def _consume(self, consumer: CommandConsumer) -> None:
        """Declare the push consumer, subscribe to its deliver subject, and keep it alive."""
        assert self._client is not None
        client = self._client
        config = ConsumerConfig(
            name=consumer.name,
            durable_name=consumer.name,
            filter_subject=consumer.filter_subject,
            deliver_subject=consumer.deliver_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._intervals.command_ack_wait_s,
            max_ack_pending=_MAX_ACK_PENDING,
            idle_heartbeat=self._intervals.command_heartbeat_s,
        )
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        # Bounded: the consumer has at most max_ack_pending unacked commands out, and a
        # redelivery replaces one of them.
        queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=_MAX_ACK_PENDING * 2)

        async def receive(message: Msg) -> None:
            nonlocal last_seen
            last_seen = loop.time()
            if _is_status(message):
                return  # an idle heartbeat: the consumer exists and the path works
            await queue.put(message)

        subscription = None
        declared = False
        try:
            subscription = await client.subscribe(
                consumer.deliver_subject,
                cb=receive,
                pending_msgs_limit=_MAX_ACK_PENDING * 2,
            )
            while not self._stopping:
                silent_s = loop.time() - last_seen
                stale = silent_s > self._intervals.command_heartbeat_s * _MISSED_HEARTBEATS
                if (not declared or stale) and client.is_connected:
                    if declared:
                        logger.warning(
                            "no heartbeat on %s for %.0f s; declaring consumer %s again",
                            consumer.deliver_subject,
                            silent_s,
                            consumer.name,
                        )
                    declared = await self._declare_consumer(consumer, config)
                    last_seen = loop.time()
                try:
                    message = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    continue
                batch = [message]
                while len(batch) < _COMMAND_BATCH and not queue.empty():
                    batch.append(queue.get_nowait())
                try:
                    await self._handle_commands(batch)
                except OSError as error:
                    # The state or the start intents could not be written (a full disk). The
                    # batch stays unacknowledged, so JetStream delivers it again after the ack
                    # wait, and a start that already spawned its process is then ignored.
                    self.counters.command_batches_failed += 1
                    logger.error(
                        "handling %d commands on %s failed; JetStream delivers them again after "
                        "%g s: %s",
                        len(batch),
                        consumer.filter_subject,
                        self._intervals.command_ack_wait_s,
                        error,
                    )
        finally:
            if subscription is not None and not client.is_closed:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def _declare_consumer(self, consumer: CommandConsumer, config: ConsumerConfig) -> bool:
        # NOTE: the permissions restrict the filter subject, not the name, so while this node
        # is offline another provider can take the consumer over (docs/deploy.md).
        assert self._client is not None
        try:
            await self._client.jetstream(timeout=5.0).add_consumer(subjects.COMMAND_STREAM, config)
        except (nats.errors.Error, OSError, TimeoutError) as error:
            logger.warning(
                "cannot declare command consumer %s: %s; retrying",
                consumer.name,
                error or type(error).__name__,
            )
            return False
        logger.info(
            "consuming commands on %s as %s (delivered to %s)",
            consumer.filter_subject,
            consumer.name,
            consumer.deliver_subject,
        )
        return True

    async def _handle_commands(self, messages: list[Msg]) -> None:
        """Handle ``messages`` in order, then save the state once and acknowledge them.

        Before any process is spawned, the intents of the batch's starts are saved with one
        fsync, so a restarted agent adopts a process spawned before a crash instead of
        starting its task again (:meth:`agents.runner.TaskRunner.recover`). After the batch,
        the state file records every task these commands started or stopped before any of
        them is acknowledged, so a crash before that save gets the commands redelivered.
        """
        accepted: list[tuple[Msg, NodeAgent, wire.Command]] = []
        for message in messages:
            try:
                accepted.append((message, *self._route(message)))
            except wire.InvalidCommand as error:
                self.counters.commands_rejected += 1
                logger.error("command on %s rejected: %s", message.subject, error)
                with contextlib.suppress(nats.errors.Error):
                    await message.term()
        earlier_tokens: dict[NodeAgent, int] = {}
        seen: set[str] = set()
        try:
            for _message, node, command in accepted:
                # Only a node's first command, so that commands are still fenced in their order.
                if node.ref.key not in seen:
                    seen.add(node.ref.key)
                    token = node.fencing_token
                    if node.accept_fencing_token(command.fencing_token):
                        earlier_tokens[node] = token
                if command.kind == "start" and command.spec is not None and node.runner is not None:
                    node.runner.prepare_start(command.spec)
            if earlier_tokens:
                # A new leader's first commands reach many nodes at once: one write records
                # every node's new token, and the intents with them, before any command acts.
                self._state.save()
            else:
                self._state.save_intents()
        except BaseException:
            # The new tokens are not on disk. Their redelivered commands must raise them again
            # and save before acting, which they do only if the nodes keep the earlier ones.
            for node, token in earlier_tokens.items():
                node.fencing_token = token
            raise
        # Consecutive starts go to the launcher together and wait for its replies together.
        # Without a launcher a start waits only while the hosts file of a task of a job of two
        # or more tasks is synced, so those starts sync one after another.
        starts: list[Coroutine[Any, Any, None]] = []
        for _message, node, command in accepted:
            if command.kind == "start" and self._launcher is not None:
                starts.append(node.handle(command))
                continue
            if starts:
                await asyncio.gather(*starts)
                starts = []
            await node.handle(command)
        if starts:
            await asyncio.gather(*starts)
        for _message, node, command in accepted:
            self.counters.commands_handled += 1
            if command.spec is not None:
                # A start that spawned nothing (fenced off, say) leaves no intent behind.
                self._state.remove_intent(node.ref.key, command.spec.task_id)
        self._state.save_before_spool()
        for message, _node, _command in accepted:
            with contextlib.suppress(nats.errors.Error):
                await message.ack()

    def _route(self, message: Msg) -> tuple[NodeAgent, wire.Command]:
        """Parse a command and find its node; raise InvalidCommand if either fails."""
        command = wire.parse_command(message.data)
        node = self._by_key.get(_node_key_of(message.subject))
        if node is None:
            raise wire.InvalidCommand(f"subject {message.subject} names no node of this agent")
        if command.node.node and command.node.key != node.ref.key:
            raise wire.InvalidCommand(
                f"node {command.node.key} in the command does not match {message.subject}"
            )
        return node, command

    # Output requests -------------------------------------------------------------------------

    def output_subjects(self) -> list[str]:
        """Return the subjects of the output requests to this process's nodes.

        A fleet process takes one wildcard subject per provider region, as its command
        consumers do.
        """
        if self._per_provider:
            regions = sorted({(node.ref.provider, node.ref.region) for node in self.nodes})
            return [f"acsp.output.{provider}.{region}.*" for provider, region in regions]
        return [
            subjects.output_subject(ref.provider, ref.region, ref.node)
            for ref in (node.ref for node in self.nodes)
        ]

    async def _output_loop(self) -> None:
        """Reply to output requests until the process stops.

        The client subscribes again by itself after a reconnect, so one subscription per
        subject lasts the whole run.
        """
        await self._connected_once.wait()
        assert self._client is not None
        client = self._client
        subscriptions = []
        try:
            for subject in self.output_subjects():
                subscriptions.append(
                    await client.subscribe(
                        subject, cb=self._reply_output, pending_msgs_limit=_OUTPUT_PENDING
                    )
                )
            # Until _stop_loops cancels this loop.
            await asyncio.Event().wait()
        finally:
            if not client.is_closed:
                for subscription in subscriptions:
                    with contextlib.suppress(nats.errors.Error):
                        await subscription.unsubscribe()

    async def _reply_output(self, message: Msg) -> None:
        key = _node_key_of(message.subject)
        node = self._by_key.get(key)
        if node is None:
            # A node of another agent process in the same region, which replies itself.
            return
        prefix = subjects.output_reply_prefix(node.ref.provider, node.ref.region, node.ref.node)
        if not message.reply.startswith(prefix):
            logger.warning(
                "output request on %s ignored: its reply subject %r is not under %s",
                message.subject,
                message.reply,
                prefix,
            )
            return
        assert self._client is not None
        client = self._client
        log_path = node.runner.log_path if node.runner is not None else None
        reply = await output_reply(log_path, key, message.data, client.max_payload)
        try:
            await client.publish(message.reply, reply.SerializeToString())
        except (nats.errors.Error, OSError) as error:
            logger.warning("reply to output request on %s failed: %s", message.subject, error)


@dataclass(frozen=True, slots=True)
class CommandConsumer:
    """A durable push consumer on ``ACSP_COMMANDS``, created by the agent."""

    name: str
    filter_subject: str
    deliver_subject: str


def _is_status(message: Msg) -> bool:
    # Idle heartbeats (and flow control, which is off) carry a status header and no data.
    headers = message.headers or {}
    return not message.data and headers.get("Status") is not None


def _node_key_of(subject: str) -> str:
    parts = subject.split(".")
    return ".".join(parts[2:5]) if len(parts) == 5 else ""
