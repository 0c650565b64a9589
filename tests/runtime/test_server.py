"""The server bootstrap against a real gRPC server on port 0: auth, errors, deadlines, TLS."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime import Role, field_violations, mint_token
from services.runtime.auth import generate_signing_key, load_signing_key
from services.runtime.channel import open_channel
from services.runtime.errors import details_from_error
from services.runtime.tls import channel_credentials, ensure_local_pki
from tests.runtime.conftest import Keys, RunningSample, SampleFactory
from tests.runtime.sample_service import SERVICE_NAME

String = wrappers_pb2.StringValue
Double = wrappers_pb2.DoubleValue


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_health_answers_without_credentials(sample: RunningSample) -> None:
    stub = health_pb2_grpc.HealthStub(sample.channel)
    overall = await stub.Check(health_pb2.HealthCheckRequest())
    named = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert named.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services_without_credentials(sample: RunningSample) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(sample.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]
    names = {service.name for service in responses[0].list_services_response.service}
    assert SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names


async def test_call_without_token_is_unauthenticated(sample: RunningSample) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sample.who_am_i()(String())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (caught.value.details() or "")


async def test_call_with_forged_token_is_unauthenticated(
    sample: RunningSample, tmp_path: Path
) -> None:
    other_private, _ = generate_signing_key(tmp_path / "other")
    forged = mint_token(load_signing_key(other_private), "mallory", [Role.PROGRAM_OFFICE])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sample.who_am_i()(String(), metadata=bearer(forged))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid" in (caught.value.details() or "")


async def test_malformed_authorization_is_unauthenticated(sample: RunningSample) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sample.who_am_i()(String(), metadata=[("authorization", "Basic abc")])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_authenticated_call_reaches_handler(sample: RunningSample, keys: Keys) -> None:
    token = keys.token(Role.RESEARCHER, Role.PI, institution="uni-oslo")
    reply = await sample.who_am_i()(String(), metadata=bearer(token))
    assert reply.value == "user:alice:pi,researcher"


async def test_wrong_role_is_permission_denied(sample: RunningSample, keys: Keys) -> None:
    pi_only = sample.unary("PiOnly", String, String)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pi_only(String(), metadata=bearer(keys.token(Role.RESEARCHER)))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs one of pi" in (caught.value.details() or "")
    allowed = await pi_only(String(), metadata=bearer(keys.token(Role.PI, subject="bob")))
    assert allowed.value == "bob"


async def test_invalid_argument_names_field_and_fix(sample: RunningSample, keys: Keys) -> None:
    fail = sample.unary("Fail", String, String)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fail(String(value="invalid"), metadata=bearer(keys.token(Role.PI)))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "invalid amount: -1 is negative; pass an amount of 0 or more"
    assert field_violations(error) == {"amount": "-1 is negative; pass an amount of 0 or more"}


@pytest.mark.timeout(30)
async def test_nul_in_request_is_invalid_argument(sample: RunningSample, keys: Keys) -> None:
    # The handler fails any value it does not know with INTERNAL, so only the check rejects.
    fail = sample.unary("Fail", String, String)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fail(String(value="unexpected\x00"), metadata=bearer(keys.token(Role.PI)))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid value: contains a NUL character" in (error.details() or "")
    assert list(field_violations(error)) == ["value"]


@pytest.mark.parametrize(
    ("value", "code", "message"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "grant 'g-404' not found"),
        ("precondition", grpc.StatusCode.FAILED_PRECONDITION, "grant_id: the grant is closed"),
        (
            "unreachable",
            grpc.StatusCode.UNAVAILABLE,
            "the database or NATS is unreachable; retry with backoff",
        ),
    ],
)
async def test_caller_errors_map_to_status(
    sample: RunningSample, keys: Keys, value: str, code: grpc.StatusCode, message: str
) -> None:
    fail = sample.unary("Fail", String, String)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fail(String(value=value), metadata=bearer(keys.token(Role.PI)))
    assert caught.value.code() == code
    assert caught.value.details() == message
    status = details_from_error(caught.value)
    if code != grpc.StatusCode.UNAVAILABLE:
        assert status is not None
        assert status.code == code.value[0]


async def test_unexpected_exception_is_internal_with_error_id(
    sample: RunningSample, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    fail = sample.unary("Fail", String, String)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fail(String(value="bug"), metadata=bearer(keys.token(Role.PI)))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "an unexpected bug" not in details
    error_id = details.split("error_id=")[1]
    logged = [record for record in caplog.records if getattr(record, "error_id", None) == error_id]
    assert len(logged) == 1
    assert logged[0].exc_info is not None


async def test_default_deadline_bounds_unary_calls(
    sample_factory: SampleFactory, keys: Keys
) -> None:
    sample = await sample_factory(ACSP_DEFAULT_DEADLINE_S="0.3")
    # A plain channel, because open_channel would give the call a deadline of its own.
    async with grpc.aio.insecure_channel(sample.service.address) as channel:
        sleep = channel.unary_unary(
            f"/{SERVICE_NAME}/Sleep",
            request_serializer=Double.SerializeToString,
            response_deserializer=Double.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sleep(Double(value=5.0), metadata=bearer(keys.token(Role.PI)))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline of 0.300 s" in (caught.value.details() or "")


async def test_incoming_deadline_reaches_handler(sample: RunningSample, keys: Keys) -> None:
    remaining = sample.unary("Remaining", String, Double)
    bounded = await remaining(String(), metadata=bearer(keys.token(Role.PI)), timeout=2.0)
    # grpc rounds the deadline it sends up to its timeout unit, so allow a little slack.
    assert 1.0 < bounded.value <= 2.2
    unbounded = await remaining(String(), metadata=bearer(keys.token(Role.PI)))
    # The sample runs with the default ACSP_DEFAULT_DEADLINE_S of 30 s, and open_channel
    # itself sets 30 s on calls without a timeout.
    assert 25.0 < unbounded.value <= 30.2


async def test_server_streaming_call_is_authenticated(sample: RunningSample, keys: Keys) -> None:
    count = sample.channel.unary_stream(
        f"/{SERVICE_NAME}/Count",
        request_serializer=wrappers_pb2.Int32Value.SerializeToString,
        response_deserializer=wrappers_pb2.Int32Value.FromString,
    )
    values = [
        item.value
        async for item in count(
            wrappers_pb2.Int32Value(value=3), metadata=bearer(keys.token(Role.PI))
        )
    ]
    assert values == [0, 1, 2]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [item async for item in count(wrappers_pb2.Int32Value(value=3))]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_stop_finishes_in_flight_call(sample: RunningSample, keys: Keys) -> None:
    sleep = sample.unary("Sleep", Double, Double)
    call = asyncio.ensure_future(sleep(Double(value=0.5), metadata=bearer(keys.token(Role.PI))))
    await asyncio.wait_for(sample.servicer.slow_call_started.wait(), timeout=5)
    sample.service.stop(grace_s=5.0)
    reply = await asyncio.wait_for(call, timeout=5)
    assert reply.value == 0.5


async def test_health_turns_not_serving_on_stop(sample: RunningSample, keys: Keys) -> None:
    sleep = sample.unary("Sleep", Double, Double)
    call = asyncio.ensure_future(sleep(Double(value=1.0), metadata=bearer(keys.token(Role.PI))))
    await asyncio.wait_for(sample.servicer.slow_call_started.wait(), timeout=5)
    watch = health_pb2_grpc.HealthStub(sample.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    )
    statuses = [(await watch.read()).status]
    sample.service.stop(grace_s=5.0)
    statuses.append((await asyncio.wait_for(watch.read(), timeout=5)).status)
    reply = await asyncio.wait_for(call, timeout=5)
    assert statuses == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
    assert reply.value == 1.0


async def test_call_past_grace_is_cancelled(sample: RunningSample, keys: Keys) -> None:
    sleep = sample.unary("Sleep", Double, Double)
    call = asyncio.ensure_future(sleep(Double(value=30.0), metadata=bearer(keys.token(Role.PI))))
    await asyncio.wait_for(sample.servicer.slow_call_started.wait(), timeout=5)
    started = time.monotonic()
    sample.service.stop(grace_s=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, timeout=10)
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert time.monotonic() - started < 5


async def test_calls_beyond_limit_are_resource_exhausted(
    sample_factory: SampleFactory, keys: Keys
) -> None:
    sample = await sample_factory(ACSP_GRPC_MAX_CONCURRENT_RPCS="1")
    sleep = sample.unary("Sleep", Double, Double)
    metadata = bearer(keys.token(Role.PI))
    first = asyncio.ensure_future(sleep(Double(value=0.5), metadata=metadata))
    await asyncio.wait_for(sample.servicer.slow_call_started.wait(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sleep(Double(value=0.0), metadata=metadata)
    reply = await asyncio.wait_for(first, timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reply.value == 0.5


async def test_ready_file_holds_bound_address(
    sample_factory: SampleFactory, tmp_path: Path
) -> None:
    ready_file = tmp_path / "sample.addr"
    sample = await sample_factory(ACSP_READY_FILE=str(ready_file))
    address = ready_file.read_text().strip()
    assert address == sample.service.address
    assert not address.endswith(":0")


# Mutual TLS.


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    return ensure_local_pki(tmp_path, services=["sample", "grant"], clients=["client"])


def tls_environment(pki: dict, name: str = "sample") -> dict[str, str]:
    paths = pki[name]
    return {
        "ACSP_TLS_CA": str(paths.ca),
        "ACSP_TLS_CERT": str(paths.cert),
        "ACSP_TLS_KEY": str(paths.key),
    }


async def test_service_certificate_authenticates_without_token(
    sample_factory: SampleFactory, pki: dict
) -> None:
    sample = await sample_factory(**tls_environment(pki))
    grant = pki["grant"]
    credentials = channel_credentials(grant.ca, grant.cert, grant.key)
    async with open_channel(sample.service.address, credentials=credentials) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        reply = await who_am_i(String())
    assert reply.value == "service:grant:service"


async def test_client_certificate_still_needs_token(
    sample_factory: SampleFactory, pki: dict, keys: Keys
) -> None:
    sample = await sample_factory(**tls_environment(pki))
    client = pki["client"]
    credentials = channel_credentials(client.ca, client.cert, client.key)
    async with open_channel(sample.service.address, credentials=credentials) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await who_am_i(String())
        reply = await who_am_i(String(), metadata=bearer(keys.token(Role.REVIEWER, subject="rita")))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reply.value == "user:rita:reviewer"


async def test_tls_port_rejects_caller_without_certificate(
    sample_factory: SampleFactory, pki: dict, keys: Keys
) -> None:
    sample = await sample_factory(**tls_environment(pki))
    credentials = grpc.ssl_channel_credentials(pki["sample"].ca.read_bytes())
    async with open_channel(sample.service.address, credentials=credentials) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await who_am_i(String(), metadata=bearer(keys.token(Role.PI)), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_service_channel_propagates_identity_deadline_and_trace(
    sample_factory: SampleFactory, pki: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="services.runtime.interceptors")
    upstream = await sample_factory(**tls_environment(pki, "sample"))
    downstream = await sample_factory(**tls_environment(pki, "grant"))
    spans = InMemorySpanExporter()
    for running in (upstream, downstream):
        assert running.service.runtime is not None
        running.service.runtime.telemetry.tracer_provider.add_span_processor(
            SimpleSpanProcessor(spans)
        )

    grant = pki["grant"]
    credentials = channel_credentials(grant.ca, grant.cert, grant.key)
    async with open_channel(upstream.service.address, credentials=credentials) as channel:
        relay = channel.unary_unary(
            f"/{SERVICE_NAME}/Relay",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        reply = await relay(String(value=downstream.service.address), timeout=3.0)

    caller, remaining = reply.value.split("|")
    assert caller == "service:sample:service"
    assert 0.0 < float(remaining) < 3.0

    server_spans = [span for span in spans.get_finished_spans() if span.name.endswith("/Relay")]
    downstream_spans = [
        span for span in spans.get_finished_spans() if span.name.endswith("/Remaining")
    ]
    assert len(server_spans) == 1
    assert len(downstream_spans) == 1
    assert downstream_spans[0].context.trace_id == server_spans[0].context.trace_id

    finished = {
        getattr(record, "method", None): getattr(record, "request_id", None)
        for record in caplog.records
        if record.getMessage() == "call finished"
    }
    assert finished[f"/{SERVICE_NAME}/Relay"] is not None
    assert finished[f"/{SERVICE_NAME}/Remaining"] == finished[f"/{SERVICE_NAME}/Relay"]
