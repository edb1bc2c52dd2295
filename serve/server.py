"""Start, watch and stop the real `tritonserver` that ships inside the nvidia-pytriton wheel.

The recipe: a backend directory holding the python backend (libtriton_python.so and
triton_python_backend_utils.py) and the python-backend stub built for this interpreter, the wheel's
bundled libraries on LD_LIBRARY_PATH (copied .so files lose their $ORIGIN rpath), the interpreter's
lib dir there too (the stub links libpython), and this virtualenv's bin/ first on PATH: the stub runs
Python isolated and ignores PYTHONPATH, so that is how it finds onnxruntime and numpy.

Like the Kubernetes Deployment, the server starts with its admin APIs behind a key (formats/admin.py):
the caller's, or one made for this run and written to `admin-key` in the work folder (owner-only).
Readiness and the repository index are read over HTTP while HTTP is on, over gRPC when it is off.

Three parts: the command line is data (serve/triton_flags.py: `TritonFlags`), the repository
follower of poll mode runs on its own (serve/repository_follower.py), and `TritonServer` here is the
process: start, readiness, logs, stop.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.admin import AdminKey
from histoserve.formats.options import ClientTls
from histoserve.serve.cpu_repository import sync_cpu_repository
from histoserve.serve.repository_follower import RepositoryFollower
from histoserve.serve.triton_flags import GrpcTls, Ports, ServerError, TritonFlags, check_ports_free

# Health checks go straight to the local server, never through an http_proxy from the environment.
LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_for_readiness(http_url: str, timeout_s: float, process: subprocess.Popen | None = None) -> bool:
    """Poll Triton's /v2/health/ready until it answers 200 (True), or `process` exits or the time
    is up (False). How anything that starts a server (`python -m histoserve.serve`, the demo) knows it serves."""
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


class TritonServer:
    """`with TritonServer(repo, ports) as server:` — a ready server inside, nothing left after.

    What Triton runs with is `flags` (a TritonFlags); its fields may be given here as keywords instead
    (ports, address, log_verbose, model_control_mode, repository_poll_s, grpc_tls, admin_key,
    restrict_admin, allow_http, extra_args). Without an admin key one is made for this run. In poll
    mode, `follower` mirrors what `python -m histoserve.export` publishes into model_repository while
    the server runs (and deleted versions), as on Kubernetes. `client_tls`: how this process calls the
    server over gRPC when its TLS comes from extra_args or HTTP is off (readiness, the repository
    index). `remove_on_stop`: folders that go with the server (a pod's repository made for it)."""

    def __init__(self, model_repository: str | Path, ports: Ports | None = None, address: str = "127.0.0.1",
                 ready_timeout_s: float = 180.0, log_verbose: int = 0, *, flags: TritonFlags | None = None,
                 extra_args: Sequence[str] = (), model_control_mode: str = "none", repository_poll_s: float = 5.0,
                 grpc_tls: GrpcTls | None = None, admin_key: AdminKey | None = None, restrict_admin: bool = True,
                 allow_http: bool = True, client_tls: ClientTls | None = None, remove_on_stop: Sequence[Path] = ()):
        keywords = TritonFlags(ports or Ports(), address, log_verbose, model_control_mode, repository_poll_s,
                               grpc_tls, admin_key, restrict_admin, allow_http, tuple(extra_args))
        if flags is not None and (ports is not None or keywords != replace(TritonFlags(Ports()), ports=keywords.ports)):
            raise TypeError("TritonServer: give the flags as flags= or as keywords, not both (the keywords would be ignored)")
        flags = flags or keywords
        self.flags = flags if flags.admin_key else replace(flags, admin_key=AdminKey.generate())
        self.model_repository = Path(model_repository)
        self.ready_timeout_s, self.client_tls = ready_timeout_s, client_tls
        self.remove_on_stop = [Path(p) for p in remove_on_stop]
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.models: list[str] = []
        self.follower: RepositoryFollower | None = None  # poll mode, from start(); kept after stop() for its record
        self.shm_prefix = f"histoserve_{os.getpid()}_{secrets.token_hex(3)}_"

    def __repr__(self) -> str:
        return f"TritonServer({str(self.model_repository)!r}, {self.flags!r})"

    # What the flags say, where callers read it from the server.
    ports = property(lambda self: self.flags.ports)
    address = property(lambda self: self.flags.address)
    admin_key = property(lambda self: self.flags.admin_key)
    grpc_tls = property(lambda self: self.flags.grpc_tls)
    grpc_url = property(lambda self: self.flags.grpc_url)
    http_url = property(lambda self: self.flags.http_url)
    metrics_url = property(lambda self: self.flags.metrics_url)
    http_enabled = property(lambda self: self.flags.http_enabled)

    @property
    def failed_versions(self) -> dict[tuple[str, str], str]:
        """Poll mode: (model, version) → reason, for each version that failed to load (see RepositoryFollower)."""
        return self.follower.failed_versions if self.follower else {}

    @property
    def repository_syncs(self) -> int:
        """Poll mode: how often the local repository was brought up to date."""
        return self.follower.syncs if self.follower else 0

    @property
    def admin_key_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "admin-key"

    @property
    def log_file(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "tritonserver.log"

    @property
    def cpu_repository(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "model_repository"

    def command(self, repository: Path, backends: Path, installation: TritonInstallation) -> list[str]:
        return [
            str(installation.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.flags.flags(),
        ]

    def environment(self, installation: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [str(installation.libraries), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*library_path, env.get("LD_LIBRARY_PATH", "")]))
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        return env

    def start(self) -> TritonServer:
        check_ports_free(self.address, self.ports)
        if not self.http_enabled and self.grpc_tls is not None and self.client_tls is None:
            raise ServerError("with gRPC over TLS keep HTTP on: serve checks the server's readiness there")
        installation = TritonInstallation.find()
        self.workdir = Path(tempfile.mkdtemp(prefix="histoserve-serve-"))
        try:
            self.admin_key.write(self.admin_key_file)
            self.models = sync_cpu_repository(self.model_repository, self.cpu_repository)
            backends = installation.make_backend_directory(self.workdir / "backends")
            with open(self.log_file, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(self.cpu_repository, backends, installation),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.environment(installation), start_new_session=True,
                )
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        if self.flags.polls:
            self.follower = RepositoryFollower(self.model_repository, self.cpu_repository, self.flags.repository_poll_s,
                                               self.repository_index, self.grpc_url).start()
        return self

    def repository_index(self) -> list[dict]:
        """Triton's repository index (an admin API: with the key), over HTTP while it is on, else over gRPC."""
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
        python backend's shared-memory regions, the work folder and `remove_on_stop`. Safe to call twice."""
        if self.follower is not None:
            self.follower.stop()
        code = self._end_process(timeout_s)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        for folder in ([self.workdir] if self.workdir else []) + self.remove_on_stop:
            shutil.rmtree(folder, ignore_errors=True)
        self.process, self.workdir = None, None
        return code

    def _end_process(self, timeout_s: float) -> int | None:
        if self.process is None:
            return None
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
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
