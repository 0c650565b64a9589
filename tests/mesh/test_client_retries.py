"""The SDK clients against a real in-process gRPC server: retries, request ids, deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
import pytest_asyncio

from acsp import _retry
from acsp._channel import MAX_TIMEOUT_S, Credentials
from acsp._retry import MAX_ATTEMPTS
from acsp.client import AsyncClient, Client
from acsp.v1 import common_pb2, grant_pb2, grant_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


class FlakyGrantService(grant_pb2_grpc.GrantServiceServicer):
    """Fails the first ``failures`` calls of each method with UNAVAILABLE, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.request_ids: list[str] = []
        self.metadata: list[dict[str, str]] = []

    async def _maybe_fail(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    async def GetBalance(self, request, context):
        await self._maybe_fail("GetBalance", context)
        return grant_pb2.Balance(credited_pf_days=common_pb2.Decimal(value="1.5"))

    async def PlaceHold(self, request, context):
        self.request_ids.append(request.request_id)
        await self._maybe_fail("PlaceHold", context)
        return grant_pb2.Hold(hold_id="h-1")

    async def PlaceHolds(self, request, context):
        self.request_ids.extend(hold.request_id for hold in request.holds)
        await self._maybe_fail("PlaceHolds", context)
        return grant_pb2.PlaceHoldsResponse(
            results=[grant_pb2.PlaceHoldResult(request_id=h.request_id) for h in request.holds]
        )

    async def CommitCharges(self, request, context):
        self.request_ids.extend(charge.request_id for charge in request.charges)
        await self._maybe_fail("CommitCharges", context)
        return grant_pb2.CommitChargesResponse(
            results=[grant_pb2.ChargeResult(request_id=c.request_id) for c in request.charges]
        )

    async def ExpireGrants(self, request, context):
        self.calls["ExpireGrants"] = self.calls.get("ExpireGrants", 0) + 1
        await asyncio.sleep(5)
        return grant_pb2.ExpireGrantsResponse()


class FlakyScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Fails the first ``failures`` SubmitJobs calls with UNAVAILABLE, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.request_ids: list[list[str]] = []

    async def SubmitJobs(self, request, context):
        self.calls += 1
        self.request_ids.append([item.request_id for item in request.jobs])
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no leader yet")
        return scheduler_pb2.SubmitJobsResponse(
            results=[scheduler_pb2.SubmitJobResponse() for _ in request.jobs]
        )


class SlowScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Streams no job until the caller's deadline ends the call."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def WatchJobs(self, request, context):
        self.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
        await asyncio.sleep(30)
        yield scheduler_pb2.Job()


@pytest_asyncio.fixture
async def flaky() -> AsyncIterator[tuple[FlakyGrantService, dict[str, str]]]:
    # The generated stubs mark every RPC abstract; the others return UNIMPLEMENTED at runtime.
    service = FlakyGrantService(failures=2)  # type: ignore[abstract]
    server = grpc.aio.server()
    grant_pb2_grpc.add_GrantServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Only the grant service runs here; the other endpoints point at it and are never called.
    target = f"127.0.0.1:{port}"
    yield service, {"grant": target, "scheduler": target, "metering": target}
    await server.stop(0)


async def test_read_is_retried_on_unavailable(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials(token="tok")) as client:
        balance = await client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g"))
    assert balance.credited_pf_days.value == "1.5"
    assert service.calls["GetBalance"] == 3


async def test_retried_mutation_keeps_one_request_id(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials()) as client:
        hold = await client.grants.PlaceHold(grant_pb2.PlaceHoldRequest(grant_id="g"))
    assert hold.hold_id == "h-1"
    assert len(service.request_ids) == 3
    assert service.request_ids[0] != ""
    assert len(set(service.request_ids)) == 1


async def test_call_without_request_id_is_not_retried(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials()) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.grants.CommitCharges(grant_pb2.CommitChargesRequest())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.calls["CommitCharges"] == 1


async def test_token_travels_as_bearer_metadata(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials(token="tok-123")) as client:
        await client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g"))
    assert all(seen["authorization"] == "Bearer tok-123" for seen in service.metadata)


async def test_default_deadline_and_per_call_override(flaky):
    _service, endpoints = flaky
    loop = asyncio.get_running_loop()
    async with AsyncClient(endpoints, Credentials(), timeout_s=0.2) as client:
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as default_deadline:
            await client.grants.ExpireGrants(grant_pb2.ExpireGrantsRequest())
        default_elapsed = loop.time() - started
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as override:
            await client.grants.ExpireGrants(grant_pb2.ExpireGrantsRequest(), timeout=1.5)
        override_elapsed = loop.time() - started
    assert default_deadline.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert override.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert default_elapsed < 1.4
    assert override_elapsed >= 1.4


async def test_maximum_deadline_reaches_server(flaky):
    _service, endpoints = flaky

    def blocking_call() -> grant_pb2.Balance:
        with Client(endpoints, Credentials(), timeout_s=MAX_TIMEOUT_S) as client:
            return client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g"))

    async with AsyncClient(endpoints, Credentials(), timeout_s=MAX_TIMEOUT_S) as client:
        balance = await client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g"))
    assert balance.credited_pf_days.value == "1.5"
    blocking = await asyncio.wait_for(asyncio.to_thread(blocking_call), 30)
    assert blocking.credited_pf_days.value == "1.5"


@pytest.mark.parametrize("timeout_s", [MAX_TIMEOUT_S * 10, 0.0, float("nan")])
def test_client_rejects_unusable_deadline(timeout_s: float):
    endpoints = {name: "127.0.0.1:1" for name in ("grant", "scheduler", "metering")}
    with pytest.raises(ValueError, match="timeout_s"):
        Client(endpoints, Credentials(), timeout_s=timeout_s)
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncClient(endpoints, Credentials(), timeout_s=timeout_s)


async def test_blocking_client_retries_and_keeps_request_id(flaky):
    service, endpoints = flaky

    def call() -> tuple[grant_pb2.Balance, grant_pb2.Hold]:
        with Client(endpoints, Credentials(token="tok")) as client:
            balance = client.grants.GetBalance(grant_pb2.GetBalanceRequest(grant_id="g"))
            hold = client.grants.PlaceHold(grant_pb2.PlaceHoldRequest(grant_id="g"))
            return balance, hold

    # The server runs on this loop, so the blocking client runs in a thread.
    balance, hold = await asyncio.wait_for(asyncio.to_thread(call), 30)
    assert balance.credited_pf_days.value == "1.5"
    assert hold.hold_id == "h-1"
    assert service.calls["GetBalance"] == 3
    assert len(set(service.request_ids)) == 1
    assert service.metadata[0]["authorization"] == "Bearer tok"


async def test_stream_gets_token_and_default_deadline():
    service = SlowScheduler()  # type: ignore[abstract]
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    endpoints = {"grant": target, "scheduler": target, "metering": target}
    try:
        async with AsyncClient(endpoints, Credentials(token="tok-s"), timeout_s=0.3) as client:
            stream = client.scheduler.WatchJobs(scheduler_pb2.WatchJobsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stream:
                    pass
    finally:
        await server.stop(0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert service.metadata[0]["authorization"] == "Bearer tok-s"


def _holds(*request_ids: str) -> grant_pb2.PlaceHoldsRequest:
    return grant_pb2.PlaceHoldsRequest(
        holds=[grant_pb2.PlaceHoldRequest(request_id=rid, grant_id="g") for rid in request_ids]
    )


async def test_batch_with_item_ids_is_retried(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials()) as client:
        placed = await client.grants.PlaceHolds(_holds("h/1", "h/2"))
    assert [result.request_id for result in placed.results] == ["h/1", "h/2"]
    assert service.calls["PlaceHolds"] == 3
    assert service.request_ids == ["h/1", "h/2"] * 3


async def test_batch_missing_item_id_not_retried(flaky):
    service, endpoints = flaky
    async with AsyncClient(endpoints, Credentials()) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.grants.PlaceHolds(_holds("h/1", ""))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.calls["PlaceHolds"] == 1
    # The SDK fills no item's request id, since only the caller knows which items repeat.
    assert service.request_ids == ["h/1", ""]


async def test_batch_retries_end_at_max_attempts(flaky):
    service, endpoints = flaky
    service.failures = 100
    charges = grant_pb2.CommitChargesRequest(charges=[grant_pb2.ChargeItem(request_id="c/1")])
    async with AsyncClient(endpoints, Credentials(), timeout_s=30) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.grants.CommitCharges(charges)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.calls["CommitCharges"] == MAX_ATTEMPTS


async def test_batch_retries_end_at_deadline(flaky, monkeypatch: pytest.MonkeyPatch):
    service, endpoints = flaky
    service.failures = 100
    # Each delay is drawn between 0 and its ceiling, so in about 2 % of runs (an estimate from
    # simulating the draws) four short delays fit all five attempts in the deadline. With every
    # delay at its ceiling, 0.1 s and then 0.2 s, the second one reaches past the deadline.
    monkeypatch.setattr(_retry, "random", SimpleNamespace(uniform=lambda low, high: high))
    charges = grant_pb2.CommitChargesRequest(charges=[grant_pb2.ChargeItem(request_id="c/1")])
    loop = asyncio.get_running_loop()
    async with AsyncClient(endpoints, Credentials()) as client:
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.grants.CommitCharges(charges, timeout=0.25)
        elapsed = loop.time() - started
    assert raised.value.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert elapsed < 0.25 + 0.2
    assert service.calls["CommitCharges"] < MAX_ATTEMPTS


async def test_blocking_client_retries_batch(flaky):
    service, endpoints = flaky
    with_ids = grant_pb2.CommitChargesRequest(charges=[grant_pb2.ChargeItem(request_id="c/1")])
    without = grant_pb2.CommitChargesRequest(charges=[grant_pb2.ChargeItem()])

    def call() -> tuple[grpc.StatusCode, grant_pb2.CommitChargesResponse]:
        with Client(endpoints, Credentials()) as client:
            try:
                client.grants.CommitCharges(without)
                unretried = grpc.StatusCode.OK
            except grpc.RpcError as error:
                unretried = error.code()
            return unretried, client.grants.CommitCharges(with_ids)

    unretried, committed = await asyncio.wait_for(asyncio.to_thread(call), 30)
    assert unretried == grpc.StatusCode.UNAVAILABLE
    assert [result.request_id for result in committed.results] == ["c/1"]
    # One failed attempt without ids, then one failed attempt and one success with them.
    assert service.calls["CommitCharges"] == 3


async def test_submit_jobs_retried_with_same_ids():
    service = FlakyScheduler(failures=2)  # type: ignore[abstract]
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    endpoints = {"grant": target, "scheduler": target, "metering": target}
    request = scheduler_pb2.SubmitJobsRequest(
        jobs=[scheduler_pb2.SubmitJobRequest(request_id=f"sub/{i}") for i in range(3)]
    )
    try:
        async with AsyncClient(endpoints, Credentials()) as client:
            submitted = await client.scheduler.SubmitJobs(request)
    finally:
        await server.stop(0)
    assert len(submitted.results) == 3
    assert service.calls == 3
    assert service.request_ids == [["sub/0", "sub/1", "sub/2"]] * 3


async def serve_grant(service: FlakyGrantService, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    grant_pb2_grpc.add_GrantServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@pytest.mark.timeout(60)
async def test_read_waits_for_restarted_service():
    service = FlakyGrantService(failures=0)  # type: ignore[abstract]
    server, port = await serve_grant(service)
    target = f"127.0.0.1:{port}"
    endpoints = {"grant": target, "scheduler": target, "metering": target}
    async with AsyncClient(endpoints, Credentials(), timeout_s=20) as client:
        request = grant_pb2.GetBalanceRequest(grant_id="g")
        await client.grants.GetBalance(request)
        await server.stop(0)
        # The connection is gone, and the channel learns it before the service is back.
        with pytest.raises(grpc.aio.AioRpcError):
            await client.grants.GetBalance(request, timeout=0.5)

        async def restart() -> grpc.aio.Server:
            await asyncio.sleep(3)
            restarted, _ = await serve_grant(service, port)
            return restarted

        restarting = asyncio.create_task(restart())
        balance = await client.grants.GetBalance(request)
        restarted = await restarting
    await restarted.stop(0)
    assert balance.credited_pf_days.value == "1.5"
