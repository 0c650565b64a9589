"""Service lifecycle in-process: hooks, background tasks and their failures, telemetry."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime import Role, Runtime, Service, Settings, SettingsError, StartupError, server
from services.runtime.server import _startup_error
from services.runtime.telemetry import setup_telemetry
from tests.runtime.conftest import Keys
from tests.runtime.sample_service import SERVICE_NAME, SampleServicer, add_sample_servicer


def settings_for(keys: Keys, **environ: str) -> Settings:
    return Settings.from_env({"ACSP_TOKEN_PUBLIC_KEY": str(keys.public_path), **environ})


def sample_register(server: grpc.aio.Server, runtime: Runtime) -> list[str]:
    return add_sample_servicer(server, SampleServicer())


async def test_hooks_run_in_order_and_tasks_are_cancelled(keys: Keys) -> None:
    events: list[str] = []
    background_cancelled = asyncio.Event()

    async def loop_until_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            background_cancelled.set()
            raise

    async def start(runtime: Runtime) -> None:
        events.append("start")
        runtime.spawn(loop_until_cancelled(), name="loop")

    async def stop(runtime: Runtime) -> None:
        events.append(f"stop stopping={runtime.stopping.is_set()}")

    service = Service(
        "hooks", settings_for(keys), sample_register, on_start=[start], on_stop=[stop]
    )
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), timeout=10)
    service.stop(grace_s=1)
    await asyncio.wait_for(task, timeout=10)
    assert events == ["start", "stop stopping=True"]
    assert background_cancelled.is_set()


async def test_failed_background_task_stops_service(keys: Keys) -> None:
    async def fail_soon() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("lost the leader lease")

    async def start(runtime: Runtime) -> None:
        runtime.spawn(fail_soon(), name="lease")

    service = Service("failing", settings_for(keys), sample_register, on_start=[start])
    with pytest.raises(ExceptionGroup) as caught:
        await asyncio.wait_for(service.run(), timeout=10)
    assert caught.group_contains(RuntimeError, match="lost the leader lease")
    # The server was drained and closed, so nothing listens on its port any more.
    host, port = service.address.rsplit(":", 1)
    with socket.socket() as probe:
        assert probe.connect_ex((host, int(port))) != 0


async def test_startup_error_in_hook_is_found_in_group(keys: Keys) -> None:
    async def start(runtime: Runtime) -> None:
        raise StartupError("rate card", "bucket acsp_ratecard is empty", "publish a rate card")

    service = Service("hook-fails", settings_for(keys), sample_register, on_start=[start])
    with pytest.raises(BaseException) as caught:
        await asyncio.wait_for(service.run(), timeout=10)
    found = _startup_error(caught.value)
    assert found is not None
    assert str(found) == "rate card: bucket acsp_ratecard is empty; fix: publish a rate card"


def test_spawn_before_start_is_an_error(keys: Keys) -> None:
    settings = settings_for(keys)
    runtime = Runtime("early", settings, setup_telemetry("early", settings))

    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError):
        runtime.spawn(nothing(), name="too-early")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_prometheus_exporter_serves_call_metrics(keys: Keys) -> None:
    port = free_port()
    settings = settings_for(keys, ACSP_OTEL_EXPORTER="prometheus", ACSP_PROMETHEUS_PORT=str(port))
    service = Service("metrics", settings, sample_register)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), timeout=10)
        async with grpc.aio.insecure_channel(service.address) as channel:
            who_am_i = channel.unary_unary(
                f"/{SERVICE_NAME}/WhoAmI",
                request_serializer=wrappers_pb2.StringValue.SerializeToString,
                response_deserializer=wrappers_pb2.StringValue.FromString,
            )
            token = keys.token(Role.PI)
            await who_am_i(
                wrappers_pb2.StringValue(), metadata=[("authorization", f"Bearer {token}")]
            )
        body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics")
    finally:
        service.stop(grace_s=1)
        await asyncio.wait_for(task, timeout=10)
    assert "rpc_server_duration" in body
    assert 'rpc_method="WhoAmI"' in body


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_console_exporter_writes_spans(keys: Keys, capfd: pytest.CaptureFixture[str]) -> None:
    service = Service("console", settings_for(keys, ACSP_OTEL_EXPORTER="console"), sample_register)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), timeout=10)
    async with grpc.aio.insecure_channel(service.address) as channel:
        who_am_i = channel.unary_unary(
            f"/{SERVICE_NAME}/WhoAmI",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await who_am_i(wrappers_pb2.StringValue())
    service.stop(grace_s=1)
    await asyncio.wait_for(task, timeout=10)
    stderr = capfd.readouterr().err
    assert '"name": "acsp.test.Sample/WhoAmI"' in stderr
    assert '"rpc.grpc.status_code": 16' in stderr


async def test_set_serving_toggles_health(keys: Keys) -> None:
    service = Service("toggle", settings_for(keys), sample_register)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), timeout=10)
        assert service.runtime is not None
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            before = (await stub.Check(request)).status
            await service.runtime.set_serving(False)
            during = (await stub.Check(request)).status
            await service.runtime.set_serving(True)
            after = (await stub.Check(request)).status
    finally:
        service.stop(grace_s=1)
        await asyncio.wait_for(task, timeout=10)
    assert before == health_pb2.HealthCheckResponse.SERVING
    assert during == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING


async def test_stuck_stop_hook_does_not_hold_shutdown(keys: Keys) -> None:
    async def hang(runtime: Runtime) -> None:
        await asyncio.Event().wait()

    service = Service("stuck", settings_for(keys), sample_register, on_stop=[hang])
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), timeout=10)
    started = time.monotonic()
    service.stop(grace_s=0.2)
    await asyncio.wait_for(task, timeout=10)
    assert time.monotonic() - started < 5


async def test_stuck_start_hook_is_startup_error(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "START_HOOK_TIMEOUT_S", 0.2)

    async def wait_forever(runtime: Runtime) -> None:
        await asyncio.Event().wait()

    service = Service("slow-start", settings_for(keys), sample_register, on_start=[wait_forever])
    with pytest.raises(BaseException) as caught:
        await asyncio.wait_for(service.run(), timeout=10)
    found = _startup_error(caught.value)
    assert found is not None
    assert "wait_forever" in found.subject
    assert "did not finish within 0.2 s" in found.reason


async def test_busy_prometheus_port_is_settings_error(keys: Keys) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = settings_for(
            keys, ACSP_OTEL_EXPORTER="prometheus", ACSP_PROMETHEUS_PORT=str(port)
        )
        with pytest.raises(SettingsError) as caught:
            await asyncio.wait_for(Service("busy", settings, sample_register).run(), timeout=10)
    assert caught.value.variable == "ACSP_PROMETHEUS_PORT"
