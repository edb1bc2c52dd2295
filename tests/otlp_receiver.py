"""A real OTLP/HTTP receiver for tests: accepts what OpenTelemetry exporters POST to /v1/metrics and
/v1/traces, decoded with opentelemetry-proto (protobuf, or JSON), and keeps every request.

Triton's exporter (2.51) posts traces as JSON with trace and span ids in hex, where OTLP/JSON's
protobuf mapping would have base64: `_hex_ids_to_base64` accepts both, as the OpenTelemetry
Collector's receiver does (OTLP/JSON requires hex ids; protobuf's JSON parser expects base64)."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` exporters use receiver.endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)."""

    def __init__(self):
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.traces: list[ExportTraceServiceRequest] = []
        self.posts = 0  # every POST, to any path: "nothing was sent" is posts == 0
        self.errors: list[str] = []  # bodies that could not be decoded
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.http.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()

    def points(self, name: str) -> Iterator[tuple[dict, object, dict]]:
        """(attributes, data point, resource attributes) of every point of metric `name` received."""
        with self.lock:
            requests = list(self.metrics)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name != name:
                            continue
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            yield {a.key: a.value.string_value for a in point.attributes}, point, resource


    def spans(self) -> list[Span]:
        """Every span received so far."""
        with self.lock:
            requests = list(self.traces)
        found = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        found.append(Span(span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                                          attributes_of(span.attributes), resource, scope.scope.name, span))
        return found

    def wait_for_spans(self, done, timeout_s: float = 30.0) -> list[Span]:
        """The spans received, once `done(spans)` holds (AssertionError with what came after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.spans()):
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout_s:g} s, {len(spans)} span(s) received, the last: "
                                     + ", ".join(f"{s.name} ({s.trace_id[:8]})" for s in spans[-12:])
                                     + "".join(f"\nrefused: {error}" for error in self.errors))
            time.sleep(0.1)
        return spans


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str        # hex, as in a traceparent header
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict
    resource: dict
    scope: str
    proto: object


def attributes_of(attributes) -> dict:
    """OTLP KeyValues as a dict of plain values (arrays as lists)."""
    def plain(value):
        kind = value.WhichOneof("value")
        if kind == "array_value":
            return [plain(v) for v in value.array_value.values]
        return getattr(value, kind) if kind else None
    return {a.key: plain(a.value) for a in attributes}


def _hex_ids_to_base64(document):
    """OTLP/JSON's hex traceId/spanId/parentSpanId as the base64 protobuf's JSON parser reads."""
    if isinstance(document, dict):
        for key, item in document.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(item, str) and len(item) in (16, 32):
                try:
                    document[key] = base64.b64encode(bytes.fromhex(item)).decode()
                except ValueError:
                    pass  # already base64
            else:
                _hex_ids_to_base64(item)
    elif isinstance(document, list):
        for item in document:
            _hex_ids_to_base64(item)
    return document


def value(point) -> float:
    """A sum's data point value, whether the exporter sent it as an integer or a double."""
    return getattr(point, point.WhichOneof("value"))


def _handler(receiver: OtlpReceiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self._body()
            with receiver.lock:
                receiver.posts += 1
            kinds = {"/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, receiver.metrics),
                     "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, receiver.traces)}
            if self.path not in kinds:
                self.send_response(404)
                self.end_headers()
                return
            message, response, kept = kinds[self.path]
            try:
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    request = json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), message(), ignore_unknown_fields=True)
                else:
                    request = message.FromString(body)
            except (ValueError, json_format.ParseError) as error:  # kept: a test that waits in vain says why
                with receiver.lock:
                    receiver.errors.append(f"{self.path}: {error}")
                self.send_response(400)
                self.end_headers()
                return
            with receiver.lock:
                kept.append(request)
            answer = response().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def _body(self) -> bytes:
            """The request body, whole: Node.js exporters send it chunked, without a Content-Length."""
            if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            else:
                body = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return body

        def log_message(self, *args):
            pass

    return Handler
