"""What agents tell the scheduler: inventories, health and task events from ``ACSP_AGENT``,
and heartbeats from the ``acsp_heartbeat`` KV bucket, turned into loop inputs.

Stream messages are acknowledged only after the loop committed their effects. A batch whose
commit does not come within ``commit_timeout_s`` is redelivered. The transitions absorb the
repeat because a repeated task event finds its task already in that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Final

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from acsp import subjects
from acsp.rendezvous import (
    DEFAULT_PORT_RANGE,
    MAX_HOST_CHARACTERS,
    is_valid_host,
    parse_port_range,
)
from acsp.v1 import agent_pb2, scheduler_pb2

from .engine_adapter import AcceleratorHealth
from .fleet import AcceleratorView, FleetView, NodeView
from .inputs import (
    AcceleratorHealthReported,
    AgentDrainRequested,
    HeartbeatReceived,
    Input,
    InventoryReceived,
    TaskReported,
)

logger = logging.getLogger(__name__)

HEARTBEAT_DROP_LOG_EVERY: Final = 1000
FETCH_BATCH: Final = 500
BATCHES_IN_FLIGHT: Final = 4
LIVE_HEARTBEATS_PENDING: Final = 1_000_000
"""Heartbeats the subscription buffers while the process is busy, before NATS drops some."""


class InvalidAgentMessage(Exception):
    """A payload that can never be processed; its messages are terminated, not redelivered."""


async def _each(messages: list[Msg], action: str) -> None:
    for message in messages:
        try:
            if action == "ack":
                await message.ack()
            elif action == "nak":
                await message.nak(delay=1.0)
            else:
                await message.term()
        except NatsError as exc:
            # A lost ack means a redelivery, which the transitions absorb.
            logger.warning("could not %s an agent message: %s", action, exc)


def node_from_inventory(msg: agent_pb2.Inventory) -> NodeView:
    """Convert an inventory; raises ``ValueError`` for a node id that is not a subject token."""
    ref = msg.node
    subjects.node_suffix(ref.provider_id, ref.region_id, ref.node_id)
    accelerators = tuple(
        AcceleratorView(
            accelerator_id=acc.accelerator_id or acc.pci_bus_id,
            model=acc.model,
            interconnect_domain=acc.interconnect_domain,
            healthy=acc.health != scheduler_pb2.HEALTH_STATE_FAILED,
            pci_bus_id=acc.pci_bus_id,
        )
        for acc in msg.accelerators
        if not acc.parent_accelerator_id
    )
    return NodeView(
        provider=ref.provider_id,
        region=ref.region_id,
        node=ref.node_id,
        accelerators=accelerators,
        software_stacks=tuple(msg.software_stacks),
        boot_id=msg.boot_id,
        running_task_ids=frozenset(msg.running_task_ids),
        max_jobs=msg.max_jobs,
        host=_host(msg),
        rendezvous_ports=_port_range(msg),
    )


def _host(msg: agent_pb2.Inventory) -> str:
    """Return the inventory's host, or "" (so the node id is used) for an invalid one.

    Agents check ACSP_AGENT_HOST, but an inventory may come from any agent. The scheduler
    writes the host as one line of every gang task's hosts file, and sizes start commands for
    hosts of at most MAX_HOST_CHARACTERS, so it checks the host again.
    """
    if not msg.host or is_valid_host(msg.host):
        return msg.host
    _warn_once(
        "host",
        msg,
        "node %s.%s.%s reports a host of %d characters that is not 1 to %d of "
        "A-Z a-z 0-9 . - _ :, so its tasks are reached at its node id; fix ACSP_AGENT_HOST "
        "on its agent",
        len(msg.host),
        MAX_HOST_CHARACTERS,
    )
    return ""


def _port_range(msg: agent_pb2.Inventory) -> tuple[int, int] | None:
    """Return the inventory's rendezvous port range, or None for none or an invalid one.

    The scheduler applies the agent's own rule for ACSP_AGENT_RENDEZVOUS_PORTS (ports 1024 to
    65535, low at or below high), because an inventory may come from any agent. A node with
    an invalid range gets the default range, as a node that reports none does.
    """
    low, high = msg.rendezvous_port_min, msg.rendezvous_port_max
    if low == 0 and high == 0:
        # Agents that predate the range report none.
        return None
    try:
        return parse_port_range(f"{low}-{high}")
    except ValueError:
        pass
    _warn_once(
        "ports",
        msg,
        "node %s.%s.%s reports rendezvous ports %d-%d, which is not a range of ports from "
        "1024 to 65535 with the lowest first, so its jobs get ports from the default range "
        "%d-%d; fix ACSP_AGENT_RENDEZVOUS_PORTS on its agent",
        low,
        high,
        *DEFAULT_PORT_RANGE,
    )
    return None


def _warn_once(field: str, msg: agent_pb2.Inventory, text: str, *args: object) -> None:
    """Log ``text`` about ``field`` of the inventory's node once per node and process, because
    every inventory of the node repeats the field. ``text`` starts with the node's three ids."""
    key = (field, msg.node.provider_id, msg.node.region_id, msg.node.node_id)
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(text, *key[1:], *args)


_warned: set[tuple[str, str, str, str]] = set()
"""Fields and nodes of the invalid inventory fields logged; two per node of the fleet at most."""


def accelerator_health(node_key: str, event: agent_pb2.HealthEvent) -> AcceleratorHealth | None:
    """Return the failure or recovery a health event reports for its accelerator, if any.

    ``health`` is the accelerator's state after the event, so a cleared condition recovers it
    only when no other condition keeps it failed.
    """
    if not event.accelerator_id or not event.event_id:
        return None
    failed = event.health == scheduler_pb2.HEALTH_STATE_FAILED
    if failed == event.cleared:
        # No change: a new condition that leaves it working, or a cleared one that leaves it failed.
        return None
    condition = f"XID {event.xid}" if event.condition == "xid" else event.condition
    reason = f"{condition}: {event.message}" if event.message else condition
    return AcceleratorHealth(node_key, event.accelerator_id, failed, event.event_id, reason)


def _checkpoint_seconds(event: agent_pb2.TaskEvent) -> float | None:
    """Return when the agent read the event's checkpoint reference, or None if it has none."""
    if not event.checkpoint_reference or not event.HasField("checkpoint_time"):
        return None
    return event.checkpoint_time.ToNanoseconds() / 1e9


OUTPUT_SUMMARY_LINES = 3
OUTPUT_SUMMARY_CHARS = 400


def output_summary(tail: str) -> str:
    """Return the last lines of a task's output on one line, joined by `` | ``.

    Keeps the last :data:`OUTPUT_SUMMARY_LINES` lines that are not blank and, of a longer
    text, the last :data:`OUTPUT_SUMMARY_CHARS` characters after ``...``.
    """
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    text = " | ".join(lines[-OUTPUT_SUMMARY_LINES:])
    if len(text) > OUTPUT_SUMMARY_CHARS:
        text = "..." + text[-OUTPUT_SUMMARY_CHARS:]
    return text


def task_state_name(value: int) -> str:
    """``TASK_STATE_START_FAILED`` -> ``start_failed``."""
    return agent_pb2.TaskState.Name(value).removeprefix("TASK_STATE_").lower()  # type: ignore[arg-type]


class AgentFeed:
    """Consume agent messages for one shard's loop."""

    def __init__(
        self,
        js: JetStreamContext,
        inbox: asyncio.Queue[Input],
        durable: str,
        fleet: FleetView,
        *,
        commit_timeout_s: float = 20.0,
    ) -> None:
        self._js = js
        self._inbox = inbox
        self._fleet = fleet
        self._running: dict[str, frozenset[str]] = {}
        """Task ids each node listed in its last heartbeat that went through the loop."""
        self._durable = durable
        self._commit_timeout = commit_timeout_s
        self.heartbeats_dropped = 0

    async def run_stream(self, stop: asyncio.Event) -> None:
        """Fetch batches from a durable consumer; ack each after its effects committed.

        Up to ``BATCHES_IN_FLIGHT`` batches wait for their commit at once, so the next batch
        is fetched and queued while the loop commits the one before. Inputs reach the loop in
        the stream's order, because only this task puts them on the inbox.
        """
        config = ConsumerConfig(
            durable_name=self._durable,
            ack_wait=self._commit_timeout * 2,
            max_ack_pending=20_000,
        )
        subscription = await self._js.pull_subscribe(
            "", durable=self._durable, stream=subjects.AGENT_STREAM, config=config
        )
        logger.info("consuming %s as %s", subjects.AGENT_STREAM, self._durable)
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        try:
            async with asyncio.TaskGroup() as settling:
                while not stop.is_set():
                    await slots.acquire()
                    try:
                        messages = await subscription.fetch(FETCH_BATCH, timeout=1.0)
                    except TimeoutError:
                        # nats-py raises its own TimeoutError or asyncio's, by the path taken.
                        slots.release()
                        continue
                    committed = await self._queue(messages)
                    if committed is None:
                        slots.release()
                    else:
                        settling.create_task(self._settle(messages, committed, slots))
        finally:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()

    async def _queue(self, messages: list[Msg]) -> asyncio.Future[None] | None:
        """Put the inputs of ``messages`` on the inbox; return a future set once they commit.

        A message that can never be processed is terminated and removed from ``messages``,
        so the rest of its batch still goes through. Returns None when the batch was nak'ed
        here instead, because the inbox stayed full.
        """
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        remaining = 0

        async def ack() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not committed.done():
                committed.set_result(None)

        inputs: list[Input] = []
        valid: list[Msg] = []
        invalid: list[Msg] = []
        for message in messages:
            try:
                inputs.extend(self._convert(message, ack))
            except InvalidAgentMessage as exc:
                logger.error("terminating an agent message: %s", exc)
                invalid.append(message)
                continue
            valid.append(message)
        if invalid:
            await asyncio.shield(_each(invalid, "term"))
            messages[:] = valid
        remaining = sum(1 for item in inputs if getattr(item, "ack", None) is not None)
        if not remaining:
            committed.set_result(None)
        try:
            # One deadline for the whole batch, so a full inbox cannot stretch the wait past
            # JetStream's ack wait (twice commit_timeout_s).
            async with asyncio.timeout(self._commit_timeout):
                for item in inputs:
                    try:
                        self._inbox.put_nowait(item)
                    except asyncio.QueueFull:
                        await self._inbox.put(item)
        except TimeoutError:
            logger.warning(
                "the loop's inbox stayed full; %d agent messages are redelivered", len(messages)
            )
            await asyncio.shield(_each(messages, "nak"))
            return None
        return committed

    async def _settle(
        self, messages: list[Msg], committed: asyncio.Future[None], slots: asyncio.Semaphore
    ) -> None:
        """Ack ``messages`` once the loop committed their inputs, or nak them after the timeout."""
        try:
            await asyncio.wait_for(committed, timeout=self._commit_timeout)
        except TimeoutError:
            logger.warning(
                "loop did not commit %d agent messages in time; they are redelivered", len(messages)
            )
            await asyncio.shield(_each(messages, "nak"))
            return
        finally:
            slots.release()
        await asyncio.shield(_each(messages, "ack"))

    def _convert(self, message: Msg, ack: object) -> list[Input]:
        subject = message.subject
        try:
            if subject.startswith("acsp.task."):
                event = agent_pb2.TaskEvent.FromString(message.data)
                key = subject.removeprefix("acsp.task.")
                state = task_state_name(event.state)
                text = event.message
                failed = state == "timed_out" or (state == "exited" and event.exit_code != 0)
                summary = output_summary(event.output_tail) if failed else ""
                if summary and summary != text.strip():
                    # The job's reason is all that its owner sees of why it failed. It names
                    # the state already, so a message that only repeats it ("exited") is dropped.
                    if _repeats_state(text, state):
                        text = f"output ends with: {summary}"
                    else:
                        text = f"{text}; output ends with: {summary}"
                return [
                    TaskReported(
                        key,
                        event.task_id,
                        state,
                        event.exit_code,
                        text,
                        ack,  # type: ignore[arg-type]
                        event.checkpoint_reference,
                        _checkpoint_seconds(event),
                        node_busy=(
                            event.state == agent_pb2.TASK_STATE_START_FAILED
                            and event.start_rejection == agent_pb2.START_REJECTION_NODE_BUSY
                        ),
                    )
                ]
            if subject.startswith("acsp.inventory."):
                inventory = agent_pb2.Inventory.FromString(message.data)
                view = node_from_inventory(inventory)
                return [InventoryReceived(view, message.data, ack)]  # type: ignore[arg-type]
            if subject.startswith("acsp.health."):
                return self._health(agent_pb2.HealthEvent.FromString(message.data), ack)
        except (DecodeError, ValueError) as exc:
            raise InvalidAgentMessage(f"malformed agent message on {subject}: {exc}") from exc
        logger.warning("ignoring agent message on unexpected subject %s", subject)
        return []

    def _health(self, event: agent_pb2.HealthEvent, ack: object) -> list[Input]:
        ref = event.node
        key = f"{ref.provider_id}.{ref.region_id}.{ref.node_id}"
        inputs: list[Input] = []
        if event.action == agent_pb2.HEALTH_ACTION_DRAIN_NODE and not event.cleared:
            logger.warning("node %s asks to be drained: %s %s", key, event.condition, event.message)
            reason = f"health: {event.condition} {event.message}"
            sent_at = _seconds(event.time) if event.HasField("time") else 0.0
            inputs.append(AgentDrainRequested(key, reason, sent_at, ack))  # type: ignore[arg-type]
        change = accelerator_health(key, event)
        if change is not None:
            inputs.append(AcceleratorHealthReported(change, ack))  # type: ignore[arg-type]
        elif not inputs:
            logger.info("health event on %s: %s (%s)", key, event.condition, event.message)
        return inputs

    async def run_heartbeats(self, stop: asyncio.Event, client: Client) -> None:
        """Replay the heartbeat bucket, then follow new heartbeats on the bucket's subjects.

        New heartbeats come through a plain subscription whose callback applies each one as it
        is taken from the subscription's queue. A KV watch or ``next_msg`` awaits one heartbeat
        at a time, which costs an event loop iteration each. While this process was busy, that
        let through a few heartbeats a second of the hundreds sent, and live nodes looked
        silent. Only a node's latest heartbeat matters, so nothing needs the watch's order.
        The latest heartbeat of each node that arrives during the replay is held and applied
        after it with its arrival time, so the hold grows with the fleet, not with the
        replay's length. Heartbeats are dropped, counted, when the loop lags.
        """
        prefix = f"$KV.{subjects.HEARTBEAT_BUCKET}."
        during_replay: dict[str, tuple[bytes, float]] = {}
        replaying = True

        async def receive(message: Msg) -> None:
            if not message.data or not message.subject.startswith(prefix):
                return
            key = message.subject[len(prefix) :]
            if replaying:
                during_replay[key] = (message.data, time.time())
            else:
                self._heartbeat(key, message.data)

        live = await client.subscribe(
            f"{prefix}>", cb=receive, pending_msgs_limit=LIVE_HEARTBEATS_PENDING
        )
        try:
            await self._replay_heartbeats(stop)
            for key, (value, received_at) in during_replay.items():
                self._heartbeat(key, value, received_at)
            during_replay.clear()
            replaying = False
            await stop.wait()
        finally:
            with contextlib.suppress(NatsError):
                await live.unsubscribe()

    async def _replay_heartbeats(self, stop: asyncio.Event) -> None:
        """Queue the heartbeats stored in the bucket before this call, with their store times.

        An ordered consumer delivers each key's latest value to a callback, which applies it as
        nats-py takes it from the subscription's queue. A KV watch hands over one value per
        event loop iteration, so with the loop busy, a large bucket's replay took that many
        iterations while every live heartbeat was held back. The replay ends at the first
        value delivered with nothing pending after it, as the KV watch of nats-py 2.16 does.
        """
        prefix = f"$KV.{subjects.HEARTBEAT_BUCKET}."
        replayed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if not replayed.done():
                replayed.set_result(True)

        async def receive(message: Msg) -> None:
            metadata = message.metadata
            try:
                if message.data and message.subject.startswith(prefix):
                    key = message.subject[len(prefix) :]
                    self._replayed_heartbeat(key, message.data, metadata.timestamp)
            finally:
                # nats-py passes an error raised here to the error callback, and the replay
                # must still end.
                if metadata.num_pending == 0:
                    finish()

        stored = await self._js.subscribe(
            f"{prefix}>",
            stream=f"KV_{subjects.HEARTBEAT_BUCKET}",
            cb=receive,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        stopped: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        try:
            info = await stored.consumer_info()
            sent = info.delivered.consumer_seq if info.delivered is not None else 0
            if info.num_pending == 0 and not sent:
                # Nothing is stored, so no value comes to end the replay. The server's count
                # decides because its reply may arrive before a value it sent earlier.
                finish()
            await asyncio.wait([replayed, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            with contextlib.suppress(NatsError):
                await stored.unsubscribe()

    def _heartbeat(self, key: str, value: bytes, received_at: float | None = None) -> None:
        """Apply or queue a live heartbeat received at ``received_at`` (default: now)."""
        beat = _decode_heartbeat(key, value)
        if beat is None:
            return
        running = frozenset(beat.running_task_ids)
        drain = _drain_requested(beat)
        # Most heartbeats change nothing but the time; they skip the loop's queue.
        now = time.time() if received_at is None else received_at
        if self._running.get(key) == running and self._fleet.touch(key, now, drain):
            return
        self._fleet.heard(key, now)
        item = HeartbeatReceived(
            key, beat.boot_id, running, drain, agent_time=_beat_time(beat), received_at=now
        )
        # The task list of a node that is not in the fleet, because its inventory has not
        # arrived yet or because it was deleted, is not remembered. So the node's first
        # heartbeat after its inventory goes through the loop.
        # NOTE: heartbeats never register a node, so a deleted node whose agent keeps running
        # stays out of the fleet until the agent restarts or reconnects and sends an inventory.
        if self._put(item):
            if key in self._fleet:
                self._running[key] = running
            else:
                self._running.pop(key, None)

    def _replayed_heartbeat(self, key: str, value: bytes, stored: object) -> None:
        """Queue a heartbeat stored before the watch began, with the time it was stored.

        JetStream's store time comes from the NATS server's clock, which is usually closer to
        the scheduler's than an agent's clock is. The agent's send time is used where the entry
        has none. The next live heartbeat of the node goes through the loop, after this one.

        NOTE: a NATS server clock behind the scheduler's by more than the heartbeat timeout
        makes a live node's stored heartbeat look overdue, so the node is unknown until its
        next heartbeat.
        """
        beat = _decode_heartbeat(key, value)
        if beat is None:
            return
        agent_time = _beat_time(beat)
        sent_at = stored.timestamp() if isinstance(stored, datetime) else agent_time
        running = frozenset(beat.running_task_ids)
        drain = _drain_requested(beat)
        self._put(HeartbeatReceived(key, beat.boot_id, running, drain, True, sent_at, agent_time))

    def _put(self, item: HeartbeatReceived) -> bool:
        """Queue ``item``, or drop and count it if the inbox is full. Return True if queued."""
        try:
            self._inbox.put_nowait(item)
        except asyncio.QueueFull:
            self.heartbeats_dropped += 1
            if self.heartbeats_dropped % HEARTBEAT_DROP_LOG_EVERY == 1:
                logger.warning(
                    "scheduling loop is behind: %d heartbeats dropped", self.heartbeats_dropped
                )
            return False
        return True


def _drain_requested(beat: agent_pb2.Heartbeat) -> bool | None:
    """Return True for a drain request, False for a ready agent, None for any other state."""
    if beat.state == agent_pb2.AGENT_NODE_STATE_DRAIN_REQUESTED:
        return True
    if beat.state == agent_pb2.AGENT_NODE_STATE_READY:
        return False
    return None


def _beat_time(beat: agent_pb2.Heartbeat) -> float:
    return _seconds(beat.time) if beat.HasField("time") else 0.0


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _decode_heartbeat(key: str, value: bytes) -> agent_pb2.Heartbeat | None:
    try:
        return agent_pb2.Heartbeat.FromString(value)
    except DecodeError:
        logger.warning("ignoring malformed heartbeat under key %s", key)
        return None


def _repeats_state(message: str, state: str) -> bool:
    """Return whether an agent's task message is empty or only the name of ``state``."""
    words = message.strip().replace("_", " ")
    return words in ("", state.replace("_", " "))
