"""The plaintext health port (ACSP_HEALTH_LISTEN) beside a mutual-TLS main port, on port 0."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runtime import Role
from services.runtime.channel import open_channel
from services.runtime.settings import ListenAddress, Settings, SettingsError
from services.runtime.tls import CertPaths, channel_credentials, ensure_local_pki
from tests.runtime.conftest import Keys, RunningSample, SampleFactory, poll_until
from tests.runtime.sample_service import SERVICE_NAME

Double = wrappers_pb2.DoubleValue
String = wrappers_pb2.StringValue
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, CertPaths]:
    return ensure_local_pki(tmp_path, services=["sample", "grant"], clients=[])


def tls_environment(pki: dict[str, CertPaths]) -> dict[str, str]:
    paths = pki["sample"]
    return {
        "ACSP_TLS_CA": str(paths.ca),
        "ACSP_TLS_CERT": str(paths.cert),
        "ACSP_TLS_KEY": str(paths.key),
    }


@pytest.fixture
async def sample_with_health_port(
    sample_factory: SampleFactory, pki: dict[str, CertPaths]
) -> RunningSample:
    """The sample service with mutual TLS on its main port and a health port on port 0."""
    return await sample_factory(ACSP_HEALTH_LISTEN="127.0.0.1:0", **tls_environment(pki))


async def check(address: str, service: str = "") -> int:
    async with open_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def test_health_port_answers_check_without_certificate(
    sample_with_health_port: RunningSample,
) -> None:
    address = sample_with_health_port.service.runtime.health_address  # type: ignore[union-attr]
    assert address is not None
    assert address != sample_with_health_port.service.address
    assert not address.endswith(":0")
    assert await check(address) == SERVING
    assert await check(address, SERVICE_NAME) == SERVING


async def test_health_port_rejects_service_calls(
    sample_with_health_port: RunningSample, keys: Keys
) -> None:
    address = sample_with_health_port.service.runtime.health_address  # type: ignore[union-attr]
    assert address is not None
    async with open_channel(address) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as service_call:
            token = keys.token(Role.PI)
            await who_am_i(String(), metadata=[("authorization", f"Bearer {token}")], timeout=5)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as reflection_call:
            _ = [reply async for reply in reflection]
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as watch_call:
            await watch.read()
    assert service_call.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert reflection_call.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert watch_call.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "main port" in (watch_call.value.details() or "")


async def test_main_port_still_requires_certificate(
    sample_with_health_port: RunningSample, pki: dict[str, CertPaths]
) -> None:
    service = sample_with_health_port.service
    assert service.runtime is not None
    grant = pki["grant"]
    credentials = channel_credentials(grant.ca, grant.cert, grant.key)
    async with open_channel(service.address, credentials=credentials) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=String.SerializeToString,
            response_deserializer=String.FromString,
        )
        reply = await who_am_i(String(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await check(service.address)
    assert reply.value == "service:grant:service"
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_shows_not_serving_while_draining(
    sample_with_health_port: RunningSample, keys: Keys, pki: dict[str, CertPaths]
) -> None:
    sample = sample_with_health_port
    assert sample.service.runtime is not None
    address = sample.service.runtime.health_address
    assert address is not None
    grant = pki["grant"]
    credentials = channel_credentials(grant.ca, grant.cert, grant.key)
    async with open_channel(sample.service.address, credentials=credentials) as channel:
        sleep = channel.unary_unary(
            f"/{SERVICE_NAME}/Sleep",
            request_serializer=Double.SerializeToString,
            response_deserializer=Double.FromString,
        )
        call = asyncio.ensure_future(sleep(Double(value=2.0), timeout=10))
        await asyncio.wait_for(sample.servicer.slow_call_started.wait(), timeout=5)
        before = await check(address, SERVICE_NAME)
        sample.service.stop(grace_s=5.0)

        statuses: list[int] = []

        async def poll_status() -> None:
            async with asyncio.timeout(5):
                while not statuses or statuses[-1] != NOT_SERVING:
                    statuses.append(await check(address, SERVICE_NAME))
                    await asyncio.sleep(0.05)

        await poll_status()
        overall = await check(address)
        in_flight_done = call.done()
        reply = await asyncio.wait_for(call, timeout=10)
    assert before == SERVING
    assert statuses[-1] == NOT_SERVING
    assert overall == NOT_SERVING
    assert not in_flight_done
    assert reply.value == 2.0


async def test_health_ready_file_holds_bound_address(
    sample_factory: SampleFactory, tmp_path: Path
) -> None:
    ready_file = tmp_path / "sample.addr"
    health_ready_file = tmp_path / "sample.health.addr"
    sample = await sample_factory(
        ACSP_HEALTH_LISTEN="127.0.0.1:0",
        ACSP_READY_FILE=str(ready_file),
        ACSP_HEALTH_READY_FILE=str(health_ready_file),
    )
    assert sample.service.runtime is not None
    health_address = health_ready_file.read_text().strip()
    assert health_address == sample.service.runtime.health_address
    assert ready_file.read_text().strip() == sample.service.address
    assert not health_address.endswith(":0")
    sample.service.stop(grace_s=1.0)
    await poll_until(lambda: not health_ready_file.exists())


async def test_without_health_listen_no_health_port(sample: RunningSample) -> None:
    assert sample.service.runtime is not None
    assert sample.service.runtime.health_address is None


async def test_busy_health_port_names_variable(sample_factory: SampleFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError) as caught:
            await sample_factory(ACSP_HEALTH_LISTEN=f"127.0.0.1:{port}")
    assert caught.value.variable == "ACSP_HEALTH_LISTEN"
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_health_listen_is_parsed_and_optional() -> None:
    unset = Settings.from_env({})
    given = Settings.from_env({"ACSP_HEALTH_LISTEN": "0.0.0.0:8086"})
    assert unset.health_listen is None
    assert given.health_listen == ListenAddress("0.0.0.0", 8086)


def test_health_ready_file_without_listen_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ACSP_HEALTH_READY_FILE": str(tmp_path / "health.addr")})
    assert caught.value.variable == "ACSP_HEALTH_LISTEN"


def test_invalid_health_listen_names_variable() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ACSP_HEALTH_LISTEN": "8086"})
    assert caught.value.variable == "ACSP_HEALTH_LISTEN"
