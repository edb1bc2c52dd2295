"""A real OTLP/HTTP receiver for tests: accepts what OpenTelemetry exporters POST to /v1/metrics,
decoded with opentelemetry-proto (protobuf, or OTLP/JSON), and keeps every request."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` exporters use receiver.endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)."""

    def __init__(self):
        self.metrics: list[ExportMetricsServiceRequest] = []
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


def value(point) -> float:
    """A sum's data point value, whether the exporter sent it as an integer or a double."""
    return getattr(point, point.WhichOneof("value"))


def _handler(receiver: OtlpReceiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self._body()
            if self.path != "/v1/metrics":
                self.send_response(404)
                self.end_headers()
                return
            if self.headers.get("Content-Type", "").startswith("application/json"):
                request = json_format.Parse(body, ExportMetricsServiceRequest())
            else:
                request = ExportMetricsServiceRequest.FromString(body)
            with receiver.lock:
                receiver.metrics.append(request)
            answer = ExportMetricsServiceResponse().SerializeToString()
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
