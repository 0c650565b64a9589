"""The acsp Python SDK: typed clients for the grant, scheduler and metering services.

Build a client from a running local mesh (``acsp up`` wrote its mesh file)::

    from acsp.client import Client

    with Client.from_mesh(token=my_token) as client:
        balance = client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g-1"))
        job = client.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id="j-1"), timeout=2)

or in asyncio code with :class:`AsyncClient` (``await client.grants.GetBalance(...)``).
Each attribute is the generated stub of one service, so every RPC of the contract is there
with its request and response types. Every call has a deadline (the client's default, or
``timeout=`` per call), carries the caller's token over mutual TLS, and is retried on
UNAVAILABLE only if it is idempotent: a read, a call whose request has a ``request_id`` (filled
with a fresh UUID when empty), or a batched call (``PlaceHolds``, ``ReleaseHolds``,
``CommitCharges``, ``SubmitJobs``) in which every item has a non-empty ``request_id``. The
SDK leaves empty item ids empty, so set them to make a batched call retried (see
:mod:`acsp._channel`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import grpc
import grpc.aio

from acsp._channel import (
    DEFAULT_TIMEOUT_S,
    Credentials,
    open_async_channel,
    open_channel,
)
from acsp.mesh.endpoints import MeshInfo, load_mesh
from acsp.v1 import (
    grant_pb2,
    grant_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

TOKEN_ENV: Final = "ACSP_TOKEN"
"""Environment variable with the bearer token that :meth:`Client.from_mesh` uses by default."""

_DESCRIPTORS: Final = {
    "grant": grant_pb2.DESCRIPTOR.services_by_name["GrantService"],
    "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
    "metering": metering_pb2.DESCRIPTOR.services_by_name["MeteringService"],
}


def _token_from_env(token: str | None) -> str | None:
    if token is not None:
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _mesh_credentials(info: MeshInfo, token: str | None) -> Credentials:
    return Credentials.from_files(
        ca_cert=info.ca_cert,
        token=_token_from_env(token),
        client_cert=info.client_cert,
        client_key=info.client_key,
    )


class AsyncClient:
    """asyncio client: ``grants``, ``scheduler`` and ``metering`` are the generated stubs."""

    grants: grant_pb2_grpc.GrantServiceStub
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub
    metering: metering_pb2_grpc.MeteringServiceStub

    def __init__(
        self,
        endpoints: Mapping[str, str],
        credentials: Credentials,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_for_ready: bool = True,
    ) -> None:
        """Open one channel per service; ``endpoints`` maps each service name to host:port.

        With ``wait_for_ready`` (the default) a call to a service that is restarting waits for
        it within the call's deadline. Pass False to fail at once instead, as a command line
        tool does.
        """
        self._channels: dict[str, grpc.aio.Channel] = {}
        for name, descriptor in _DESCRIPTORS.items():
            if name not in endpoints:
                raise ValueError(f"no endpoint given for the {name} service")
            self._channels[name] = open_async_channel(
                endpoints[name],
                credentials,
                services=[descriptor],
                timeout_s=timeout_s,
                wait_for_ready=wait_for_ready,
            )
        self.grants = grant_pb2_grpc.GrantServiceStub(self._channels["grant"])
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channels["scheduler"])
        self.metering = metering_pb2_grpc.MeteringServiceStub(self._channels["metering"])

    @classmethod
    def from_mesh(
        cls,
        mesh: MeshInfo | Path | None = None,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_for_ready: bool = True,
    ) -> AsyncClient:
        """Connect to a local mesh: its info, its data dir, or the default data dir.

        ``token`` defaults to ``$ACSP_TOKEN``; without one, calls other than health checks
        fail with UNAUTHENTICATED.
        """
        info = mesh if isinstance(mesh, MeshInfo) else load_mesh(mesh)
        return cls(
            info.endpoints,
            _mesh_credentials(info, token),
            timeout_s=timeout_s,
            wait_for_ready=wait_for_ready,
        )

    async def close(self, grace_s: float | None = None) -> None:
        """Close every channel; calls still running get ``grace_s`` seconds, or are cancelled."""
        for channel in self._channels.values():
            await channel.close(grace_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Client:
    """Blocking client: ``grants``, ``scheduler`` and ``metering`` are the generated stubs."""

    grants: grant_pb2_grpc.GrantServiceStub
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub
    metering: metering_pb2_grpc.MeteringServiceStub

    def __init__(
        self,
        endpoints: Mapping[str, str],
        credentials: Credentials,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_for_ready: bool = True,
    ) -> None:
        """Open one channel per service; ``endpoints`` maps each service name to host:port.

        With ``wait_for_ready`` (the default) a call to a service that is restarting waits for
        it within the call's deadline. Pass False to fail at once instead, as a command line
        tool does.
        """
        self._channels: dict[str, grpc.Channel] = {}
        for name, descriptor in _DESCRIPTORS.items():
            if name not in endpoints:
                raise ValueError(f"no endpoint given for the {name} service")
            self._channels[name] = open_channel(
                endpoints[name],
                credentials,
                services=[descriptor],
                timeout_s=timeout_s,
                wait_for_ready=wait_for_ready,
            )
        self.grants = grant_pb2_grpc.GrantServiceStub(self._channels["grant"])
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channels["scheduler"])
        self.metering = metering_pb2_grpc.MeteringServiceStub(self._channels["metering"])

    @classmethod
    def from_mesh(
        cls,
        mesh: MeshInfo | Path | None = None,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait_for_ready: bool = True,
    ) -> Client:
        """Connect to a local mesh: its info, its data dir, or the default data dir.

        ``token`` defaults to ``$ACSP_TOKEN``; without one, calls other than health checks
        fail with UNAUTHENTICATED.
        """
        info = mesh if isinstance(mesh, MeshInfo) else load_mesh(mesh)
        return cls(
            info.endpoints,
            _mesh_credentials(info, token),
            timeout_s=timeout_s,
            wait_for_ready=wait_for_ready,
        )

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["TOKEN_ENV", "AsyncClient", "Client", "Credentials"]
