"""Publishing model versions into a repository that a real Triton polls, while clients stream
requests: poll mode as `python -m histoserve.serve --model-control-mode poll` and the dev overlay run it
(non-strict readiness, exit on error at start-up) with export's two loaded versions. (Production pods
serve one pinned version instead: tests/k8s/test_pinned_version.py.) A good version takes over with no failed request and no moment of
unreadiness; a broken one is named (serve's log, `python -m histoserve.client rollout-status`) while the
previous version keeps serving; moving it out of the repository is the rollback."""

import shutil
import threading
import time
import urllib.error

import numpy as np
import tritonclient.grpc as grpcclient

from histoserve.client.classifier import TritonClassifier, input_of
from histoserve.export.publish import publish
from histoserve.formats.repository_layout import read_config
from histoserve.serve.server import LOCAL_HTTP, TritonServer
from tests.conftest import MODEL, run_cli, started_triton
from tests.k8s.kubelet import grpc_probe
from tests.k8s.manifests import deployment_args, flag


def served_by_version(server: TritonServer) -> dict[str, int]:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL, headers=server.admin_key.grpc_headers(), as_json=True)["model_stats"]
    return {s["version"]: int(s.get("inference_count", 0)) for s in stats}


def version_states(server: TritonServer) -> dict[str, str]:
    """version → state, from Triton's repository index (an admin API)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        index = client.get_model_repository_index(headers=server.admin_key.grpc_headers(), as_json=True).get("models", [])
    return {entry.get("version", ""): entry.get("state", "") for entry in index if entry.get("name") == MODEL}


def pinned_calls(server: TritonServer, version: str, count: int) -> int:
    """How many of `count` requests pinned to `version` (a client that has not moved on yet) succeed."""
    with TritonClassifier(server.grpc_url, MODEL) as contract:
        request = input_of(contract.contract, np.zeros((1, 3, contract.spec.crop_size, contract.spec.crop_size), np.uint8))
    ok = 0
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for _ in range(count):
            try:
                client.infer(MODEL, [request], model_version=version, client_timeout=10)
                ok += 1
            except Exception:  # counted: the assertion names how many failed
                pass
    return ok


def failed_requests(server: TritonServer) -> int:
    """Triton's own count of failed requests to the model, every version (its Prometheus metrics)."""
    from histoserve.loadtest.triton_stats import model_metrics

    return int(model_metrics(server.metrics_url, MODEL).get("nv_inference_request_failure", 0))


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


class Traffic:
    """Clients streaming requests and a kubelet probing readiness as `probe` says (the Deployment's
    readinessProbe: gRPC health, or an HTTP path), both counting what went wrong."""

    def __init__(self, server: TritonServer, probe: dict, clients: int = 2):
        self.server, self.probe = server, probe
        self.ok, self.failures, self.probes, self.unready = 0, [], 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe)] + [threading.Thread(target=self._send) for _ in range(clients)]

    def _send(self):
        """Plain tritonclient calls: no retries, no waiting for a server, so every failure a rollout
        causes is seen (our client would retry some of them away)."""
        with TritonClassifier(self.server.grpc_url, MODEL) as contract:
            request = input_of(contract.contract, np.zeros((1, 3, contract.spec.crop_size, contract.spec.crop_size), np.uint8))
        with grpcclient.InferenceServerClient(self.server.grpc_url) as client:
            while not self._stop.is_set():
                try:
                    client.infer(MODEL, [request], client_timeout=10)
                    self.ok += 1
                except Exception as error:  # every failure is collected and asserted on
                    self.failures.append(error)

    def _probe(self):
        while not self._stop.is_set():
            if "grpc" in self.probe:
                status = grpc_probe(self.server.grpc_url, timeout_s=3)
                ready = status == "SERVING"
            else:
                try:
                    with LOCAL_HTTP.open(self.server.http_url + self.probe["httpGet"]["path"], timeout=3) as response:
                        status = response.status
                except urllib.error.HTTPError as error:
                    status = error.code
                except OSError as error:
                    status = str(error)
                ready = status == 200
            self.probes += 1
            if not ready:
                self.unready.append(status)
            time.sleep(0.05)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def rollout_status(server, version):
    return run_cli("-m", "histoserve.client", "rollout-status", "--url", server.grpc_url, "--model", MODEL,
                   "--version", version, "--timeout", 60, "--admin-key-file", server.admin_key_file, check=False)


def test_publishing_never_drops_traffic_and_a_broken_version_is_named_while_the_old_one_serves(repository, tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(repository / MODEL, repo / MODEL)  # the fp32 model only: one model rolling out
    model_dir = repo / MODEL
    config, labels = read_config(model_dir / "config.pbtxt"), (model_dir / "labels.txt").read_text().splitlines()
    assert config.version_policy.latest.num_versions == 2  # export's default: the previous version stays loaded
    args, container = deployment_args("overlays/dev")
    readiness = [f"--{name}={flag(args, name)}" for name in ("strict-readiness", "exit-on-error")]
    assert readiness == ["--strict-readiness=false", "--exit-on-error=true"]
    probe = container["readinessProbe"]

    with started_triton(repo, model_control_mode="poll", repository_poll_s=2, extra_args=readiness) as server:
        with Traffic(server, probe) as traffic:
            wait_until(lambda: traffic.ok > 20, 30, "traffic flows")
            publish(repo, config, labels, model_dir / "1" / "model.onnx")  # version 2: a good one
            wait_until(lambda: served_by_version(server).get("2", 0) > 20, 60, "version 2 serves")
            good = rollout_status(server, 2)
            previous = version_states(server).get("1"), pinned_calls(server, "1", 20)  # still loaded, warm for a rollback

            broken = tmp_path / "broken.onnx"
            broken.write_bytes(b"this is not an ONNX model")
            publish(repo, config, labels, broken)  # version 3: fails to load
            wait_until(lambda: (MODEL, "3") in server.failed_versions, 60, "serve names the broken version")
            bad = rollout_status(server, 3)
            before = served_by_version(server)["2"]
            wait_until(lambda: served_by_version(server)["2"] > before + 20, 30, "version 2 keeps serving")

            shutil.rmtree(model_dir / "3")  # the rollback: move the broken version out of the repository
            wait_until(lambda: not (server.cpu_repository / MODEL / "3").exists(), 30, "serve's copy drops version 3")
            syncs = server.repository_syncs  # serve and Triton both poll every 2 s: count Triton's polls by serve's
            wait_until(lambda: server.repository_syncs >= syncs + 2, 30, "Triton polls the repository without version 3")
            attempts, syncs = server.log_text().count(f"loading: {MODEL}:3"), server.repository_syncs
            wait_until(lambda: server.repository_syncs >= syncs + 3, 30, "three more polls")  # no more attempts at version 3
            retried = server.log_text().count(f"loading: {MODEL}:3") - attempts
            before = served_by_version(server)["2"]
            wait_until(lambda: served_by_version(server)["2"] > before + 20, 30, "version 2 serves after the rollback")
        failures_counted = failed_requests(server)

    sent = traffic.ok + len(traffic.failures)
    assert traffic.failures == [], f"{len(traffic.failures)} failed requests of {sent}: {traffic.failures[:3]}"
    assert failures_counted == 0, f"Triton counted {failures_counted} failed requests"
    assert traffic.unready == [], f"the readiness probe failed {len(traffic.unready)} of {traffic.probes} times: {traffic.unready[:5]}"
    assert traffic.ok > 100
    assert previous == ("READY", 20), f"version 1 after version 2 took over: {previous}"
    assert good.returncode == 0 and "READY" in good.stdout, good.stdout + good.stderr
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "UNAVAILABLE" in bad.stdout and "Protobuf parsing failed" in bad.stdout
    assert "failed to load on 1 of 1 server" in bad.stderr
    assert "Protobuf parsing failed" in server.failed_versions[(MODEL, "3")]
    assert attempts >= 1 and retried == 0, f"Triton tried version 3 {attempts} times, and {retried} times after the rollback"


def test_strict_readiness_would_take_the_pod_out_during_every_publish(repository, tmp_path):
    """Why poll mode (the dev overlay) is not strict: with --strict-readiness=true (Triton's default),
    the server reports unready while a published version loads, on every pod at once. Probed as the kubelet
    probes the Deployment (gRPC health): Triton's grpc.health.v1 answer follows its readiness."""
    repo = tmp_path / "model_repository"
    shutil.copytree(repository / MODEL, repo / MODEL)  # the fp32 model only: one model rolling out
    config, labels = read_config(repo / MODEL / "config.pbtxt"), (repo / MODEL / "labels.txt").read_text().splitlines()
    with started_triton(repo, model_control_mode="poll", repository_poll_s=1,
                        extra_args=["--strict-readiness=true"]) as server:
        with Traffic(server, deployment_args("overlays/dev")[1]["readinessProbe"], clients=1) as traffic:
            wait_until(lambda: traffic.probes > 10, 30, "probes run")
            publish(repo, config, labels, repo / MODEL / "1" / "model.onnx")
            wait_until(lambda: served_by_version(server).get("2", 0) > 5, 60, "version 2 serves")
    assert traffic.unready and set(traffic.unready) == {"NOT_SERVING"}, \
        f"strict readiness stayed ready while a version loaded: {traffic.unready[:5]}"
