"""Start, watch and stop the real `tritonserver` that ships inside the nvidia-pytriton wheel.

The recipe (DESIGN.md §4): a backend directory holding the python backend and its stub for this
interpreter, the wheel's bundled libraries on LD_LIBRARY_PATH, and this virtualenv's bin/ first on
PATH so the stub imports onnxruntime and numpy from here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serve.local_repository import derive_local_repository


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
    def find(cls) -> "TritonInstallation":
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


@dataclass
class TritonServer:
    """`with TritonServer(repo, ports) as server:` — a ready server inside, nothing left after."""

    model_repository: Path
    ports: Ports = field(default_factory=Ports)
    address: str = "127.0.0.1"
    ready_timeout_s: float = 180.0
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)  # appended last, so they win
    process: subprocess.Popen | None = field(default=None, init=False)
    workdir: Path | None = field(default=None, init=False)
    models: list[str] = field(default_factory=list, init=False)
    shm_prefix: str = field(default_factory=lambda: f"histoserve_{os.getpid()}_{secrets.token_hex(3)}_", init=False)

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
    def log_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tritonserver.log"

    def command(self, repository: Path, backends: Path, installation: TritonInstallation) -> list[str]:
        return [
            str(installation.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=30",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def environment(self, installation: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [str(installation.libraries), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*library_path, env.get("LD_LIBRARY_PATH", "")]))
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        return env

    def start(self) -> "TritonServer":
        check_ports_free(self.address, self.ports)
        installation = TritonInstallation.find()
        self.workdir = Path(tempfile.mkdtemp(prefix="histoserve-serve-"))
        try:
            repository = self.workdir / "model_repository"
            self.models = derive_local_repository(self.model_repository, repository)
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
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process and self.process.returncode}:\n{self.log_tail()}")
            try:
                with LOCAL_HTTP.open(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.ready_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the group if it hangs; remove the
        python backend's shared-memory regions and the work folder. Safe to call twice."""
        code = None
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

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
