"""python -m histoserve.serve [--model-repository model_repository] [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
                 [--model-control-mode poll --repository-poll-secs 5] [--admin-key-file FILE] [--no-http]
                 [--grpc-tls-cert CERT --grpc-tls-key KEY [--grpc-tls-client-ca CA]]

Runs the real Triton Inference Server over a CPU derivative of the model repository until Ctrl-C or
SIGTERM, then stops it and everything it started. With --model-control-mode poll, versions that
`python -m histoserve.export` publishes while it runs are loaded (the previous ones keep serving), as on
Kubernetes; a version that fails to load is reported on stderr and the others keep serving.

As in production, Triton's admin APIs (repository index and model control, shared memory,
statistics, trace and log settings) answer only callers that send the admin key: the one in
--admin-key-file or HISTOSERVE_ADMIN_KEY, else one made for this run, whose file is printed at
start (pass it to the admin tools with --admin-key-file). Inference, metadata, model config and
health need no key. --no-http turns Triton's HTTP/REST endpoint off, as the Kubernetes Deployment does.

Two more commands run in each Kubernetes Triton pod, which serves one pinned version:
  python -m histoserve.serve stage --store S --model M --version N --target T --trusted-keys K
      copy one version, verified against its signature (by a key in K) and its SHA256SUMS
  python -m histoserve.serve golden-gate --repository T --model M --version N   ready only once Triton gives the golden answers
(`python -m histoserve.serve stage --help`, `python -m histoserve.serve golden-gate --help`.)
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from histoserve.formats.admin import ENVIRONMENT_VARIABLE, AdminKey, AdminKeyError
from histoserve.formats.options import NON_NEGATIVE_INT, POSITIVE, Range, add_command, existing_file, existing_folder
from histoserve.serve import golden_gate, stage
from histoserve.serve.cpu_repository import CpuRepositoryError
from histoserve.serve.server import TritonServer
from histoserve.serve.triton_flags import GrpcTls, Ports, ServerError

PORT = Range(int, 1, 65535)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `stage --model` must reach the subcommand, not match --model-repository here
    parser = argparse.ArgumentParser(prog="python -m histoserve.serve", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=existing_folder, default=Path("model_repository"))
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=PORT, default=8000)
    parser.add_argument("--grpc-port", type=PORT, default=8001)
    parser.add_argument("--metrics-port", type=PORT, default=8002)
    parser.add_argument("--ready-timeout", type=POSITIVE, default=180.0, help="seconds to wait for readiness")
    parser.add_argument("--log-verbose", type=NON_NEGATIVE_INT, default=0)
    parser.add_argument("--model-control-mode", choices=["none", "poll"], default="none",
                        help="poll: load versions published while serving (default: %(default)s)")
    parser.add_argument("--repository-poll-secs", type=POSITIVE, default=5.0, help="with poll (default: %(default)s)")
    parser.add_argument("--grpc-tls-cert", type=existing_file, help="serve gRPC over TLS with this certificate chain (PEM)")
    parser.add_argument("--grpc-tls-key", type=existing_file, help="the certificate's private key (PEM)")
    parser.add_argument("--grpc-tls-client-ca", type=existing_file,
                        help="mutual TLS: accept only clients whose certificate this CA signed")
    parser.add_argument("--admin-key-file", type=Path,
                        help=f"the admin APIs' key (default: ${ENVIRONMENT_VARIABLE}, else a new key for this run)")
    parser.add_argument("--no-http", action="store_true", help="turn Triton's HTTP/REST endpoint off (gRPC and metrics stay)")
    parser.set_defaults(run=run_triton, parser=parser)
    commands = parser.add_subparsers(dest="command", title="commands run in each Kubernetes Triton pod",
                                     metavar="{stage,golden-gate}")
    add_command(commands, "stage", stage, "copy one version from the store, verified")
    add_command(commands, "golden-gate", golden_gate, "ready only once Triton gives the golden answers")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command and (before := argv[:argv.index(args.command)]):  # argparse would drop them without a word
        parser.error(f"{' '.join(before)}: options of the local server; `{args.command}` takes only its own")
    return args.run(args, args.parser)


def run_triton(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key) or (args.grpc_tls_client_ca and not args.grpc_tls_cert):
        parser.error("TLS needs --grpc-tls-cert and --grpc-tls-key (and --grpc-tls-client-ca only with them)")
    if args.no_http and args.grpc_tls_cert:
        parser.error("--no-http with gRPC over TLS: serve checks the server's readiness over HTTP then; keep HTTP on")
    try:
        admin_key = AdminKey.resolve(args.admin_key_file)
    except AdminKeyError as error:
        parser.error(str(error))
    tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca) if args.grpc_tls_cert else None
    server = TritonServer(args.model_repository, Ports(args.http_port, args.grpc_port, args.metrics_port),
                          args.address, args.ready_timeout, args.log_verbose,
                          model_control_mode=args.model_control_mode, repository_poll_s=args.repository_poll_secs,
                          grpc_tls=tls, admin_key=admin_key, allow_http=not args.no_http)
    key_source = args.admin_key_file or (f"${ENVIRONMENT_VARIABLE}" if admin_key else None)
    return serve_until_stopped(server, key_source)


def serve_until_stopped(server: TritonServer, key_source: str | Path | None) -> int:
    """Start, print where everything is, and run until Ctrl-C or SIGTERM (0) or the server dies (1)."""

    def request_stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"starting tritonserver on {server.model_repository} ...", flush=True)
        server.start()
        tls = server.grpc_tls
        print(f"ready: models {', '.join(server.models)}", flush=True)
        print(f"  gRPC     {server.grpc_url}" + (" (TLS" + (", mutual)" if tls.client_ca else ")") if tls else ""), flush=True)
        print(f"  HTTP     {server.http_url if server.http_enabled else 'off'}", flush=True)
        print(f"  metrics  {server.metrics_url}", flush=True)
        print(f"  admin    key in {key_source or server.admin_key_file} (admin APIs refuse callers without it)", flush=True)
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
    except (ServerError, CpuRepositoryError) as error:
        server.stop()
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
