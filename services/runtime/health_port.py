"""The plaintext health port: grpc.health.v1 Check alone, for probes without a certificate.

The kubelet's native gRPC probes cannot present a client certificate, so they cannot reach
a service's mutual-TLS port. With ``ACSP_HEALTH_LISTEN`` set, the service binds a second,
plaintext port whose only method is ``grpc.health.v1.Health/Check``, served from the same
HealthServicer as the main port, so NOT_SERVING during shutdown shows on both. Every other
method there, service RPCs and reflection included, answers UNIMPLEMENTED. Health states are
no secret: the main port answers them without credentials too.

``Watch`` is left to the main port. Each open Watch would hold one of this port's few call
slots for as long as an unauthenticated caller likes, so a handful of them could make the
probes fail and the kubelet restart a healthy service. ``List`` is UNIMPLEMENTED on both ports,
because grpcio-health-checking's asyncio servicer does not implement it.
"""

from __future__ import annotations

from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.runtime.settings import ListenAddress, SettingsError

MAX_CONCURRENT_CHECKS: Final = 32
"""Check calls served at once on the health port; more are rejected with RESOURCE_EXHAUSTED.

Probes send one Check per period and container, so this only bounds what other callers of
the plaintext port can hold.
"""


class CheckOnlyHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 with Check delegated to ``servicer``, and Watch and List rejected."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self._servicer = servicer

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return await self._servicer.Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the health port serves only Check, so call Watch on the service's main port",
        )

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "List is not implemented on the health port, which serves only Check",
        )


def build_health_server(
    servicer: health.aio.HealthServicer, listen: ListenAddress
) -> tuple[grpc.aio.Server, str]:
    """Build a plaintext server on ``listen`` with Check only; return it and its bound address.

    Raise SettingsError naming ACSP_HEALTH_LISTEN when the address cannot be bound.
    """
    server = grpc.aio.server(
        # Like the main port, this port must not be shared with a second process.
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_CHECKS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(CheckOnlyHealthServicer(servicer), server)
    try:
        port = server.add_insecure_port(str(listen))
    except RuntimeError as error:
        raise SettingsError(
            "ACSP_HEALTH_LISTEN",
            f"cannot bind {listen}: {error}",
            "choose a free port (0 picks one) other than ACSP_GRPC_LISTEN's",
        ) from None
    if port == 0:
        raise SettingsError(
            "ACSP_HEALTH_LISTEN",
            f"cannot bind {listen}",
            "choose a free port (0 picks one) other than ACSP_GRPC_LISTEN's",
        )
    return server, str(ListenAddress(listen.host, port))
