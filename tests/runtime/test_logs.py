"""Log lines carry the service, trace id, request id and extras."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.runtime import context
from services.runtime.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("grant", "INFO", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def test_line_carries_ids_and_extras(stream: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    token = context.set_request_id("req-1")
    try:
        with tracer.start_as_current_span("call") as span:
            logging.getLogger("services.grant.ledger").info(
                "hold placed for %s", "j-4", extra={"grant_id": "g-17", "note": "two words"}
            )
            trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        context.reset_request_id(token)
    line = stream.getvalue().strip()
    assert f"[grant trace={trace_id} req=req-1] hold placed for j-4" in line
    assert line.endswith('grant_id=g-17 note="two words"')
    assert " INFO services.grant.ledger " in line


def test_line_outside_request_has_no_ids(stream: io.StringIO) -> None:
    logging.getLogger("x").warning("started")
    line = stream.getvalue().strip()
    assert line.endswith("WARNING x [grant] started")


def test_configure_twice_does_not_duplicate(stream: io.StringIO) -> None:
    configure_logging("grant", "INFO", stream=stream)
    logging.getLogger("x").info("once")
    assert stream.getvalue().count("once") == 1


def test_json_format_keeps_fields(stream: io.StringIO) -> None:
    configure_logging("metering", "INFO", stream=stream, log_format="json")
    token = context.set_request_id("req-2")
    try:
        logging.getLogger("services.metering.ingest").warning(
            "sample rejected", extra={"node": "n-1", "count": 3}
        )
    finally:
        context.reset_request_id(token)
    document = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert document["service"] == "metering"
    assert document["level"] == "WARNING"
    assert document["message"] == "sample rejected"
    assert document["request_id"] == "req-2"
    assert document["node"] == "n-1"
    assert document["count"] == 3
