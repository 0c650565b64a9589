"""MeteringService rejects malformed page tokens, times, job ids and rate cards over gRPC, and
stores nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from acsp.cli import usage as usage_cli
from acsp.cli.main import main
from acsp.v1 import common_pb2, metering_pb2, metering_pb2_grpc
from services.runtime.auth import Role
from services.runtime.server import Service
from tests.metering.test_service import (  # noqa: F401 - running is the fixture
    BlockingStub,
    Client,
    running,
)

BAD_NUMBER_TOKENS = ("²", "abc", "-1", "1.5", "9" * 30)
"""Page tokens that no numbered list returns: a non-ASCII digit, letters, signs, a number
above the bigint maximum."""


async def _error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _page(token: str, size: int = 10) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=size, page_token=token)


@pytest.mark.parametrize("token", BAD_NUMBER_TOKENS)
async def test_numbered_lists_reject_bad_token(
    running: tuple[Service, Client],  # noqa: F811
    token: str,
) -> None:
    _, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.stub.ListRateCards(
            metering_pb2.ListRateCardsRequest(page=_page(token)), metadata=office
        ),
        lambda: client.stub.ListCharges(
            metering_pb2.ListChargesRequest(page=_page(token)), metadata=office
        ),
    ]
    for call in calls:
        error = await _error(call())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid page.page_token" in (error.details() or "")
        assert "next_page_token" in (error.details() or "")


@pytest.mark.parametrize("token", ["job-1/²", "job-1/99999999999", "job-1/-1"])
async def test_efficiency_rejects_bad_attempt_token(
    running: tuple[Service, Client],  # noqa: F811
    token: str,
) -> None:
    _, client = running
    error = await _error(
        client.stub.ListJobEfficiency(
            metering_pb2.ListJobEfficiencyRequest(page=_page(token)),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid page.page_token" in (error.details() or "")


async def test_rate_card_token_continues_list(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    first = await client.stub.ListRateCards(
        metering_pb2.ListRateCardsRequest(page=_page("", size=1)), metadata=office
    )
    assert [card.version for card in first.rate_cards] == [1]
    assert first.page.next_page_token == "1"
    rest = await client.stub.ListRateCards(
        metering_pb2.ListRateCardsRequest(page=_page(first.page.next_page_token)),
        metadata=office,
    )
    assert list(rest.rate_cards) == []


def _window(start_seconds: int, end_seconds: int, end_nanos: int = 0) -> common_pb2.TimeWindow:
    return common_pb2.TimeWindow(
        start_time=Timestamp(seconds=start_seconds),
        end_time=Timestamp(seconds=end_seconds, nanos=end_nanos),
    )


YEAR_1 = -62_135_596_800
"""0001-01-01T00:00:00Z, the earliest time a protobuf Timestamp may hold."""
YEAR_10000 = 253_402_300_800
"""10000-01-01T00:00:00Z, one second past the latest time a protobuf Timestamp may hold."""


async def test_windows_reject_invalid_times(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    cases = [
        (
            client.stub.QueryUsage(
                metering_pb2.QueryUsageRequest(range=_window(YEAR_1 - 1, 0)), metadata=office
            ),
            "range.start_time",
        ),
        (
            client.stub.GetModelReport(
                metering_pb2.GetModelReportRequest(range=_window(0, YEAR_10000)),
                metadata=office,
            ),
            "range.end_time",
        ),
        (
            client.stub.GetSettlement(
                metering_pb2.GetSettlementRequest(
                    provider_id="prov-a", period=_window(0, 60, end_nanos=-1)
                ),
                metadata=office,
            ),
            "period.end_time",
        ),
    ]
    for call, field in cases:
        error = await _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert f"invalid {field}" in (error.details() or "")
        assert "0001-01-01 to 9999-12-31" in (error.details() or "")


async def test_windows_accept_widest_times(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    widest = _window(YEAR_1, YEAR_10000 - 1, end_nanos=999_999_999)
    usage = await client.stub.QueryUsage(
        metering_pb2.QueryUsageRequest(range=widest), metadata=office
    )
    assert list(usage.rows) == []
    report = await client.stub.GetModelReport(
        metering_pb2.GetModelReportRequest(range=widest), metadata=office
    )
    assert list(report.models) == []


@pytest.mark.parametrize("job_id", ["bad id!", "j-1/0", "j" * 65, "jób"])
async def test_job_filters_reject_malformed_id(
    running: tuple[Service, Client],  # noqa: F811
    job_id: str,
) -> None:
    _, client = running
    callers = {
        "office": client.metadata(Role.PROGRAM_OFFICE),
        "researcher": client.metadata(Role.RESEARCHER),
    }
    for caller, md in callers.items():
        calls = [
            client.stub.ListCharges(metering_pb2.ListChargesRequest(job_id=job_id), metadata=md),
            client.stub.ListRefunds(metering_pb2.ListRefundsRequest(job_id=job_id), metadata=md),
        ]
        for call in calls:
            error = await _error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, caller
            assert "invalid job_id" in (error.details() or ""), caller
            assert "is not a job id" in (error.details() or ""), caller


async def test_usage_charges_cli_rejects_bad_job(
    running: tuple[Service, Client],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service, client = running

    @contextmanager
    def open_metering(args: object) -> Iterator[Any]:
        with grpc.insecure_channel(service.address) as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            yield BlockingStub(stub, client.metadata(Role.PROGRAM_OFFICE))

    monkeypatch.setattr(usage_cli, "open_metering", open_metering)
    code = await asyncio.to_thread(main, ["usage", "charges", "--job", "bad id!"])
    captured = capsys.readouterr()
    assert code == 2
    assert "INVALID_ARGUMENT: invalid job_id: 'bad id!' is not a job id" in captured.err
    assert captured.out == ""


async def test_query_usage_lists_groupings(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    error = await _error(
        client.stub.QueryUsage(
            metering_pb2.QueryUsageRequest(grouping=99, range=_window(0, 3600)),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "invalid grouping: 99 is unknown" in details
    for name in metering_pb2.UsageGrouping.keys():
        if name != "USAGE_GROUPING_UNSPECIFIED":
            assert name in details


async def _current_card(client: Client) -> metering_pb2.RateCard:
    card = await client.stub.GetRateCard(
        metering_pb2.GetRateCardRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )
    card.ClearField("version")
    card.ClearField("effective_time")
    return card


async def _versions(client: Client) -> list[int]:
    listed = await client.stub.ListRateCards(
        metering_pb2.ListRateCardsRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )
    return [card.version for card in listed.rate_cards]


async def test_publish_rejects_future_effective_time(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    card = await _current_card(client)
    card.effective_time.FromDatetime(datetime.now(UTC) + timedelta(days=30))
    later = await _error(
        client.stub.PublishRateCard(
            metering_pb2.PublishRateCardRequest(request_id="rc-later", rate_card=card),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert later.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid rate_card.effective_time" in (later.details() or "")
    assert "takes effect when it is published" in (later.details() or "")

    card.effective_time.CopyFrom(Timestamp(seconds=YEAR_10000))
    invalid = await _error(
        client.stub.PublishRateCard(
            metering_pb2.PublishRateCardRequest(request_id="rc-invalid", rate_card=card),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid rate_card.effective_time" in (invalid.details() or "")

    current = await client.stub.GetRateCard(
        metering_pb2.GetRateCardRequest(), metadata=client.metadata(Role.PROGRAM_OFFICE)
    )
    card.effective_time.FromDatetime(current.effective_time.ToDatetime() - timedelta(days=1))
    earlier = await _error(
        client.stub.PublishRateCard(
            metering_pb2.PublishRateCardRequest(request_id="rc-earlier", rate_card=card),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert earlier.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is before that of version 1" in (earlier.details() or "")
    assert await _versions(client) == [1]


async def test_publish_rejects_dropped_model(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    card = await _current_card(client)
    without_p100 = [rate for rate in card.rates if rate.model.name != "P100"]
    del card.rates[:]
    card.rates.extend(without_p100)
    error = await _error(
        client.stub.PublishRateCard(
            metering_pb2.PublishRateCardRequest(request_id="rc-drop", rate_card=card),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rate_card.rates: the rate card leaves out P100" in (error.details() or "")
    assert await _versions(client) == [1]


async def test_publish_rejects_reused_request_id(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    office = client.metadata(Role.PROGRAM_OFFICE)
    card = await _current_card(client)
    request = metering_pb2.PublishRateCardRequest(request_id="rc-reused", rate_card=card)
    first = await client.stub.PublishRateCard(request, metadata=office)
    retry = await client.stub.PublishRateCard(request, metadata=office)
    assert first.version == 2
    assert retry.version == 2

    request.rate_card.rates[0].model.peak_dense_tflops.value = "1234.5"
    changed = await _error(client.stub.PublishRateCard(request, metadata=office))
    assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (changed.details() or "")
    assert "version 2" in (changed.details() or "")

    request.rate_card.CopyFrom(card)
    request.rate_card.effective_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    moved = await _error(client.stub.PublishRateCard(request, metadata=office))
    assert moved.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (moved.details() or "")

    # Without an effective time, a version takes effect at publishing, so a retry matches.
    request.request_id = "rc-unset"
    request.rate_card.ClearField("effective_time")
    unset = await client.stub.PublishRateCard(request, metadata=office)
    unset_retry = await client.stub.PublishRateCard(request, metadata=office)
    assert unset.version == 3
    assert unset_retry.version == 3
    assert await _versions(client) == [1, 2, 3]


async def test_publish_rejects_huge_peak(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    card = await _current_card(client)
    card.rates[0].model.peak_dense_tflops.value = "1e40"
    error = await _error(
        client.stub.PublishRateCard(
            metering_pb2.PublishRateCardRequest(request_id="rc-huge", rate_card=card),
            metadata=client.metadata(Role.PROGRAM_OFFICE),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid rate_card.rates[0].model.peak_dense_tflops" in (error.details() or "")
    assert "above the maximum of 1000000 TFLOP/s" in (error.details() or "")
    assert await _versions(client) == [1]


def _with_new_model(card: metering_pb2.RateCard, name: str) -> metering_pb2.AcceleratorModel:
    added = card.rates.add()
    added.model.CopyFrom(card.rates[0].model)
    added.model.name = name
    return added.model


async def test_publish_rejects_unbounded_card(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    """Each card is rejected whole, naming its field, before anything is stored or priced."""
    _, client = running
    current = await _current_card(client)
    cases: list[tuple[str, Callable[[metering_pb2.RateCard], object], str]] = [
        (
            # Pricing this peak exactly kept the service busy for over 20 s.
            "rate_card.rates[0].model.peak_dense_tflops",
            lambda card: setattr(card.rates[0].model.peak_dense_tflops, "value", "1e-10000000"),
            "has more than 6 decimal places",
        ),
        (
            "rate_card.rates[0].model.peak_dense_tflops",
            lambda card: setattr(card.rates[0].model.peak_dense_tflops, "value", "989.40000001"),
            "has more than 6 decimal places",
        ),
        (
            "rate_card.rates[0].model.peak_dense_tflops",
            lambda card: setattr(card.rates[0].model.peak_dense_tflops, "value", "3_12"),
            "'3_12' is not a decimal number",
        ),
        (
            "rate_card.rates[0].model.peak_dense_tflops",
            lambda card: setattr(
                card.rates[0].model.peak_dense_tflops, "value", "\u0663\u0661\u0662"
            ),
            "is not a decimal number",
        ),
        (
            f"rate_card.rates[{len(current.rates)}].model.name",
            lambda card: _with_new_model(card, "H200 SXM\u200b"),
            "is not a model name that agents can report",
        ),
        (
            f"rate_card.rates[{len(current.rates)}].model.source",
            lambda card: setattr(_with_new_model(card, "NEW-1"), "source", "s" * 501),
            "above the maximum of 500",
        ),
        (
            "rate_card.rates[0].model.software_stacks[0]",
            lambda card: card.rates[0].model.software_stacks.insert(0, "x" * 65),
            "above the maximum of 64",
        ),
        (
            # With long texts, so many models could exceed the 1 MiB NATS payload.
            "rate_card.rates",
            lambda card: [_with_new_model(card, f"NEW-{i}") for i in range(257)],
            "above the maximum of 256",
        ),
    ]
    for index, (field, change, reason) in enumerate(cases):
        card = metering_pb2.RateCard()
        card.CopyFrom(current)
        change(card)
        error = await _error(
            client.stub.PublishRateCard(
                metering_pb2.PublishRateCardRequest(request_id=f"rc-bad-{index}", rate_card=card),
                metadata=client.metadata(Role.PROGRAM_OFFICE),
                timeout=10,
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert f"invalid {field}: " in (error.details() or "")
        assert reason in (error.details() or "")
    assert await _versions(client) == [1]


async def test_publish_accepts_added_model(
    running: tuple[Service, Client],  # noqa: F811
) -> None:
    _, client = running
    card = await _current_card(client)
    added = card.rates.add()
    added.model.CopyFrom(card.rates[0].model)
    added.model.name = "NEW-1"
    added.model.peak_dense_tflops.value = "1000000"
    published = await client.stub.PublishRateCard(
        metering_pb2.PublishRateCardRequest(request_id="rc-add", rate_card=card),
        metadata=client.metadata(Role.PROGRAM_OFFICE),
    )
    assert published.version == 2
    assert "NEW-1" in {rate.model.name for rate in published.rates}
    assert published.effective_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
