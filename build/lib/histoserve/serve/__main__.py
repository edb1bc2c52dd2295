"""python -m serve [--model-repository model_repository] [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
                 [--model-control-mode poll --repository-poll-secs 5]
                 [--grpc-tls-cert CERT --grpc-tls-key KEY [--grpc-tls-client-ca CA]]

Runs the real Triton Inference Server over a CPU derivative of the model repository until Ctrl-C or
SIGTERM, then stops it and everything it started. With --model-control-mode poll, versions that
`python -m export` publishes while it runs are loaded (the previous ones keep serving), as on
Kubernetes; a version that fails to load is reported on stderr and the others keep serving.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from histoserve.serve.local_repository import LocalRepositoryError
from histoserve.serve.server import GrpcTls, Ports, ServerError, TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--model-control-mode", choices=["none", "poll"], default="none",
                        help="poll: load versions published while serving (default: %(default)s)")
    parser.add_argument("--repository-poll-secs", type=float, default=5.0, help="with poll (default: %(default)s)")
    parser.add_argument("--grpc-tls-cert", type=Path, help="serve gRPC over TLS with this certificate chain (PEM)")
    parser.add_argument("--grpc-tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument("--grpc-tls-client-ca", type=Path,
                        help="mutual TLS: accept only clients whose certificate this CA signed")
    args = parser.parse_args(argv)
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key) or (args.grpc_tls_client_ca and not args.grpc_tls_cert):
        parser.error("TLS needs --grpc-tls-cert and --grpc-tls-key (and --grpc-tls-client-ca only with them)")
    tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca) if args.grpc_tls_cert else None

    def request_stop(signum, _frame):
        raise KeyboardInterrupt

    server = TritonServer(args.model_repository, Ports(args.http_port, args.grpc_port, args.metrics_port),
                          args.address, args.ready_timeout, args.log_verbose,
                          model_control_mode=args.model_control_mode, repository_poll_s=args.repository_poll_secs,
                          grpc_tls=tls)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"starting tritonserver on {args.model_repository} ...", flush=True)
        server.start()
        print(f"ready: models {', '.join(server.models)}", flush=True)
        print(f"  gRPC     {server.grpc_url}" + (" (TLS" + (", mutual)" if tls.client_ca else ")") if tls else ""), flush=True)
        print(f"  HTTP     {server.http_url}", flush=True)
        print(f"  metrics  {server.metrics_url}", flush=True)
        print(f"  log      {server.log_file}", flush=True)
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        code = server.process.wait()
        print(f"error: tritonserver exited on its own with code {code}:\n{server.log_tail()}", file=sys.stderr)
        server.stop()
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping tritonserver ...", flush=True)
        code = server.stop()
        print(f"stopped (exit code {code}).", flush=True)
        return 0
    except (ServerError, LocalRepositoryError) as error:
        server.stop()
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
