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
  samples made, messages published, spooled, dropped and pending), so that a supervisor can
  compare them with what metering ingested.
- Commands: a durable pull consumer on ``ACSP_COMMANDS``, filtered to the node's subject
  (``agent-<provider>-<region>-<node>``). A fleet process uses one consumer per provider,
  filtered to ``acsp.cmd.<provider>.>``, and routes each command by its subject.

Stopping the agent does not stop its tasks: a restarted agent finds them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
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
from agents.state import StateStore

logger = logging.getLogger(__name__)

STATS_FILE_NAME = "stats.json"
_FETCH_BATCH = 256
_DRAIN_S = 5.0
"""Seconds a stopping agent spends publishing what waits in the spool."""
_HEARTBEAT_CHUNK = 500
# Nodes handled between yields to the event loop, so that commands wait at most a few ms.
_YIELD_EVERY = 50


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    servers: Sequence[str]
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None
    name: str = "acsp-agent"
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Intervals:
    heartbeat_s: float = 5.0
    read_s: float = 5.0
    usage_s: float = 10.0
    tick_s: float = 0.5
    """Seconds between checks of played tasks."""
    state_flush_s: float = 1.0


@dataclass(slots=True)
class ProcessCounters:
    heartbeats_sent: int = 0
    heartbeats_skipped: int = 0
    commands_handled: int = 0
    commands_rejected: int = 0
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
    ) -> None:
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
        self._client: Client | None = None
        self._connected_once = asyncio.Event()
        self._reconnected = asyncio.Event()
        self.counters = ProcessCounters()
        self.started = asyncio.Event()
        self._closing = False
        self._stopping = False

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    # Lifecycle -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start every node, run until ``stop`` is set, then shut down in two phases."""
        pid_file = self._state.path.parent / "agent.pid"
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            await self._run(stop)
        finally:
            pid_file.unlink(missing_ok=True)

    async def _run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for index, node in enumerate(self.nodes):
                await node.start(group)
                if index % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            self._state.save()
            loops = [
                group.create_task(self._connect_loop(), name="nats-connect"),
                group.create_task(self._outbox.run(self._publish, lambda: self.connected)),
                group.create_task(self._every(self._intervals.read_s, self._read_all), name="read"),
                group.create_task(self._every(self._intervals.usage_s, self._usage_all)),
                group.create_task(self._every(self._intervals.heartbeat_s, self._heartbeat_all)),
                group.create_task(self._every(self._intervals.tick_s, self._tick_all)),
                group.create_task(self._every(self._intervals.state_flush_s, self._flush_state)),
                group.create_task(self._inventory_on_reconnect(), name="inventory"),
                group.create_task(self._command_loop(), name="commands"),
            ]
            self.started.set()
            logger.info("agent serving %d nodes", len(self.nodes))
            await stop.wait()
            logger.info("agent stopping; tasks keep running and are found again on restart")
            await self._stop_loops(loops)
        await self._shutdown()

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

    async def _shutdown(self) -> None:
        self._closing = True
        # The last usage interval goes out now, so a clean stop leaves no usage unreported.
        for node in self.nodes:
            self.counters.usage_samples += node.report_usage()
        self._outbox.flush_to_spool()
        self._state.save()
        client = self._client
        if client is not None and client.is_connected:
            await self._outbox.drain(self._publish, _DRAIN_S)
        self.write_stats()
        if client is None or client.is_closed:
            return
        if client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                async with asyncio.timeout(5.0):
                    await self._send_heartbeats(stopping=True)
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            async with asyncio.timeout(5.0):
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
        while self._client is None and not self._stopping:
            client = Client()
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
                    )
            except (nats.errors.Error, OSError, TimeoutError) as error:
                logger.warning(
                    "cannot connect to NATS at %s (%s); retrying in %g s",
                    ",".join(options.servers),
                    error or type(error).__name__,
                    options.reconnect_wait_s,
                )
                with contextlib.suppress(nats.errors.Error, OSError):
                    await client.close()
                await asyncio.sleep(options.reconnect_wait_s)
                continue
            self._client = client
            logger.info("connected to NATS at %s", ",".join(options.servers))
            self._connected_once.set()
            self._reconnected.set()

    async def _on_error(self, error: Exception) -> None:
        logger.debug("NATS error: %s", error)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        logger.warning("disconnected from NATS; messages go to the spool until reconnected")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS; replaying %d spooled messages", self._outbox.pending)
        self._reconnected.set()

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> object:
        if self._client is None:
            raise nats.errors.ConnectionClosedError
        return await self._client.jetstream().publish(subject, payload, headers=headers)

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
        temporary.write_text(json.dumps(stats) + "\n")
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

    def _consumer_filters(self) -> list[tuple[str, str]]:
        """Return (durable name, filter subject) pairs for this process's command consumers."""
        if self._per_provider:
            providers = sorted({node.ref.provider for node in self.nodes})
            return [(f"agent-fleet-{p}", f"acsp.cmd.{p}.>") for p in providers]
        result = []
        for node in self.nodes:
            ref = node.ref
            durable = f"agent-{ref.provider}-{ref.region}-{ref.node}"
            result.append((durable, subjects.command_subject(ref.provider, ref.region, ref.node)))
        return result

    async def _command_loop(self) -> None:
        await self._connected_once.wait()
        async with asyncio.TaskGroup() as group:
            for durable, subject in self._consumer_filters():
                group.create_task(self._consume(durable, subject), name=f"consume-{durable}")

    async def _consume(self, durable: str, subject: str) -> None:
        assert self._client is not None
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=60.0,
            max_ack_pending=1000,
        )
        subscription = None
        while not self._stopping:
            try:
                if subscription is None:
                    subscription = await self._client.jetstream().pull_subscribe(
                        subject, durable=durable, stream=subjects.COMMAND_STREAM, config=config
                    )
                    logger.info("consuming commands on %s as %s", subject, durable)
                messages = await subscription.fetch(_FETCH_BATCH, timeout=1.0)
            except TimeoutError:
                continue
            except (nats.errors.Error, OSError) as error:
                logger.warning("command consumer %s: %s; retrying", durable, error)
                await asyncio.sleep(self._connection.reconnect_wait_s)
                continue
            for message in messages:
                await self._handle_command(message)

    async def _handle_command(self, message: Msg) -> None:
        try:
            command = wire.parse_command(message.data)
            node = self._by_key.get(_node_key_of(message.subject))
            if node is None:
                raise wire.InvalidCommand(f"subject {message.subject} names no node of this agent")
            if command.node.node and command.node.key != node.ref.key:
                raise wire.InvalidCommand(
                    f"node {command.node.key} in the command does not match {message.subject}"
                )
        except wire.InvalidCommand as error:
            self.counters.commands_rejected += 1
            logger.error("command on %s rejected: %s", message.subject, error)
            with contextlib.suppress(nats.errors.Error):
                await message.term()
            return
        await node.handle(command)
        self.counters.commands_handled += 1
        with contextlib.suppress(nats.errors.Error):
            await message.ack()


def _node_key_of(subject: str) -> str:
    parts = subject.split(".")
    return ".".join(parts[2:5]) if len(parts) == 5 else ""
