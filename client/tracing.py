"""One trace from the caller to every ensemble step: OpenTelemetry spans of the client library, and the
W3C `traceparent` it sends Triton in the gRPC metadata.

Spans (tracer `histoserve.client`), the same in the Python and Node.js clients:

    histoserve.classify                        one per request (a batch of files); attributes
                                               histoserve.model, histoserve.files (the paths),
                                               histoserve.batch_size (files sent)
      histoserve.preprocess                    per file (pixel models: decoded and resized here)
      or histoserve.read_file                  per file (encoded models: sent as it is); file.path,
                                               status ERROR with the reason for a file that cannot be used
      inference.GRPCInferenceService/ModelInfer
                                               CLIENT, one per RPC attempt (retries are siblings);
                                               rpc.system, rpc.service, rpc.method,
                                               rpc.grpc.status_code, server.address, histoserve.model,
                                               histoserve.model.version (the version that answered)
        InferRequest → <model> → compute        Triton's own spans (mode=opentelemetry), parented by
                                               the attempt's traceparent; an ensemble adds one model
                                               span and compute span per step

The parent of histoserve.classify is the caller's active span: a service that traces its own requests
gets ours inside them. `infer()` called directly starts no classify span; its attempt spans are
children of whatever span is current.

`traceparent` is sent only for a *sampled* span. Triton traces every request that carries a valid
trace context, whatever its sampled flag (measured on 2.51; server src/tracer.cc sets force_sample for
any valid context), so sending unsampled contexts would make Triton trace every request that a
caller's 1 % sampler meant to skip.

Only OpenTelemetry's API is a dependency: with no TracerProvider configured every span is a no-op
(nothing is exported, no traceparent is sent, `trace_id` is None). `python -m histoserve.client classify`
configures one from the standard environment variables when OTEL_TRACES_EXPORTER names an exporter
(`configure_tracing_from_environment`; needs `pip install histoserve[telemetry]`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc
from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tritonclient.utils import InferenceServerException

from histoserve.client.telemetry import TelemetryConfigError, exporter_names, grpc_code, instance_id, otlp_exporter

TRACER = "histoserve.client"
CLASSIFY_SPAN, PREPROCESS_SPAN, READ_FILE_SPAN = "histoserve.classify", "histoserve.preprocess", "histoserve.read_file"
RPC_SERVICE, RPC_METHOD = "inference.GRPCInferenceService", "ModelInfer"
RPC_SPAN = f"{RPC_SERVICE}/{RPC_METHOD}"

_tracer = trace.get_tracer(TRACER)  # a proxy: follows the TracerProvider the process configures later


def current_context() -> context.Context:
    """The caller's context, to carry into worker threads (threads do not inherit it)."""
    return context.get_current()


@contextmanager
def classify_span(model: str, paths: list[str], parent: context.Context | None = None) -> Iterator[trace.Span]:
    """The span of one request's files, current inside the block."""
    attributes = {"histoserve.model": model, "histoserve.files": list(paths)}
    with _tracer.start_as_current_span(CLASSIFY_SPAN, context=parent, kind=SpanKind.INTERNAL, attributes=attributes) as span:
        yield span


@contextmanager
def file_span(path: str, encoded: bool) -> Iterator[trace.Span]:
    """The span of reading (and, for a pixel model, preprocessing) one file. The caller marks a file
    that cannot be used with `failed`."""
    with _tracer.start_as_current_span(READ_FILE_SPAN if encoded else PREPROCESS_SPAN,
                                       attributes={"file.path": path}) as span:
        yield span


def failed(span: trace.Span, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))


@contextmanager
def rpc_span(model: str, server: str) -> Iterator[tuple[trace.Span, dict[str, str]]]:
    """One ModelInfer attempt: the span, and the gRPC metadata that carries its context to Triton
    (empty unless the span is sampled). Records the attempt's gRPC status."""
    attributes = {"rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": RPC_METHOD,
                  "histoserve.model": model, **server_attributes(server)}
    with _tracer.start_as_current_span(RPC_SPAN, kind=SpanKind.CLIENT, attributes=attributes,
                                       record_exception=False, set_status_on_exception=False) as span:
        headers: dict[str, str] = {}
        if span.get_span_context().trace_flags.sampled:  # from this span, not whatever is current (gevent, threads)
            propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            yield span, headers
        except InferenceServerException as error:
            code = grpc_code(error)
            span.set_attribute("rpc.grpc.status_code", status_number(code))
            span.set_status(Status(StatusCode.ERROR, f"{code}: {(error.message() or '').strip()}"))
            raise
        except BaseException as error:  # Ctrl-C, a bug: the span still ends, marked
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        span.set_attribute("rpc.grpc.status_code", 0)


def server_attributes(url: str) -> dict[str, str | int]:
    """server.address (the host) and server.port of a gRPC target: host:port, dns:///host:port,
    ipv4:a:port (its first address)."""
    target = url.split("///", 1)[-1].removeprefix("ipv4:").split(",")[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return {"server.address": target}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


def answered(span: trace.Span, version: str) -> None:
    span.set_attribute("histoserve.model.version", version)


def status_number(name: str) -> int:
    """gRPC's number for a status name (2, UNKNOWN, for a name it does not know)."""
    try:
        return grpc.StatusCode[name].value[0]
    except KeyError:
        return grpc.StatusCode.UNKNOWN.value[0]


def trace_id_of(span: trace.Span) -> str | None:
    """The span's trace id as 32 hex digits (as in traceparent and in tracing back ends), or None when
    it is not sampled: no back end will have it."""
    span_context = span.get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid and span_context.trace_flags.sampled else None


def configure_tracing_from_environment(environment: Mapping[str, str] | None = None):
    """A TracerProvider set up as OpenTelemetry's environment variables ask, made the global one; None
    (and nothing set up) when OTEL_TRACES_EXPORTER is unset or "none" (the CLIs trace only when told to,
    unlike OpenTelemetry's auto-instrumentation, whose default is otlp). Exporters, comma-separated:
    `otlp` (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL: http/protobuf, the
    default, or grpc; endpoint, headers, timeout and certificates from the exporter's own variables),
    `console` (to stderr: stdout holds the results). The sampler comes from OTEL_TRACES_SAMPLER /
    OTEL_TRACES_SAMPLER_ARG (parentbased_always_on by default), the batch processor's settings from
    OTEL_BSP_*, the resource from OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES (with a service.instance.id of its own). The W3C trace-context propagator
    is OpenTelemetry's default (OTEL_PROPAGATORS). Call the provider's shutdown() before exiting: it
    exports the spans still queued."""
    environment = os.environ if environment is None else environment
    names = exporter_names(environment, "OTEL_TRACES_EXPORTER")
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as error:
        raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK: "
                                   f"pip install 'histoserve[telemetry]' ({error})") from error
    exporters = []
    for name in names:
        if name == "otlp":
            protocol = environment.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environment.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                              "http/protobuf"))
            exporters.append(otlp_exporter("trace", protocol))
        elif name == "console":
            exporters.append(ConsoleSpanExporter(out=sys.stderr))  # stdout holds the result lines
        elif name != "none":
            raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
    provider = TracerProvider(resource=Resource.create(instance_id(environment)))  # sampler: OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider

