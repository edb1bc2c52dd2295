"""Start, watch and stop the real `tritonserver` that ships inside the nvidia-pytriton wheel.

The recipe: a backend directory holding the python backend (libtriton_python.so and
triton_python_backend_utils.py) and the python-backend stub built for this interpreter, the wheel's
bundled libraries on LD_LIBRARY_PATH (copied .so files lose their $ORIGIN rpath), the interpreter's
lib dir there too (the stub links libpython), and this virtualenv's bin/ first on PATH: the stub runs
Python isolated and ignores PYTHONPATH, so that is how it finds onnxruntime and numpy.

Like the Kubernetes Deployment, the server starts with its admin APIs behind a key (formats/admin.py):
the caller's, or one made for this run and written to `admin-key` in the work folder (owner-only).
Readiness and the repository index are read over HTTP while HTTP is on, over gRPC when it is off.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.admin import AdminKey
from histoserve.formats.options import ClientTls
from histoserve.formats.repository import VersionState
from histoserve.serve.local_repository import sync_local_repository

# Health checks go straight to the local server, never through an http_proxy from the environment.
LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def wait_for_readiness(http_url: str, timeout_s: float, process: subprocess.Popen | None = None) -> bool:
    """Poll Triton's /v2/health/ready until it answers 200 (True), or `process` exits or the time
    is up (False). How anything that starts a server (`python -m serve`, the demo) knows it serves."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with LOCAL_HTTP.open(f"{http_url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    return False


def wait_for_grpc_readiness(grpc_url: str, timeout_s: float, process: subprocess.Popen | None = None,
                            tls: ClientTls | None = None) -> bool:
    """`wait_for_readiness` over gRPC (ServerReady, in Triton's unrestricted health group), for a
    server started with --allow-http=false; over TLS with `tls`."""
    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(grpc_url, **(tls.client_arguments() if tls else {})) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                return False
            try:
                if client.is_server_ready(client_timeout=1.0):
                    return True
            except InferenceServerException:
                pass
            time.sleep(0.2)
    return False


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
class TritonInstallation:
    binary: Path
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path
    libraries: Path

    @classmethod
    def find(cls) -> TritonInstallation:
        try:
            import pytriton
        except ImportError as error:
            raise ServerError("nvidia-pytriton is not installed: pip install -e '.[serve]'") from error
        root = Path(pytriton.__file__).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libraries=Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs",
        )
        for path in (found.binary, found.python_backend, found.stub, found.libraries):
            if not path.exists():
                raise ServerError(f"{path} is missing from nvidia-pytriton (Python {version} unsupported?)")
        return found

    def make_backend_directory(self, target: Path) -> Path:
        python = target / "python"
        python.mkdir(parents=True)
        for source in (self.python_backend / "libtriton_python.so",
                       self.python_backend / "triton_python_backend_utils.py", self.stub):
            shutil.copy2(source, python / source.name)
        return target


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


@dataclass
class TritonServer:
    """`with TritonServer(repo, ports) as server:` — a ready server inside, nothing left after."""

    model_repository: Path
    ports: Ports = field(default_factory=Ports)
    address: str = "127.0.0.1"
    ready_timeout_s: float = 180.0
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)  # appended last, so they win
    # "poll": versions that `python -m export` publishes into model_repository while the server runs
    # are loaded (and deleted ones unloaded), as on Kubernetes; "none": the repository as at start.
    model_control_mode: str = "none"
    repository_poll_s: float = 5.0
    grpc_tls: GrpcTls | None = None
    # How this process calls the server over gRPC when its TLS comes from extra_args (a Deployment's
    # own flags) or HTTP is off: readiness and the repository index, with this client identity.
    client_tls: ClientTls | None = None
    # The admin APIs' key (formats/admin.py): None makes one for this run. restrict_admin=False leaves
    # the restriction to extra_args (the Deployment's own flags), which must then use this key.
    admin_key: AdminKey | None = None
    restrict_admin: bool = True
    allow_http: bool = True
    process: subprocess.Popen | None = field(default=None, init=False)
    workdir: Path | None = field(default=None, init=False)
    models: list[str] = field(default_factory=list, init=False)
    shm_prefix: str = field(default_factory=lambda: f"histoserve_{os.getpid()}_{secrets.token_hex(3)}_", init=False)
    failed_versions: dict[tuple[str, str], str] = field(default_factory=dict, init=False)  # (model, version) -> reason
    repository_syncs: int = field(default=0, init=False)  # poll mode: how often the local repository was brought up to date
    _follower: threading.Thread | None = field(default=None, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

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
    def http_enabled(self) -> bool:
        """HTTP serves unless turned off here or by extra_args (the last --allow-http wins, as in Triton)."""
        flags = [a.split("=", 1)[1].lower() for a in self.command_flags() if a.startswith("--allow-http=")]
        return not flags or flags[-1] in ("true", "1")

    @property
    def admin_key_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "admin-key"

    @property
    def log_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tritonserver.log"

    def command(self, repository: Path, backends: Path, installation: TritonInstallation) -> list[str]:
        return [
            str(installation.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.command_flags(),
        ]

    def command_flags(self) -> list[str]:
        """Every flag but the repository and backend paths."""
        return [
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=30",
            # The ping policy of k8s/base/deployment.yaml: accept the histoserve client's keepalive
            # pings (every 20 s, also between calls) and ping idle clients every 30 s.
            "--grpc-keepalive-time=30000", "--grpc-keepalive-timeout=10000",
            "--grpc-keepalive-permit-without-calls=true", "--grpc-http2-max-pings-without-data=0",
            "--grpc-http2-min-recv-ping-interval-without-data=10000",
            f"--log-verbose={self.log_verbose}",
            *(["--model-control-mode=poll", f"--repository-poll-secs={max(1, round(self.repository_poll_s))}"]
              if self.model_control_mode == "poll" else []),
            *(self.grpc_tls.flags() if self.grpc_tls else []),
            *([] if self.allow_http else ["--allow-http=false"]),
            *(self.admin_key.triton_flags() if self.restrict_admin and self.admin_key else []),
            *self.extra_args,
        ]

    def environment(self, installation: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [str(installation.libraries), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*library_path, env.get("LD_LIBRARY_PATH", "")]))
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        return env

    @property
    def local_repository(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "model_repository"

    def start(self) -> TritonServer:
        if self.model_control_mode not in ("none", "poll"):
            raise ServerError(f"model control mode {self.model_control_mode!r}: use 'none' or 'poll'")
        check_ports_free(self.address, self.ports)
        if not self.http_enabled and self.grpc_tls is not None and self.client_tls is None:
            raise ServerError("with gRPC over TLS keep HTTP on: serve checks the server's readiness there")
        installation = TritonInstallation.find()
        if self.admin_key is None:
            self.admin_key = AdminKey.generate()
        self.workdir = Path(tempfile.mkdtemp(prefix="histoserve-serve-"))
        try:
            self.admin_key.write(self.admin_key_file)
            repository = self.local_repository
            self.models = sync_local_repository(self.model_repository, repository)
            backends = installation.make_backend_directory(self.workdir / "backends")
            with open(self.log_file, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(repository, backends, installation),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.environment(installation), start_new_session=True,
                )
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        if self.model_control_mode == "poll":
            self._stopping.clear()
            self._follower = threading.Thread(target=self._follow_repository, name="repository-follower", daemon=True)
            self._follower.start()
        return self

    def _follow_repository(self) -> None:
        """Mirror what export publishes into the local derivative, which Triton polls; report each
        version that failed to load once (Triton keeps serving the versions it had)."""
        while not self._stopping.wait(self.repository_poll_s):
            try:
                sync_local_repository(self.model_repository, self.local_repository)
            except Exception as error:  # a half-written or broken repository must not stop serving
                print(f"serve: cannot follow {self.model_repository}: {error}", file=sys.stderr, flush=True)
            self.repository_syncs += 1
            for (model, version), reason in self.unavailable_versions().items():
                if (model, version) not in self.failed_versions:
                    self.failed_versions[(model, version)] = reason
                    print(f"serve: error: model {model!r} version {version} failed to load and is not served: {reason}",
                          file=sys.stderr, flush=True)

    def unavailable_versions(self) -> dict[tuple[str, str], str]:
        """(model, version) → Triton's reason, for each version that failed to load (its repository
        index, an admin API, read with the same rule as `python -m client rollout-status`)."""
        try:
            index = self._repository_index()
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, InferenceServerException):
            return {}
        states = [VersionState.from_index_entry(self.grpc_url, entry) for entry in index]
        return {(s.model, s.version): s.reason for s in states if s.state == "UNAVAILABLE"}

    def _repository_index(self) -> list[dict]:
        key = self.admin_key
        if self.http_enabled:
            request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                             headers=key.http_headers() if key else {})
            with LOCAL_HTTP.open(request, timeout=5) as response:
                return json.loads(response.read())
        with grpcclient.InferenceServerClient(self.grpc_url, **(self.client_tls.client_arguments() if self.client_tls else {})) as client:
            return client.get_model_repository_index(headers=key.grpc_headers() if key else None, as_json=True,
                                                     client_timeout=5).get("models", [])

    def wait_until_ready(self) -> None:
        ready = (wait_for_readiness(self.http_url, self.ready_timeout_s, self.process) if self.http_enabled
                 else wait_for_grpc_readiness(self.grpc_url, self.ready_timeout_s, self.process, self.client_tls))
        if not ready:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process and self.process.returncode}:\n{self.log_tail()}")
            raise ServerError(f"tritonserver not ready after {self.ready_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        if self.workdir is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the group if it hangs; remove the
        python backend's shared-memory regions and the work folder. Safe to call twice."""
        code = None
        self._stopping.set()
        if self._follower is not None:
            self._follower.join(30)
            self._follower = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:  # stubs live in the server's process group: none may outlive it
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            code = self.process.returncode
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.process, self.workdir = None, None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
