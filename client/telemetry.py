"""What callers get, counted where they call: OpenTelemetry metrics of the client library.

Instruments (meter `histoserve.client`), each with the attributes `model`, `version` and `grpc_code`:

    histoserve.client.calls           counter    one per inference call, with the status the caller got
                                                 (after retries within its deadline)
    histoserve.client.attempts        counter    one per RPC attempt, with the status Triton (or the gateway)
                                                 answered: refusals a retry then hid show here
    histoserve.client.call.duration   histogram  seconds per call, retries included (buckets from 1 ms to
                                                 60 s, 0.5 s among them: the SLO's threshold)

`version` is the version that answered, or, for a call that failed, the version asked for ("" for the
newest). `grpc_code` is the gRPC status name (OK, UNAVAILABLE, DEADLINE_EXCEEDED, ...). Exported to
Prometheus they are `histoserve_client_calls_total`, `histoserve_client_attempts_total` and
`histoserve_client_call_duration_seconds_{bucket,sum,count}` (OpenTelemetry's Prometheus naming:
dots to underscores, the unit and `_total` appended); the SLO rules in k8s/components/monitoring read
those names.

Only OpenTelemetry's API is a dependency of the client: with no MeterProvider configured by the
process, every instrument is a no-op and nothing is exported. A service that already configures
OpenTelemetry gets these metrics with its own. `python -m histoserve.client classify` configures one from the
standard environment variables when OTEL_METRICS_EXPORTER names an exporter
(`configure_from_environment`; needs `pip install histoserve[telemetry]`).
"""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from collections.abc import Mapping
from functools import cache

from opentelemetry import metrics
from tritonclient.utils import InferenceServerException

METER = "histoserve.client"
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def grpc_code(error: BaseException | None) -> str:
    """The gRPC status name of a failed call ("UNKNOWN" when the error carries none)."""
    status = error.status() if isinstance(error, InferenceServerException) else None
    return (status or "StatusCode.UNKNOWN").removeprefix("StatusCode.")


class CallMetrics:
    """The three instruments, from `meter_provider` (default: the process's global one, a no-op until
    something configures OpenTelemetry)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None):
        meter = metrics.get_meter(METER, meter_provider=meter_provider)
        self.calls = meter.create_counter("histoserve.client.calls", unit="{call}",
                                          description="Inference calls, by the gRPC status the caller got after retries")
        self.attempts = meter.create_counter("histoserve.client.attempts", unit="{attempt}",
                                             description="Inference RPC attempts, by the gRPC status each one got")
        self.duration = meter.create_histogram("histoserve.client.call.duration", unit="s",
                                               description="Inference call duration, retries included",
                                               explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)

    def attempt(self, model: str, version: str, code: str) -> None:
        self.attempts.add(1, {"model": model, "version": version, "grpc_code": code})

    def call(self, model: str, version: str, code: str, seconds: float) -> None:
        attributes = {"model": model, "version": version, "grpc_code": code}
        self.calls.add(1, attributes)
        self.duration.record(seconds, attributes)


@cache
def process_metrics() -> CallMetrics:
    """The instruments on the process's global MeterProvider, made once (OpenTelemetry warns when an
    instrument is created again): what every classifier counts with unless given its own."""
    return CallMetrics()


class TelemetryConfigError(RuntimeError):
    """OTEL_METRICS_EXPORTER names an exporter that cannot be set up; the message says why."""


def configure_from_environment(environment: Mapping[str, str] | None = None):
    """A MeterProvider set up as OpenTelemetry's environment variables ask, made the global one; None
    (and nothing set up) when OTEL_METRICS_EXPORTER is unset or "none". Exporters, comma-separated:
    `otlp` (OTEL_EXPORTER_OTLP_METRICS_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf, the
    default, or grpc; endpoint, headers, timeout and certificates from the exporter's own variables),
    `prometheus` (a /metrics endpoint on OTEL_EXPORTER_PROMETHEUS_HOST:OTEL_EXPORTER_PROMETHEUS_PORT,
    localhost:9464 by default), `console`. The resource comes from OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES (with a service.instance.id of its own), the export interval from
    OTEL_METRIC_EXPORT_INTERVAL (60 s by default). Call the provider's shutdown() before exiting: it
    exports what was not yet sent."""
    environment = os.environ if environment is None else environment
    names = exporter_names(environment, "OTEL_METRICS_EXPORTER")
    if not names:
        return None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError as error:
        raise TelemetryConfigError(f"OTEL_METRICS_EXPORTER={','.join(names)} needs the OpenTelemetry SDK: "
                                   f"pip install 'histoserve[telemetry]' ({error})") from error
    readers = []
    for name in names:
        if name == "otlp":
            protocol = environment.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", environment.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                               "http/protobuf"))
            readers.append(PeriodicExportingMetricReader(otlp_exporter("metric", protocol)))
        elif name == "prometheus":
            readers.append(_prometheus_reader(environment))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))  # stdout: results
        elif name != "none":
            raise TelemetryConfigError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r} (otlp, prometheus, console, none)")
    provider = MeterProvider(metric_readers=readers, resource=Resource.create(instance_id(environment)))
    metrics.set_meter_provider(provider)
    return provider


def exporter_names(environment: Mapping[str, str], variable: str) -> list[str]:
    """The exporters an OTEL_*_EXPORTER variable names; [] when it is unset or only "none"."""
    names = [n.strip() for n in environment.get(variable, "").split(",") if n.strip()]
    return [] if names == ["none"] else names


def instance_id(environment: Mapping[str, str]) -> dict[str, str]:
    """A service.instance.id of this process's own, unless OTEL_RESOURCE_ATTRIBUTES names one: two runs
    with the same OTEL_SERVICE_NAME at once would otherwise write into the same series, and their
    interleaved cumulative counts would read as counter resets."""
    given = {item.split("=", 1)[0].strip() for item in environment.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if "=" in item}
    return {} if "service.instance.id" in given else {"service.instance.id": str(uuid.uuid4())}


def otlp_exporter(signal: str, protocol: str):
    """OpenTelemetry's OTLP exporter of `signal` ("metric" or "trace") over `protocol` (http/protobuf or
    grpc), set up from the exporter's own environment variables."""
    module, name = {"metric": ("metric_exporter", "OTLPMetricExporter"), "trace": ("trace_exporter", "OTLPSpanExporter")}[signal]
    transport = {"http/protobuf": "http", "grpc": "grpc"}.get(protocol)
    if transport is None:
        raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf, grpc)")
    try:
        exporter = getattr(importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{module}"), name)
    except ImportError as error:
        raise TelemetryConfigError(f"the OTLP {protocol} exporter is not installed: pip install 'histoserve[telemetry]' "
                                   f"(grpc: opentelemetry-exporter-otlp-proto-grpc) ({error})") from error
    return exporter()


def _prometheus_reader(environment):
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as error:
        raise TelemetryConfigError(f"the Prometheus exporter is not installed: pip install 'histoserve[telemetry]' ({error})") from error
    host = environment.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    port = environment.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
    try:
        start_http_server(int(port), addr=host)
    except (ValueError, OSError) as error:
        raise TelemetryConfigError(f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT: cannot serve metrics on {host}:{port}: {error}") from error
    return PrometheusMetricReader()
