"""Publishes that the connection's NATS user may not make are rejected for good.

The unit tests run without network. The others run a nats-server of their own, whose one user
may not publish to one subject that a stream captures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import nats
import pytest
from nats.js import JetStreamContext

from services.runtime import denied_subjects
from services.runtime.denied_subjects import DeniedSubjects
from services.runtime.jetstream import Publisher
from services.runtime.nats import TlsCheckingClient
from services.runtime.publish_errors import (
    Message,
    Outcome,
    PublishViolations,
    publish_violations,
    reject_unpermitted,
    wait_for_acks,
)
from tests.agent.natsserver import (
    LIMITED_PASSWORD,
    LIMITED_USER,
    NatsServer,
    connect_limited,
    start_denying_server,
    stored_message_ids,
)

pytestmark = pytest.mark.timeout(120)

STREAM = "GUARDED"
ALLOWED = "guarded.open"
DENIED = "guarded.Closed"
"""A denied subject with a capital letter, which nats-py reports lowercased."""


def violation(subject: str) -> Exception:
    """Return the error that nats-py 2.16 passes to the error callback for a denied publish."""
    return nats.errors.Error(f'nats: permissions violation for publish to "{subject.lower()}"')


def context_with(violations: PublishViolations) -> JetStreamContext:
    """Return a stand-in JetStream context whose connection keeps ``violations``."""
    return cast(
        JetStreamContext, SimpleNamespace(_nc=SimpleNamespace(publish_violations=violations))
    )


# Without network.


def test_violation_recorded_by_subject() -> None:
    violations = PublishViolations()
    before = time.monotonic()

    assert violations.record(violation(DENIED))

    assert violations.reported_since(DENIED, before)
    assert not violations.reported_since(ALLOWED, before)
    assert not violations.reported_since(DENIED, time.monotonic() + 1)


def test_other_errors_not_recorded() -> None:
    violations = PublishViolations()

    subscription = 'nats: permissions violation for subscription to "guarded.open"'
    assert not violations.record(nats.errors.Error(subscription))
    assert not violations.record(nats.errors.StaleConnectionError())

    assert len(violations) == 0


def test_violations_keep_newest_subjects() -> None:
    violations = PublishViolations(max_subjects=2)
    for subject in ("a.one", "a.two", "a.one", "a.three"):
        violations.record(violation(subject))

    assert len(violations) == 2
    assert violations.reported_since("a.one", 0.0)
    assert violations.reported_since("a.three", 0.0)
    assert not violations.reported_since("a.two", 0.0)


def test_reject_unpermitted_only_unanswered_after_send() -> None:
    violations = PublishViolations()
    violations.record(violation("old.subject"))
    sent_at = time.monotonic()
    violations.record(violation(DENIED))
    messages: list[Message] = [
        (DENIED, b"x", "m1"),
        (DENIED, b"x", "m2"),
        ("old.subject", b"x", "m3"),
        (ALLOWED, b"x", "m4"),
        (DENIED, b"x", "m5"),
    ]
    outcomes: list[Outcome | None] = [False, True, False, False, False]

    reject_unpermitted(context_with(violations), outcomes, messages, range(4), sent_at)

    assert isinstance(outcomes[0], str)
    assert "permissions violation for publish" in outcomes[0]
    assert f"m1 of 1 bytes on {DENIED}" in outcomes[0]
    assert outcomes[1] is True
    # Reported before the send, as when an operator has granted the subject since.
    assert outcomes[2] is False
    assert outcomes[3] is False
    # Not among the messages sent.
    assert outcomes[4] is False


def test_plain_client_keeps_no_violations() -> None:
    stand_in = cast(JetStreamContext, SimpleNamespace(_nc=SimpleNamespace()))

    assert publish_violations(stand_in) is None


async def test_cancelled_ack_wait_leaves_nothing() -> None:
    # The agent's outbox cancels the wait at its wave's deadline.
    violations = PublishViolations()
    loop = asyncio.get_running_loop()
    futures = {0: loop.create_future(), 1: loop.create_future()}
    messages: list[Message] = [(ALLOWED, b"x", "m1"), (DENIED, b"x", "m2")]

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await wait_for_acks(context_with(violations), futures, messages, 30.0, 0.0)

    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert all(not future.done() for future in futures.values())
    for future in futures.values():
        future.set_result(None)
    await asyncio.sleep(0)
    assert not violations._waiters


async def test_ack_wait_ends_on_denied() -> None:
    violations = PublishViolations()
    violations.record(violation(ALLOWED))  # before the wave, so it does not end the wait
    sent_at = time.monotonic()
    loop = asyncio.get_running_loop()
    futures = {i: loop.create_future() for i in range(3)}
    messages: list[Message] = [(DENIED, b"x", "m1"), (ALLOWED, b"x", "m2"), (DENIED, b"x", "m3")]
    loop.call_later(0.05, violations.record, violation(DENIED))
    loop.call_later(0.2, futures[1].set_result, None)

    began = time.monotonic()
    await wait_for_acks(context_with(violations), futures, messages, 30.0, sent_at)

    assert futures[1].done()
    assert not futures[0].done()
    assert not futures[2].done()
    assert time.monotonic() - began < 10.0


async def test_ack_wait_keeps_case_variant() -> None:
    # nats-py lowercases the report, so it may be about either subject: both keep waiting.
    violations = PublishViolations()
    sent_at = time.monotonic()
    loop = asyncio.get_running_loop()
    futures = {i: loop.create_future() for i in range(2)}
    messages: list[Message] = [(DENIED, b"x", "m1"), (DENIED.lower(), b"x", "m2")]
    violations.record(violation(DENIED))
    loop.call_later(0.1, futures[1].set_result, None)

    await wait_for_acks(context_with(violations), futures, messages, 30.0, sent_at)

    assert futures[1].done()
    assert not futures[0].done()


# Against a nats-server.


@pytest.fixture
async def guarded_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = await start_denying_server(tmp_path, STREAM, ["guarded.>"], [DENIED])
    yield server
    server.stop()


async def test_error_callback_sees_recorded_violation(guarded_nats: NatsServer) -> None:
    reported: list[Exception] = []
    any_reported = asyncio.Event()

    async def report(error: Exception) -> None:
        reported.append(error)
        any_reported.set()

    client = TlsCheckingClient(require_tls=False)
    await client.connect(
        servers=[guarded_nats.url],
        connect_timeout=5,
        user=LIMITED_USER,
        password=LIMITED_PASSWORD,
        error_cb=report,
    )
    try:
        sent_at = time.monotonic()
        await client.publish(DENIED, b"x")
        await asyncio.wait_for(any_reported.wait(), 10)
    finally:
        await client.close()

    assert "permissions violation for publish" in str(reported[0])
    assert client.publish_violations.reported_since(DENIED, sent_at)


async def test_denied_message_rejected_others_stored(guarded_nats: NatsServer) -> None:
    batch: list[Message] = [(ALLOWED, b"x", "m1"), (DENIED, b"x", "m2"), (ALLOWED, b"x", "m3")]
    client = await connect_limited(guarded_nats)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
        outcomes = await publisher.publish_batch(batch)
        stored = await stored_message_ids(client.jetstream(), STREAM)
    finally:
        await client.close()

    assert outcomes[0] is True
    assert outcomes[2] is True
    reason = outcomes[1]
    assert isinstance(reason, str)
    assert "permissions violation for publish" in reason
    assert "grant that user" in reason
    assert f"m2 of 1 bytes on {DENIED}" in reason
    assert stored == ["m1", "m3"]


async def test_denied_messages_counted_and_logged_once(
    guarded_nats: NatsServer, denied: DeniedSubjects, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, denied_subjects.__name__)
    client = await connect_limited(guarded_nats)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=5.0)
        first = await publisher.publish_batch([(DENIED, b"x", "m1"), (DENIED, b"x", "m2")])
        second = await publisher.publish_batch([(DENIED, b"x", "m3")])
    finally:
        await client.close()

    assert all(isinstance(outcome, str) for outcome in [*first, *second])
    assert denied.total == 3
    lines = [r.getMessage() for r in caplog.records if r.name == denied_subjects.__name__]
    # The first batch's line is the only one within the log spacing, with the fix in it.
    assert len([line for line in lines if DENIED in line]) == 1
    assert "grant that user" in lines[-1]


async def test_denied_message_rejected_before_ack_timeout(guarded_nats: NatsServer) -> None:
    batch: list[Message] = [(ALLOWED, b"x", "m1"), (DENIED, b"x", "m2")]
    client = await connect_limited(guarded_nats)
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=30.0)
        began = time.monotonic()
        outcomes = await publisher.publish_batch(batch)
        took = time.monotonic() - began
    finally:
        await client.close()

    assert outcomes[0] is True
    assert isinstance(outcomes[1], str)
    assert "permissions violation for publish" in outcomes[1]
    # The server's report ends the wait, not the 30 s ack timeout.
    assert took < 10.0


async def test_denied_message_retried_by_plain_client(guarded_nats: NatsServer) -> None:
    # A client that records no violations cannot tell a denied publish from a lost ack.
    client = await nats.connect(
        guarded_nats.url, connect_timeout=5, user=LIMITED_USER, password=LIMITED_PASSWORD
    )
    try:
        publisher = Publisher(client.jetstream(), ack_timeout_s=1.0)
        outcomes = await publisher.publish_batch([(DENIED, b"x", "m1")])
    finally:
        await client.close()

    assert outcomes == [False]
