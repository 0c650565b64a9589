"""OTLP export and trace context helpers, against a small OTLP receiver of our own."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry import propagate
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.runtime.settings import Settings
from services.runtime.telemetry import (
    context_from_headers,
    context_from_metadata,
    inject_headers,
    inject_metadata,
    setup_telemetry,
    trace_id_hex,
)


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every OTLP trace export request it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[TraceReceiver, int]]:
    # A thread-based server, because the OTLP exporter flushes synchronously at shutdown and
    # would block an asyncio server running in the same event loop.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    traces = TraceReceiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(traces, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield traces, port
    server.stop(0)


def test_otlp_exporter_sends_spans(receiver: tuple[TraceReceiver, int]) -> None:
    traces, port = receiver
    settings = Settings.from_env(
        {"ACSP_OTEL_EXPORTER": "otlp", "ACSP_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    )
    telemetry = setup_telemetry("grant", settings)
    with telemetry.tracer.start_as_current_span("award grant"):
        pass
    telemetry.shutdown()
    spans = [
        (resource_spans.resource, span)
        for request in traces.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert [span.name for _, span in spans] == ["award grant"]
    attributes = {item.key: item.value.string_value for item in spans[0][0].attributes}
    assert attributes["service.name"] == "acsp-grant"


def test_metadata_round_trip_keeps_trace() -> None:
    settings = Settings.from_env({})
    telemetry = setup_telemetry("scheduler", settings)
    with telemetry.tracer.start_as_current_span("submit"):
        trace_id = trace_id_hex()
        metadata = inject_metadata([("x-request-id", "r-1")])
        headers = inject_headers({"Nats-Msg-Id": "m-1"})
    telemetry.shutdown()
    assert trace_id is not None
    assert metadata[0] == ("x-request-id", "r-1")
    assert headers["Nats-Msg-Id"] == "m-1"
    for carried in (context_from_metadata(metadata), context_from_headers(headers)):
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=carried)
        assert trace_id in carrier["traceparent"]


def test_no_trace_outside_span() -> None:
    assert trace_id_hex() is None
    assert "traceparent" not in inject_headers()
