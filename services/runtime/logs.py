"""Logging setup shared by every acsp process.

Call :func:`configure_logging` once at start; modules then log with
``logging.getLogger(__name__)`` and pass ids through ``extra``::

    log.info("hold placed", extra={"grant_id": grant_id, "job_id": job_id})

With ``ACSP_LOG_FORMAT=json`` each line is a JSON object with the same fields instead.

Each line carries the service, the trace id of the current OpenTelemetry span, the request id
set by the server's interceptor, and every ``extra`` field as ``key=value``::

    2026-12-04T17:40:01.123Z INFO services.grant.ledger [grant trace=4bf9… req=9c1e…] hold placed
    grant_id=g-17 job_id=j-4
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Final, TextIO

from opentelemetry import trace

from services.runtime import context

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "service", "trace_id", "span_id", "request_id"}
)


class ContextFilter(logging.Filter):
    """Add ``service``, ``trace_id``, ``span_id`` and ``request_id`` to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = None
            record.span_id = None
        if getattr(record, "request_id", None) is None:
            record.request_id = context.request_id()
        return True


class KeyValueFormatter(logging.Formatter):
    """Format records as one line: time, level, logger, context, message, then extras."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname, record.name]
        tags = [str(getattr(record, "service", "") or "-")]
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            tags.append(f"trace={trace_id}")
        request_id = getattr(record, "request_id", None)
        if request_id:
            tags.append(f"req={request_id}")
        parts.append(f"[{' '.join(tags)}]")
        parts.append(record.getMessage())
        parts.extend(f"{key}={_format_value(value)}" for key, value in _extras(record))
        line = " ".join(parts)
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(KeyValueFormatter):
    """Format records as one JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "service": getattr(record, "service", None),
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id", "request_id"):
            value = getattr(record, key, None)
            if value:
                document[key] = value
        for key, value in _extras(record):
            document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(
    service: str,
    level: str = "INFO",
    stream: TextIO | None = None,
    log_format: str = "text",
) -> None:
    """Send every logger's records to ``stream`` (default stderr), one line per record.

    ``log_format`` is ``text`` (key=value) or ``json``. Replaces the root logger's handlers,
    so calling it again (in tests) does not duplicate lines.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    handler.addFilter(ContextFilter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries log every poll and message at DEBUG; their INFO and above is enough even when
    # the service itself logs at DEBUG.
    for noisy in ("asyncio", "grpc", "nats", "opentelemetry"):
        logging.getLogger(noisy).setLevel(logging.INFO if level == "DEBUG" else logging.WARNING)


def _extras(record: logging.LogRecord) -> list[tuple[str, Any]]:
    return [
        (key, value)
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
    ]


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(char.isspace() or char in '"=' for char in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
