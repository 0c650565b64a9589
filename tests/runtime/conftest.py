"""Fixtures for the runtime tests: signing keys, a running sample service, a fresh schema."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import wrappers_pb2

from services.runtime import Role, Service, Settings, mint_token, publish_errors
from services.runtime.auth import generate_signing_key, load_signing_key
from services.runtime.channel import open_channel
from services.runtime.db import quote_ident
from services.runtime.denied_subjects import DeniedSubjects
from tests.runtime.sample_service import SERVICE_NAME, SampleServicer, build_service

TEST_DSN = os.environ.get("ACSP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEST_NATS_URL = os.environ.get("ACSP_TEST_NATS_URL", "nats://127.0.0.1:4222")
START_TIMEOUT_S = 20.0


async def poll_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` is true, checking every 50 ms; raise TimeoutError after."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Keys:
    """A token key pair in a temporary data dir."""

    data_dir: Path
    private_path: Path
    public_path: Path
    private_key: Ed25519PrivateKey

    def token(self, *roles: Role, subject: str = "alice", **claims: str) -> str:
        return mint_token(self.private_key, subject, list(roles), **claims)  # type: ignore[arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    private_path, public_path = generate_signing_key(tmp_path)
    return Keys(tmp_path, private_path, public_path, load_signing_key(private_path))


@dataclass
class RunningSample:
    """The sample service running in this event loop, and a channel to it."""

    service: Service
    servicer: SampleServicer
    channel: grpc.aio.Channel

    def unary(self, method: str, request_type: Any, response_type: Any) -> Callable:
        return self.channel.unary_unary(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    def who_am_i(self) -> Callable:
        return self.unary("WhoAmI", wrappers_pb2.StringValue, wrappers_pb2.StringValue)


SampleFactory = Callable[..., Awaitable[RunningSample]]


@pytest.fixture
async def sample_factory(keys: Keys) -> AsyncIterator[SampleFactory]:
    """Start sample services with extra ``ACSP_*`` variables; stop them all afterwards."""
    started: list[tuple[Service, asyncio.Task[None], grpc.aio.Channel]] = []

    async def start(**environ: str) -> RunningSample:
        env = {"ACSP_TOKEN_PUBLIC_KEY": str(keys.public_path), **environ}
        servicer = SampleServicer()
        service = build_service(Settings.from_env(env), servicer)
        task = asyncio.create_task(service.run(), name="sample service")
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait(
            {task, ready}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            ready.cancel()
            task.result()  # raises the startup error
        assert ready in done, "sample service did not start in time"
        channel = open_channel(service.address)
        started.append((service, task, channel))
        return RunningSample(service, servicer, channel)

    yield start
    for service, task, channel in started:
        await channel.close()
        service.stop(grace_s=1.0)
        await asyncio.wait_for(task, timeout=START_TIMEOUT_S)


@pytest.fixture
async def sample(sample_factory: SampleFactory) -> RunningSample:
    """One sample service without TLS, verifying tokens from ``keys``."""
    return await sample_factory()


@pytest.fixture
async def fresh_schema() -> AsyncIterator[str]:
    """A schema name unique to this test, dropped afterwards."""
    name = f"runtime_test_{uuid.uuid4().hex[:12]}"
    yield name
    connection = await asyncpg.connect(TEST_DSN, timeout=10)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")
    finally:
        await connection.close()


@pytest.fixture
def denied(monkeypatch: pytest.MonkeyPatch) -> DeniedSubjects:
    """Return empty counts of denied subjects that the publishers use in place of the shared
    ones, so that no earlier test's log line holds back a test's own."""
    counts = DeniedSubjects()
    monkeypatch.setattr(publish_errors, "DENIED_SUBJECTS", counts)
    return counts
