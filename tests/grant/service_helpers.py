"""A grant service running in-process on a free port, and clients with minted tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from acsp.v1 import grant_pb2_grpc
from services.grant.service import build_service
from services.grant.settings import GrantSettings
from services.runtime.auth import generate_signing_key, load_signing_key, mint_token
from tests.grant.conftest import TEST_DSN


@dataclass
class RunningGrant:
    address: str
    key: Ed25519PrivateKey
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(
        self, subject: str, roles: list[str], institution: str | None = None
    ) -> grant_pb2_grpc.GrantServiceStub:
        token = mint_token(self.key, subject, roles, institution=institution)
        channel = grpc.aio.insecure_channel(self.address)
        self.channels.append(channel)
        return _AuthStub(grant_pb2_grpc.GrantServiceStub(channel), token)  # type: ignore[return-value]


class _AuthStub:
    """Wrap a stub so every call carries the bearer token and a deadline."""

    def __init__(self, stub: grant_pb2_grpc.GrantServiceStub, token: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str) -> object:
        method = getattr(self._stub, name)

        def call(request: object, timeout: float = 20.0) -> object:
            return method(request, metadata=self._metadata, timeout=timeout)

        return call


@asynccontextmanager
async def running_grant(
    schema: str, data_dir: Path, extra: Mapping[str, str] | None = None
) -> AsyncIterator[RunningGrant]:
    private, public = generate_signing_key(data_dir)
    environ = {
        "ACSP_DATABASE_URL": TEST_DSN,
        "ACSP_GRPC_LISTEN": "127.0.0.1:0",
        "ACSP_TOKEN_PUBLIC_KEY": str(public),
        "ACSP_DATA_DIR": str(data_dir),
        **(extra or {}),
    }
    service = build_service(GrantSettings.from_env(environ), schema=schema)
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()
        raise TimeoutError("the grant service did not start within 30 s")
    running = RunningGrant(service.address, load_signing_key(private))
    try:
        yield running
    finally:
        for channel in running.channels:
            await channel.close()
        service.stop(grace_s=2)
        await asyncio.wait_for(task, timeout=30)
