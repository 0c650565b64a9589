"""grpc.health.v1 checks of the mesh's services."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acsp._channel import Credentials

SERVING = "SERVING"


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The health of one service as one check saw it."""

    service: str
    """Service name in the mesh (grant, scheduler, metering)."""
    target: str
    """The ``host:port`` that was checked."""
    status: str
    """``SERVING``, ``NOT_SERVING``, ``UNKNOWN``, or ``UNREACHABLE`` if the check failed."""
    detail: str = ""
    """The gRPC error code and message when the check failed."""

    @property
    def serving(self) -> bool:
        return self.status == SERVING


def _open(target: str, credentials: Credentials) -> grpc.aio.Channel:
    if credentials.ca_cert_pem is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(
        target,
        grpc.ssl_channel_credentials(
            root_certificates=credentials.ca_cert_pem,
            private_key=credentials.client_key_pem,
            certificate_chain=credentials.client_cert_pem,
        ),
    )


async def check_health(
    service: str, target: str, credentials: Credentials, *, timeout_s: float = 2.0
) -> HealthReport:
    """Ask ``target`` for the health of the whole server (the empty service name)."""
    async with _open(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return HealthReport(
                service, target, "UNREACHABLE", f"{exc.code().name}: {exc.details()}"
            )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthReport(service, target, status)


async def wait_serving(
    service: str,
    target: str,
    credentials: Credentials,
    *,
    timeout_s: float,
    still_running: Callable[[], bool] = lambda: True,
) -> HealthReport:
    """Poll ``target`` until it reports SERVING and return that report.

    Raises TimeoutError with the last report after ``timeout_s``, and RuntimeError as soon as
    ``still_running`` returns False (the process behind ``target`` died).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    report = HealthReport(service, target, "UNREACHABLE", "not checked yet")
    while True:
        if not still_running():
            raise RuntimeError(f"{service} stopped before it reported SERVING")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(
                f"{service} at {target} did not report SERVING within {timeout_s:.0f} s; "
                f"last status {report.status} {report.detail}".rstrip()
            )
        report = await check_health(service, target, credentials, timeout_s=min(2.0, remaining))
        if report.serving:
            return report
        await asyncio.sleep(min(0.2, max(deadline - loop.time(), 0)))
