"""A small service built on services.runtime, used by the runtime tests.

It serves ``acsp.test.Sample`` with well-known protobuf types, so it needs no generated code.
Run it as a process with ``python -m tests.runtime.sample_service``; it takes the usual
``ACSP_*`` variables and, with ``SAMPLE_SCHEMA`` set, a database schema and the migrations in
``tests/runtime/sample_migrations``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from services.runtime import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Role,
    Runtime,
    Service,
    Settings,
    current_principal,
    remaining_s,
    require_roles,
    run_service,
    service_channel,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "acsp.test.Sample"


class SampleServicer:
    """Handlers that exercise authentication, roles, errors, deadlines and slow calls."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings
        self.started_slow_calls = 0
        self.slow_call_started = asyncio.Event()

    async def whoami(self, request: wrappers_pb2.StringValue, context: Any) -> Any:
        principal = current_principal()
        roles = ",".join(sorted(principal.roles))
        return wrappers_pb2.StringValue(value=f"{principal.kind}:{principal.subject}:{roles}")

    async def pi_only(self, request: wrappers_pb2.StringValue, context: Any) -> Any:
        principal = require_roles(Role.PI)
        return wrappers_pb2.StringValue(value=principal.subject)

    async def fail(self, request: wrappers_pb2.StringValue, context: Any) -> Any:
        if request.value == "invalid":
            raise InvalidArgument("amount", "-1 is negative", "pass an amount of 0 or more")
        if request.value == "missing":
            raise NotFound("grant", "g-404")
        if request.value == "precondition":
            raise FailedPrecondition("the grant is closed", field="grant_id")
        if request.value == "unreachable":
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        raise RuntimeError("an unexpected bug")

    async def sleep(self, request: wrappers_pb2.DoubleValue, context: Any) -> Any:
        self.started_slow_calls += 1
        self.slow_call_started.set()
        log.info("sleep started", extra={"seconds": request.value})
        await asyncio.sleep(request.value)
        return wrappers_pb2.DoubleValue(value=request.value)

    async def remaining(self, request: wrappers_pb2.StringValue, context: Any) -> Any:
        return wrappers_pb2.DoubleValue(value=remaining_s(-1.0) or 0.0)

    async def relay(self, request: wrappers_pb2.StringValue, context: Any) -> Any:
        """Call WhoAmI and Remaining on the sample service at ``request.value``."""
        assert self.settings is not None
        async with service_channel(self.settings, request.value) as channel:
            caller = await _stub(channel, "WhoAmI", wrappers_pb2.StringValue)(
                wrappers_pb2.StringValue()
            )
            remaining = await _stub(channel, "Remaining", wrappers_pb2.DoubleValue)(
                wrappers_pb2.StringValue()
            )
        return wrappers_pb2.StringValue(value=f"{caller.value}|{remaining.value}")

    async def count(
        self, request: wrappers_pb2.Int32Value, context: Any
    ) -> AsyncIterator[wrappers_pb2.Int32Value]:
        for number in range(request.value):
            yield wrappers_pb2.Int32Value(value=number)


def _stub(channel: grpc.aio.Channel, method: str, response_type: Any) -> Any:
    return channel.unary_unary(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )


def add_sample_servicer(server: grpc.aio.Server, servicer: SampleServicer) -> list[str]:
    """Register ``servicer`` under ``acsp.test.Sample`` and return the service name."""
    string = wrappers_pb2.StringValue
    double = wrappers_pb2.DoubleValue
    int32 = wrappers_pb2.Int32Value

    def unary(behavior: Any, request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    handlers = {
        "WhoAmI": unary(servicer.whoami, string),
        "PiOnly": unary(servicer.pi_only, string),
        "Fail": unary(servicer.fail, string),
        "Sleep": unary(servicer.sleep, double),
        "Remaining": unary(servicer.remaining, string),
        "Relay": unary(servicer.relay, string),
        "Count": grpc.unary_stream_rpc_method_handler(
            servicer.count,
            request_deserializer=int32.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return [SERVICE_NAME]


def build_service(settings: Settings, servicer: SampleServicer | None = None) -> Service:
    """Build the sample service; ``SAMPLE_SCHEMA`` turns on the database and migrations."""
    sample = servicer or SampleServicer()
    sample.settings = settings

    def register(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
        return add_sample_servicer(server, sample)

    schema = os.environ.get("SAMPLE_SCHEMA")
    return Service(
        "sample",
        settings,
        register,
        schema=schema,
        migrations="tests.runtime.sample_migrations" if schema else None,
    )


def main() -> None:
    run_service("sample", lambda: build_service(Settings.from_env()))


if __name__ == "__main__":
    main()
