"""Provider credentials on a real hub cluster and leaf node rendered from the templates.

Three hub servers (JetStream domain ``hub``, streams with three replicas) and one leaf node for
provider alpha, region r1, all on free loopback ports with TLS from a throwaway CA
(``tests/deploy/nats_mesh.py``, shared through the ``mesh`` fixture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from acsp import subjects
from tests.deploy.nats_mesh import AGENT_PASSWORD, PASSWORDS, ErrorList, Mesh
from tests.deploy.nats_mesh import connect as _connect


async def _wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def _as_scheduler(mesh: Mesh, action: Callable[[Client], Awaitable[object]]) -> object:
    nc = await _connect(mesh, mesh.hub_urls, "scheduler", PASSWORDS["scheduler"], "_INBOX")
    try:
        return await action(nc)
    finally:
        await nc.close()


async def _stream_has_subject(mesh: Mesh, stream: str, subject: str) -> bool:
    async def lookup(nc: Client) -> bool:
        try:
            await nc.jetstream().get_last_msg(stream, subject)
        except NotFoundError:
            return False
        return True

    return bool(await _as_scheduler(mesh, lookup))


async def test_provider_publishes_usage_on_own_subject(mesh: Mesh) -> None:
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha")
    try:
        ack = await nc.jetstream(timeout=5).publish(
            subjects.usage_subject("alpha", "r1", "n1"), b"sample"
        )
    finally:
        await nc.close()
    assert ack.stream == subjects.USAGE_STREAM
    assert await _stream_has_subject(mesh, subjects.USAGE_STREAM, "acsp.usage.alpha.r1.n1")


async def test_provider_cannot_publish_other_provider_subject(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha", errors)
    try:
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await nc.jetstream(timeout=1).publish(
                subjects.usage_subject("beta", "r1", "n1"), b"forged"
            )
        violation = 'permissions violation for publish to "acsp.usage.beta.r1.n1"'
        assert await _wait_until(lambda: any(violation in error for error in errors)), errors
    finally:
        await nc.close()
    assert not await _stream_has_subject(mesh, subjects.USAGE_STREAM, "acsp.usage.beta.r1.n1")


async def test_provider_cannot_publish_commands(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha", errors)
    try:
        await nc.publish(subjects.command_subject("alpha", "r1", "n1"), b"forged")
        await nc.flush(timeout=2)
        assert await _wait_until(lambda: any("acsp.cmd.alpha" in error for error in errors))
    finally:
        await nc.close()


async def test_provider_heartbeat_put_limited_to_own_keys(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha", errors)
    try:
        kv = await nc.jetstream(timeout=2).key_value(subjects.HEARTBEAT_BUCKET)
        revision = await kv.put(subjects.heartbeat_key("alpha", "r1", "n1"), b"alive")
        assert revision >= 1
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await kv.put(subjects.heartbeat_key("beta", "r1", "n1"), b"forged")
    finally:
        await nc.close()
    assert any("$kv.acsp_heartbeat.beta.r1.n1" in error.lower() for error in errors), errors


async def test_provider_cannot_subscribe_other_deliver_subject(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha", errors)
    try:
        await nc.subscribe("acsp.deliver.beta.r1.n1")
        await nc.flush(timeout=2)
        violation = 'permissions violation for subscription to "acsp.deliver.beta.r1.n1"'
        assert await _wait_until(lambda: any(violation in error for error in errors)), errors
    finally:
        await nc.close()


async def test_provider_rejected_on_shared_inbox(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX", errors)
    try:
        with pytest.raises(TimeoutError):
            await nc.jetstream(timeout=1).publish(
                subjects.usage_subject("alpha", "r1", "n2"), b"sample"
            )
        assert any('subscription to "_inbox.' in error.lower() for error in errors), errors
    finally:
        await nc.close()


async def test_leaf_agent_publishes_and_puts_heartbeat(mesh: Mesh) -> None:
    nc = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha")
    try:
        js = nc.jetstream(timeout=5)
        ack = await js.publish(subjects.inventory_subject("alpha", "r1", "n7"), b"inventory")
        assert ack.stream == subjects.AGENT_STREAM
        assert ack.domain == "hub"
        kv = await js.key_value(subjects.HEARTBEAT_BUCKET)
        assert await kv.put(subjects.heartbeat_key("alpha", "r1", "n7"), b"alive") >= 1
    finally:
        await nc.close()
    stored = await _as_scheduler(
        mesh,
        lambda hub: _kv_get(hub, subjects.heartbeat_key("alpha", "r1", "n7")),
    )
    assert stored == b"alive"


async def test_scheduler_subscription_hears_leaf_heartbeat(mesh: Mesh) -> None:
    """The scheduler follows heartbeats on the bucket's subjects, and a leaf agent's reach it."""
    key = subjects.heartbeat_key("alpha", "r1", "n8")
    received: list[Msg] = []

    async def receive(message: Msg) -> None:
        received.append(message)

    scheduler = await _connect(mesh, mesh.hub_urls, "scheduler", PASSWORDS["scheduler"], "_INBOX")
    agent = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha")
    try:
        await scheduler.subscribe(f"$KV.{subjects.HEARTBEAT_BUCKET}.>", cb=receive)
        await scheduler.flush()
        # Interest crosses the leaf connection a moment after the subscription, so the agent
        # sends until one arrives, as it does every heartbeat interval.
        for _ in range(50):
            await agent.publish(f"$KV.{subjects.HEARTBEAT_BUCKET}.{key}", b"alive")
            await agent.flush()
            if await _wait_until(lambda: bool(received), timeout_s=0.2):
                break
    finally:
        await agent.close()
        await scheduler.close()
    assert received
    assert received[0].subject == f"$KV.{subjects.HEARTBEAT_BUCKET}.{key}"
    assert received[0].data == b"alive"


async def _kv_get(nc: Client, key: str) -> bytes | None:
    kv = await nc.jetstream().key_value(subjects.HEARTBEAT_BUCKET)
    return (await kv.get(key)).value


@pytest.mark.parametrize(
    "subject",
    ["acsp.usage.alpha.r2.n1", "acsp.usage.beta.r1.n1", "acsp.cmd.alpha.r1.n1"],
    ids=["other-region", "other-provider", "command"],
)
async def test_leaf_agent_cannot_publish_outside_region(mesh: Mesh, subject: str) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha", errors)
    try:
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await nc.jetstream(timeout=1).publish(subject, b"forged")
        assert await _wait_until(lambda: any(subject in error for error in errors)), errors
    finally:
        await nc.close()
    stream = subjects.COMMAND_STREAM if subject.startswith("acsp.cmd.") else subjects.USAGE_STREAM
    assert not await _stream_has_subject(mesh, stream, subject)


async def test_leaf_agent_receives_and_acks_command(mesh: Mesh) -> None:
    deliver = "acsp.deliver.alpha.r1.n9"
    command = subjects.command_subject("alpha", "r1", "n9")

    async def create_consumer(hub: Client) -> object:
        js = hub.jetstream()
        await js.add_consumer(
            subjects.COMMAND_STREAM,
            ConsumerConfig(
                durable_name="alpha_r1_n9",
                deliver_subject=deliver,
                filter_subject=command,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
            ),
        )
        return await js.publish(command, b"start job 1")

    await _as_scheduler(mesh, create_consumer)
    nc = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha")
    received: asyncio.Queue[Msg] = asyncio.Queue(maxsize=10)
    try:
        await nc.subscribe(deliver, cb=received.put)
        message = await asyncio.wait_for(received.get(), timeout=10)
        assert message.data == b"start job 1"
        await message.ack()
        await nc.flush(timeout=2)
    finally:
        await nc.close()

    async def pending(hub: Client) -> int:
        info = await hub.jetstream().consumer_info(subjects.COMMAND_STREAM, "alpha_r1_n9")
        return info.num_ack_pending

    deadline = time.monotonic() + 5
    while await _as_scheduler(mesh, pending) != 0:
        assert time.monotonic() < deadline, "the agent's ack did not reach the hub"
        await asyncio.sleep(0.1)


async def test_leaf_agent_creates_own_push_consumer(mesh: Mesh) -> None:
    deliver = "acsp.deliver.alpha.r1.n5"
    command = subjects.command_subject("alpha", "r1", "n5")
    nc = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha")
    received: asyncio.Queue[Msg] = asyncio.Queue(maxsize=10)
    try:
        await nc.subscribe(deliver, cb=received.put)
        # name= makes nats-py send the create request on the subject that ends with the
        # filter subject, which is what the permissions restrict.
        await nc.jetstream(timeout=5).add_consumer(
            subjects.COMMAND_STREAM,
            ConsumerConfig(
                name="agent-alpha-r1-n5",
                durable_name="agent-alpha-r1-n5",
                filter_subject=command,
                deliver_subject=deliver,
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        await _as_scheduler(mesh, lambda hub: hub.jetstream().publish(command, b"start job 5"))
        message = await asyncio.wait_for(received.get(), timeout=10)
        assert message.data == b"start job 5"
        await message.ack()
    finally:
        await nc.close()


async def test_leaf_agent_cannot_create_consumer_for_others(mesh: Mesh) -> None:
    nc = await _connect(mesh, [mesh.leaf_url], "agent", AGENT_PASSWORD, "_INBOX.alpha")
    try:
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await nc.jetstream(timeout=1).add_consumer(
                subjects.COMMAND_STREAM,
                ConsumerConfig(
                    name="stolen-beta",
                    durable_name="stolen-beta",
                    filter_subject=subjects.command_subject("beta", "r1", "n1"),
                    deliver_subject="acsp.deliver.alpha.r1.stolen",
                    ack_policy=AckPolicy.EXPLICIT,
                ),
            )
    finally:
        await nc.close()

    async def consumer_names(hub: Client) -> list[str]:
        infos = await hub.jetstream().consumers_info(subjects.COMMAND_STREAM)
        return [info.name for info in infos]

    names = await _as_scheduler(mesh, consumer_names)
    assert isinstance(names, list)
    assert "stolen-beta" not in names


async def test_provider_cannot_pull_other_consumer(mesh: Mesh) -> None:
    errors: ErrorList = []
    nc = await _connect(mesh, mesh.hub_urls, "alpha", PASSWORDS["alpha"], "_INBOX.alpha", errors)
    try:
        with pytest.raises((TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(
                f"$JS.API.CONSUMER.MSG.NEXT.{subjects.COMMAND_STREAM}.agent-beta-r1-n1",
                b'{"batch": 1}',
                timeout=1,
            )
        assert await _wait_until(lambda: any("consumer.msg.next" in e.lower() for e in errors))
    finally:
        await nc.close()
