"""Retries of ``acsp fleet recall create`` with a request id, and the RecallCapacity request's
relative notice and duration, against a real scheduler, PostgreSQL, NATS and simulated agents.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from acsp.cli import fleet as fleet_cli
from acsp.cli import pledges as pledges_cli
from acsp.cli.main import build_parser, main
from acsp.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.service.pledges import RecallRecord, recall_to_proto
from services.runtime.auth import Role

from .harness import Stack, metadata, scheduler_stub, wait_for

pytestmark = pytest.mark.timeout(240)

MODEL = "A100-SXM4-80GB"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start_servers()
        await stack.start_grant()
        yield stack
    finally:
        await stack.close()


class _TokenStub:
    """A blocking scheduler stub that sends a bearer token and a deadline with each call."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerServiceStub, token: str) -> None:
        self._stub = stub
        self._metadata = metadata(token)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=20)


def use_identity(monkeypatch: pytest.MonkeyPatch, address: str, token: str) -> None:
    @contextmanager
    def open_scheduler(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(address) as channel:
            yield _TokenStub(scheduler_pb2_grpc.SchedulerServiceStub(channel), token)

    monkeypatch.setattr(fleet_cli, "open_scheduler", open_scheduler)
    monkeypatch.setattr(pledges_cli, "open_scheduler", open_scheduler)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_rows(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def pledge_with_nodes(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[str, str, str]:
    """Start a scheduler and 16 accelerators of provider eu, and pledge 8 of them as
    recallable; return the scheduler's address, the operator's token and the pledge id."""
    _, address = await stack.start_scheduler()
    token = stack.token("op-eu", Role.PROVIDER_OPERATOR, provider="eu")
    use_identity(monkeypatch, address, token)
    channel, scheduler = scheduler_stub(address)
    async with channel:
        await scheduler.RegisterProvider(
            scheduler_pb2.RegisterProviderRequest(
                provider=scheduler_pb2.Provider(
                    provider_id="eu", regions=[scheduler_pb2.Region(region_id="reg")]
                )
            ),
            metadata=metadata(token),
            timeout=10,
        )
    stack.start_agents(nodes=2, gpus=8, provider="eu")

    async def registered() -> bool:
        code, out, _ = await run_cli(capsys, "fleet", "nodes", "--format", "json")
        return code == 0 and len(json_rows(out)) == 2

    await wait_for(registered, 30, "the agents' inventories", 0.1)
    start = datetime.now(UTC).replace(microsecond=0)
    code, out, err = await run_cli(
        capsys,
        *("fleet", "pledge", "set", "--provider", "eu", "--region", "reg", "--model", MODEL),
        *("--protected", "4", "--recallable", "8"),
        *("--start", start.isoformat(), "--end", (start + timedelta(days=30)).isoformat()),
        *("--format", "json"),
    )
    assert code == 0, err
    return address, token, json_rows(out)[0]["pledge"]


async def test_recall_create_retry_returns_stored_recall(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, pledge_id = await pledge_with_nodes(stack, monkeypatch, capsys)
    create = ("fleet", "recall", "create", pledge_id, "--count", "2", "--reason", "peak")
    relative = (*create, "--notice", "5", "--duration", "60", "--format", "json")

    # The CLI prints times to the second.
    before = datetime.now(UTC).replace(microsecond=0)
    code, out, err = await run_cli(capsys, *relative, "--request-id", "rc1")
    assert code == 0, err
    (first,) = json_rows(out)
    effective = datetime.fromisoformat(first["effective"])
    assert before <= effective <= datetime.now(UTC) + timedelta(seconds=6)
    assert datetime.fromisoformat(first["end"]) - effective == timedelta(seconds=60)
    assert first["freed"] == 2

    # A retry a second later is the same request: it gets the stored recall and its times,
    # not times counted from the retry.
    await asyncio.sleep(1.1)
    code, out, err = await run_cli(capsys, *relative, "--request-id", "rc1")
    assert code == 0, err
    (again,) = json_rows(out)
    assert again["recall"] == first["recall"]
    assert again["effective"] == first["effective"]
    assert again["end"] == first["end"]
    assert again["freed"] is None
    assert f"repeats the request that created recall {first['recall']}" in err

    # Another notice or duration under the same request id is another request.
    for changed in (
        ("--notice", "6", "--duration", "60"),
        ("--notice", "5", "--end", "2030-01-01"),
    ):
        code, out, err = await run_cli(
            capsys, *create, *changed, "--request-id", "rc1", "--format", "json"
        )
        assert code == 1, out
        assert "FAILED_PRECONDITION" in err
        assert "was used before for another recall" in err

    # A request id first used with absolute times does not match relative ones.
    effective_text = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")
    absolute = (*create, "--effective", effective_text, "--duration", "60", "--format", "json")
    code, out, err = await run_cli(capsys, *absolute, "--request-id", "rc2")
    assert code == 0, err
    (stored,) = json_rows(out)
    code, out, err = await run_cli(capsys, *absolute, "--request-id", "rc2")
    assert code == 0, err
    assert json_rows(out)[0]["recall"] == stored["recall"]
    code, out, err = await run_cli(
        capsys, *create, "--notice", "3600", "--duration", "60", "--request-id", "rc2"
    )
    assert code == 1
    assert "was used before for another recall" in err

    code, out, err = await run_cli(capsys, "fleet", "recall", "list", "--format", "json")
    assert code == 0, err
    assert sorted(row["recall"] for row in json_rows(out)) == sorted(
        [first["recall"], stored["recall"]]
    )


async def test_recall_capacity_relative_fields(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address, token, pledge_id = await pledge_with_nodes(stack, monkeypatch, capsys)
    later = datetime.now(UTC) + timedelta(hours=1)

    def request(
        request_id: str, notice: float | None, duration: float | None, **times: datetime
    ) -> scheduler_pb2.RecallCapacityRequest:
        recall = scheduler_pb2.Recall(pledge_id=pledge_id, count=1)
        for name, moment in times.items():
            getattr(recall, name).FromDatetime(moment)
        message = scheduler_pb2.RecallCapacityRequest(request_id=request_id, recall=recall)
        if notice is not None:
            message.notice.FromNanoseconds(int(notice * 1e9))
        if duration is not None:
            message.duration.FromNanoseconds(int(duration * 1e9))
        return message

    channel, scheduler = scheduler_stub(address)
    async with channel:

        async def call(message: scheduler_pb2.RecallCapacityRequest) -> scheduler_pb2.Recall:
            recall: scheduler_pb2.Recall = await scheduler.RecallCapacity(
                message, metadata=metadata(token), timeout=20
            )
            return recall

        async def rejected(
            message: scheduler_pb2.RecallCapacityRequest,
        ) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(message)
            return caught.value

        cases = [
            (request("", 60, None, effective_time=later), "notice", "effective_time"),
            (request("", None, 60, effective_time=later, end_time=later), "duration", "end_time"),
            (request("", -1, None), "notice", "is negative"),
            (request("", 60, 0), "duration", "is not above 0"),
            (request("", 60, -5), "duration", "is negative"),
            (request("", 1e10, None), "notice", "2200"),
            (request("", None, None), "recall.effective_time", "notice"),
        ]
        for message, field, words in cases:
            error = await rejected(message)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            details = error.details() or ""
            assert field in details, details
            assert words in details, details
        bad_nanos = request("", None, None, effective_time=later)
        bad_nanos.duration.CopyFrom(Duration(seconds=1, nanos=-1))
        assert (await rejected(bad_nanos)).code() == grpc.StatusCode.INVALID_ARGUMENT

        # Relative values resolve once; the stored recall comes back for the same values.
        before = datetime.now(UTC)
        first = await call(request("rel-1", 30, 90))
        effective = first.effective_time.ToDatetime(tzinfo=UTC)
        assert before + timedelta(seconds=30) <= effective
        assert effective <= datetime.now(UTC) + timedelta(seconds=30)
        assert (first.end_time.ToDatetime(tzinfo=UTC) - effective) == timedelta(seconds=90)
        assert first.freed_count == 1
        await asyncio.sleep(0.5)
        again = await call(request("rel-1", 30, 90))
        assert again.recall_id == first.recall_id
        assert again.effective_time == first.effective_time
        assert again.end_time == first.end_time
        assert again.freed_count == 0
        error = await rejected(request("rel-1", 30, 91))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

        # A duration after an absolute effective time ends that long after it.
        mixed = await call(request("rel-2", None, 120, effective_time=later))
        assert mixed.effective_time.ToDatetime(tzinfo=UTC) == later
        assert mixed.end_time.ToDatetime(tzinfo=UTC) - later == timedelta(seconds=120)
        again = await call(request("rel-2", None, 120, effective_time=later))
        assert again.recall_id == mixed.recall_id

        # A notice without a duration ends with the pledge, on a retry too.
        open_ended = await call(request("rel-3", 10, None))
        pledges = await scheduler.ListPledges(
            scheduler_pb2.ListPledgesRequest(provider_id="eu"), metadata=metadata(token), timeout=20
        )
        (pledge,) = pledges.pledges
        assert open_ended.end_time == pledge.window.end_time
        again = await call(request("rel-3", 10, None))
        assert again.recall_id == open_ended.recall_id


def test_recall_reply_keeps_stored_microseconds() -> None:
    # 13:33:30.730160 is 1796564010.7301600 s, which a float stores as ...0.73015987.
    stored = datetime(2026, 12, 6, 13, 33, 30, 730160, tzinfo=UTC)
    recall = RecallRecord("rc-1", "pl-1", 1, stored.timestamp(), None, "")
    assert recall_to_proto(recall).effective_time.ToDatetime(tzinfo=UTC) == stored


def test_requests_without_id_get_random_ids() -> None:
    parser = build_parser()
    recall = ["fleet", "recall", "create", "pl-1", "--count", "1", "--notice", "5"]
    requests = [
        pledges_cli.recall_request_from_args(parser.parse_args(recall), 1_800_000_000.0)
        for _ in range(2)
    ]

    assert requests[0].request_id
    assert requests[0].request_id != requests[1].request_id
