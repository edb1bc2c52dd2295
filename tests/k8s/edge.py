"""The gateway's hop in tests: a real gRPC proxy in front of a real Triton that forwards every unary call
as raw bytes (metadata, deadline and status passed through) and counts ModelInfer calls as Envoy's
grpc_stats filter does for one Envoy cluster: total, success (status OK), failure (anything else) and
one counter per status code. It serves them in the shape Envoy Gateway v1.9's proxies export
(k8s/components/gateway-grpc/edge-metrics.yaml):

    envoy_cluster_grpc_ModelInfer_total{envoy_cluster_name="grpcroute/<ns>/triton/rule/0/backend/1",
                                        envoy_grpc_bridge_service="inference", envoy_grpc_bridge_method="GRPCInferenceService"}

No Envoy runs on these machines; what this stands for is one fact about Envoy (a call's gRPC status
is what the caller got, whether Triton's scheduler saw the call or not), and the counting is that of
grpc_stats: a counter appears with its first increment."""

from __future__ import annotations

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

MESSAGE_LIMIT = 64 * 1024 * 1024
INFER = "/inference.GRPCInferenceService/ModelInfer"


class EdgeProxy:
    """`with EdgeProxy(backend_address, cluster) as edge:` callers use edge.grpc_url, Prometheus scrapes
    edge.metrics_address. `cluster` may be several names, each exported with the same counts (one
    backend seen from several test scenarios)."""

    def __init__(self, backend: str, cluster: str | list[str]):
        self.clusters = [cluster] if isinstance(cluster, str) else list(cluster)
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        options = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]
        self.channel = grpc.insecure_channel(backend, options=options)
        self.server = grpc.server(futures.ThreadPoolExecutor(32), options=options)
        self.server.add_generic_rpc_handlers([_Forward(self)])
        self.grpc_url = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _metrics_handler(self))
        self.metrics_address = f"127.0.0.1:{self.http.server_address[1]}"

    def count(self, code: grpc.StatusCode) -> None:
        with self.lock:
            for stat in ("total", "success" if code == grpc.StatusCode.OK else "failure", str(code.value[0])):
                self.counts[stat] = self.counts.get(stat, 0) + 1

    def exposition(self) -> str:
        with self.lock:
            counts = dict(self.counts)
        lines = []
        for stat, value in sorted(counts.items()):
            name = f"envoy_cluster_grpc_ModelInfer_{stat}"
            lines.append(f"# TYPE {name} counter")
            for cluster in self.clusters:
                labels = (f'envoy_cluster_name="{cluster}",envoy_grpc_bridge_service="inference",'
                          f'envoy_grpc_bridge_method="GRPCInferenceService"')
                lines.append(f"{name}{{{labels}}} {value}")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> EdgeProxy:
        self.server.start()
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
        self.http.shutdown()
        self.channel.close()


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, edge: EdgeProxy):
        self.edge = edge

    def service(self, handler_call_details):
        method = handler_call_details.method
        upstream = self.edge.channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = [(k, v) for k, v in context.invocation_metadata() if not k.startswith(":")]
            try:
                response = upstream(request, metadata=metadata, timeout=context.time_remaining())
            except grpc.RpcError as error:
                if method == INFER:
                    self.edge.count(error.code())
                context.abort(error.code(), error.details() or "")
            if method == INFER:
                self.edge.count(grpc.StatusCode.OK)
            return response

        return grpc.unary_unary_rpc_method_handler(forward)


def _metrics_handler(edge: EdgeProxy):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = edge.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler
