"""OpenTelemetry traces and metrics, and trace context in gRPC metadata and NATS headers.

:func:`setup_telemetry` builds the tracer and meter providers a service uses, with the exporter
chosen by ``ACSP_OTEL_EXPORTER``:

* ``none``: spans and metrics are recorded (so logs still carry trace ids) but not exported;
* ``console``: spans and metrics are written to stderr;
* ``otlp``: both go to the OTLP gRPC collector at ``ACSP_OTLP_ENDPOINT``;
* ``prometheus``: metrics are served on ``ACSP_PROMETHEUS_PORT`` at ``/metrics``, spans go
  nowhere.

The first call in a process also installs its providers as the OpenTelemetry globals, so
``opentelemetry.trace.get_tracer(__name__)`` works anywhere. The server and channel
interceptors carry trace context in W3C ``traceparent`` metadata; NATS publishers and consumers
use :func:`inject_headers` and :func:`context_from_headers` (``services.runtime.nats`` does it
for you).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from services.runtime.settings import Settings, SettingsError

log = logging.getLogger(__name__)

_globals_installed = False


@dataclass
class Telemetry:
    """The tracer and meter of one service, and what must be flushed at shutdown."""

    service: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: trace.Tracer = field(init=False)
    meter: metrics.Meter = field(init=False)
    _http_server: Any = None

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer("acsp." + self.service)
        self.meter = self.meter_provider.get_meter("acsp." + self.service)

    def shutdown(self) -> None:
        """Flush and stop exporters; spans still open are dropped."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._http_server is not None:
            self._http_server.shutdown()


def setup_telemetry(service: str, settings: Settings) -> Telemetry:
    """Build the providers for ``service`` with the exporter ``settings`` chooses."""
    resource = Resource.create({"service.name": f"acsp-{service}", "service.namespace": "acsp"})
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    http_server = None
    exporter = settings.otel_exporter
    if exporter == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = settings.otlp_endpoint.startswith("http://")
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=insecure))
        )
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=insecure)
            )
        )
    elif exporter == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader, start_http_server

        assert settings.prometheus_port is not None  # Settings.validate requires it
        try:
            started = start_http_server(settings.prometheus_port)
        except OSError as error:
            raise SettingsError(
                "ACSP_PROMETHEUS_PORT",
                f"cannot serve /metrics on port {settings.prometheus_port}: {error}",
                "choose a free port",
            ) from None
        readers.append(PrometheusMetricReader())
        # prometheus_client >= 0.20 returns (server, thread); older versions return None.
        http_server = started[0] if isinstance(started, tuple) else None
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    _install_globals(tracer_provider, meter_provider)
    log.debug("telemetry ready", extra={"exporter": exporter})
    return Telemetry(service, tracer_provider, meter_provider, _http_server=http_server)


def _install_globals(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    # OpenTelemetry lets a process set its global providers once; tests run several services
    # in one process, and later ones keep their own providers.
    global _globals_installed
    if _globals_installed:
        return
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _globals_installed = True


def inject_metadata(
    metadata: Sequence[tuple[str, str | bytes]] = (),
) -> list[tuple[str, str | bytes]]:
    """Return ``metadata`` plus the current trace context (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    present = {key for key, _ in metadata}
    return [*metadata, *((key, value) for key, value in carrier.items() if key not in present)]


def context_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Context:
    """Return the trace context carried in gRPC metadata (empty if none)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def inject_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return NATS headers with the current trace context added."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def context_from_headers(headers: Mapping[str, str] | None) -> Context:
    """Return the trace context carried in NATS message headers (empty if none)."""
    return propagate.extract(dict(headers or {}))


def trace_id_hex() -> str | None:
    """Return the current span's trace id as 32 hex digits, or None outside a span."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
