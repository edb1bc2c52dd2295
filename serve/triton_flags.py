"""Triton's command line, as data: the ports, addresses and policies a local server or a Deployment's
container runs with, rendered to `tritonserver` flags by `TritonFlags.flags()`. Nothing here starts
a process (serve/server.py does) or reads a repository (serve/repository_follower.py does).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from histoserve.formats.admin import AdminKey

CONTROL_MODES = ("none", "poll")


class ServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def items(self) -> list[tuple[str, int]]:
        return [("http", self.http), ("grpc", self.grpc), ("metrics", self.metrics)]


def free_ports(address: str = "127.0.0.1") -> Ports:
    """Three ports the OS says are free now (for tests and parallel runs)."""
    sockets = [socket.socket() for _ in range(3)]
    try:
        for s in sockets:
            s.bind((address, 0))
        return Ports(*(s.getsockname()[1] for s in sockets))
    finally:
        for s in sockets:
            s.close()


def check_ports_free(address: str, ports: Ports) -> None:
    taken = []
    for name, port in ports.items():
        with socket.socket() as s:
            # Like the servers themselves: a port in TIME_WAIT is free, one with a listener is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                taken.append(f"{name} port {port}")
    if taken:
        raise ServerError(
            f"{', '.join(taken)} on {address} already in use (another Triton?). "
            f"Stop it, or pick other ports with --http-port/--grpc-port/--metrics-port."
        )


@dataclass(frozen=True)
class GrpcTls:
    """TLS on Triton's gRPC endpoint (Triton's --grpc-use-ssl flags). With `client_ca`, mutual TLS:
    clients must present a certificate signed by it."""

    certificate: Path  # the server's certificate chain (PEM)
    private_key: Path
    client_ca: Path | None = None

    def flags(self) -> list[str]:
        for path in (self.certificate, self.private_key, *([self.client_ca] if self.client_ca else [])):
            if not Path(path).is_file():
                raise ServerError(f"TLS file {path} does not exist")
        flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.certificate}", f"--grpc-server-key={self.private_key}"]
        if self.client_ca:
            flags += [f"--grpc-root-cert={self.client_ca}", "--grpc-use-ssl-mutual=true"]
        return flags


# The ping policy of k8s/base/deployment.yaml: accept the histoserve client's keepalive pings (every
# 20 s, also between calls) and ping idle clients every 30 s.
KEEPALIVE_FLAGS = ("--grpc-keepalive-time=30000", "--grpc-keepalive-timeout=10000",
                   "--grpc-keepalive-permit-without-calls=true", "--grpc-http2-max-pings-without-data=0",
                   "--grpc-http2-min-recv-ping-interval-without-data=10000")


@dataclass(frozen=True)
class TritonFlags:
    """Every `tritonserver` flag but the repository and backend paths (those belong to the process)."""

    ports: Ports = field(default_factory=Ports)
    address: str = "127.0.0.1"
    log_verbose: int = 0
    # "poll": Triton reloads what changes in its repository (as on Kubernetes); "none": the repository as at start.
    model_control_mode: str = "none"
    repository_poll_s: float = 5.0
    grpc_tls: GrpcTls | None = None
    # The admin APIs' key (formats/admin.py). restrict_admin=False leaves the restriction to extra_args
    # (a Deployment's own flags), which must then use this key.
    admin_key: AdminKey | None = None
    restrict_admin: bool = True
    allow_http: bool = True
    extra_args: tuple[str, ...] = ()  # appended last, so they win

    def __post_init__(self) -> None:
        if self.model_control_mode not in CONTROL_MODES:
            raise ServerError(f"model control mode {self.model_control_mode!r}: use 'none' or 'poll'")
        object.__setattr__(self, "extra_args", tuple(self.extra_args))

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.ports.metrics}/metrics"

    @property
    def polls(self) -> bool:
        return self.model_control_mode == "poll"

    @property
    def http_enabled(self) -> bool:
        """HTTP serves unless turned off here or by extra_args (the last --allow-http wins, as in Triton)."""
        values = [a.split("=", 1)[1].lower() for a in self.flags(check_files=False) if a.startswith("--allow-http=")]
        return not values or values[-1] in ("true", "1")

    def flags(self, check_files: bool = True) -> list[str]:
        """The command line after the repository and backend paths; with `check_files`, a TLS file
        that does not exist is a ServerError."""
        tls = self.grpc_tls.flags() if self.grpc_tls and check_files else []
        return [
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=30",
            *KEEPALIVE_FLAGS,
            f"--log-verbose={self.log_verbose}",
            *(["--model-control-mode=poll", f"--repository-poll-secs={max(1, round(self.repository_poll_s))}"]
              if self.polls else []),
            *tls,
            *([] if self.allow_http else ["--allow-http=false"]),
            *(self.admin_key.triton_flags() if self.restrict_admin and self.admin_key else []),
            *self.extra_args,
        ]
