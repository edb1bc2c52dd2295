"""The canary overlay's analyses, evaluated as Argo Rollouts would evaluate them, against a real
Prometheus scraping real Triton servers started with the overlay's own Deployment arguments over the
versions its init container stages, labelled as the ServiceMonitor labels them (namespace, and the
pod-template hash that tells stable from canary), and the real drift monitor fed by the clients.

One stable server (version 1) and four canaries, each the kind of publish a canary exists to stop:
a good one (version 2), a slow one (version 3: its config's batcher waits 300 ms for a full batch),
a failing one (version 4: its config rejects requests that queue for more than 1 ms), and one whose
predictions drift (version 5: the model is fine, but it sees data unlike its training data, here the
digits inverted). The good canary passes every measurement; each bad one fails the one meant for it."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from histoserve.client.monitoring import MonitorSender
from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.records import records_for
from histoserve.formats.repository import config_to_text, contract_of, read_config
from histoserve.monitor.service import Monitor, WriterTokens, make_server
from histoserve.serve.server import free_ports
from tests.conftest import MODEL
from tests.k8s import argo_analysis
from tests.k8s.conftest import start_manifest_server
from tests.k8s.manifests import render
from tests.k8s.test_monitoring import PROMETHEUS, require
from tests.serve.published import copy_model, copy_version, republish

OVERLAY = "overlays/gpu-canary"
NAMESPACE = "histoserve"
STABLE_HASH = "5d8f9c7b6"
TOKEN = "canary-writer-token-0123456789"


def slow_batcher(config):  # waits up to 300 ms for a batch of 16 that single-image traffic never fills
    config.dynamic_batching.max_queue_delay_microseconds = 300_000
    config.dynamic_batching.preferred_batch_size[:] = [16]


def tight_queue_timeout(config):  # microseconds taken for milliseconds: a request queued over 1 ms is rejected
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = policy.REJECT
    policy.default_timeout_microseconds = 1000


@dataclass
class Canary:
    version: int
    hash: str
    config_change: Callable | None = None  # applied to the version's cpu.pbtxt (a ModelConfig)
    clients: int = 1
    pause_s: float = 0.05  # between a client's requests: a light load, so the machine's own noise stays out of p99
    inverted: bool = False
    expected_failure: str | None = None  # the metric meant to catch it
    server: object = field(default=None, repr=False)


CANARIES = {
    "good": Canary(2, "7c4b8f9d5"),
    "slow": Canary(3, "6f7d9b8c4", slow_batcher, expected_failure="latency-p99-against-stable"),
    "failing": Canary(4, "84c9d7f6b", tight_queue_timeout, clients=4, pause_s=0.0, expected_failure="error-ratio"),
    "drifting": Canary(5, "9b6c8d7f4", inverted=True, expected_failure="prediction-drift"),
}


def one_thread(config):
    """Five servers share this machine's two cores: one ONNX Runtime thread each (its default spins)."""
    config.parameters["intra_op_thread_count"].string_value = "1"


def publish_versions(repository, store):
    """Version 1 as exported, and the canaries' versions: copies of it with their config changes,
    published consistently (checksums rewritten), as an export with those settings would be."""
    model_dir = copy_model(repository, MODEL, store)
    for canary in [Canary(1, STABLE_HASH), *CANARIES.values()]:
        folder = model_dir / "1" if canary.version == 1 else copy_version(model_dir, 1, canary.version)
        config = read_config(folder / "cpu.pbtxt")
        for change in (one_thread, canary.config_change):
            if change:
                change(config)
        (folder / "cpu.pbtxt").write_text(config_to_text(config))
        republish(folder)
    return model_dir


class Traffic:
    """Clients calling one server with batches of one image, and sending the prediction records
    to the drift monitor as the histoserve client does (MonitorSender), until stopped."""

    def __init__(self, url: str, images: np.ndarray, clients: int, monitor_url: str, pause_s: float):
        self.url, self.images, self.pause_s, self.stopping = url, images, pause_s, threading.Event()
        self.sender = MonitorSender(monitor_url, TOKEN, batch=64)
        self.ok = self.failed = 0
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, seed: int):
        order = np.random.default_rng(seed).permutation(len(self.images))
        with grpcclient.InferenceServerClient(self.url) as client:
            for step in range(10**9):
                if self.stopping.is_set():
                    return
                image = self.images[order[step % len(order)]][None]
                tensor = grpcclient.InferInput("image", list(image.shape), "UINT8")
                tensor.set_data_from_numpy(image)
                try:
                    result = client.infer(MODEL, [tensor], client_timeout=10)
                except Exception:  # noqa: BLE001 - a failed request is what the failing canary is for
                    self.failed += 1
                    time.sleep(0.01)
                    continue
                self.ok += 1
                probabilities = result.as_numpy("probabilities")
                version = result.get_response().model_version
                self.sender.submit(records_for(MODEL, version, image, probabilities.argmax(1), probabilities.max(1)))
                time.sleep(self.pause_s)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        self.sender.close()


def start_prometheus(tmp_path, targets: list[tuple[str, dict]]) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping each (address, labels) every second; labels as the ServiceMonitors set them."""
    port = free_ports().http
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": f"target-{i}", "static_configs": [{"targets": [address], "labels": labels}]}
                                 for i, (address, labels) in enumerate(targets)]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([require(PROMETHEUS, "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'prometheus'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def step_arguments(rollout: dict, canary: Canary, prometheus: str) -> tuple[list[dict], dict[str, str]]:
    """The first analysis step's templates and its arguments, resolved as the controller resolves
    them for this canary: fieldRefs from the Rollout (its annotation as the knob would set it),
    podTemplateHashValue from the ReplicaSets' hashes. Only the Prometheus address is this test's."""
    step = next(s["analysis"] for s in rollout["spec"]["strategy"]["canary"]["steps"] if "analysis" in s)
    annotations = {**rollout["metadata"]["annotations"], "histoserve.io/model-version": str(canary.version)}
    values = {}
    for argument in step["args"]:
        source = argument.get("valueFrom", {})
        if "value" in argument:
            values[argument["name"]] = argument["value"]
        elif source.get("podTemplateHashValue") == "Latest":
            values[argument["name"]] = canary.hash
        elif source.get("podTemplateHashValue") == "Stable":
            values[argument["name"]] = STABLE_HASH
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            values[argument["name"]] = rollout["metadata"]["namespace"]
        else:
            key = source["fieldRef"]["fieldPath"].split("'")[1]
            values[argument["name"]] = annotations[key]
    values["prometheus-address"] = prometheus
    return step["templates"], values


def analyse(objects: list[dict], canary: Canary, prometheus: str, interval_s: float = 1.0) -> dict[str, argo_analysis.MetricOutcome]:
    rollout = next(o for o in objects if o["kind"] == "Rollout")
    references, incoming = step_arguments(rollout, canary, prometheus)
    templates = [next(o for o in objects if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"] == r["templateName"])
                 for r in references]
    args = argo_analysis.resolve_args(templates, incoming)
    outcomes = {}
    for template in templates:
        for metric in template["spec"]["metrics"]:
            resolved = argo_analysis.resolve_metric(metric, args)
            outcomes[metric["name"]] = argo_analysis.run_metric(
                resolved, lambda query: argo_analysis.prometheus_query(prometheus, query), interval_s)
    return outcomes


def test_expr_conditions_are_judged_as_argo_judges_them():
    metric = {"successCondition": "len(result) > 0 && !isNaN(result[0]) && result[0] <= 0.01",
              "failureCondition": "len(result) > 0 && !isNaN(result[0]) && result[0] > 0.01"}
    assert argo_analysis.judge(metric, [0.0]) == "Successful"
    assert argo_analysis.judge(metric, [0.5]) == "Failed"
    assert argo_analysis.judge(metric, []) == argo_analysis.judge(metric, [float("nan")]) == "Inconclusive"
    assert argo_analysis.judge({"successCondition": "result[0] >= -0.02"}, [-0.05]) == "Failed"  # no failureCondition
    assert argo_analysis.judge({"successCondition": "result[0] > 1"}, []) == "Error"  # index out of range, as in expr
    with pytest.raises(argo_analysis.AnalysisError, match="outside the understood subset"):
        argo_analysis.condition("all(result, {# < 1})", [0.0])


def test_every_analysis_passes_a_good_canary_and_fails_a_bad_one_where_it_should(repository, digits_root, tmp_path):
    objects = render(OVERLAY)
    model_dir = publish_versions(repository, tmp_path / "store")
    spec = contract_of(read_config(model_dir / "1" / "config.pbtxt")).preprocess
    images = np.stack([preprocess_file(p, spec) for p in sorted((digits_root / "test").rglob("*.png"))[::3]])

    monitor = Monitor(model_dir.parent, window=200, min_window=100)
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    monitor_http = make_server(monitor, "127.0.0.1", 0, WriterTokens(tmp_path / "tokens"))
    threading.Thread(target=monitor_http.serve_forever, daemon=True).start()
    monitor_url = f"http://127.0.0.1:{monitor_http.server_address[1]}"

    servers, traffic, prometheus = {}, [], None
    try:
        with ThreadPoolExecutor(5) as pool:  # the pods of both ReplicaSets, started as the kubelet would
            futures = {"stable": pool.submit(start_manifest_server, tmp_path / "store", OVERLAY, version=1)}
            for name, canary in CANARIES.items():
                futures[name] = pool.submit(start_manifest_server, tmp_path / "store", OVERLAY, version=canary.version)
            servers = {name: future.result() for name, future in futures.items()}
        assert "--metrics-config=summary_latencies=true" in servers["stable"].manifest_args  # the p99 the analysis reads
        hashes = {"stable": STABLE_HASH, **{name: c.hash for name, c in CANARIES.items()}}
        targets = [(f"127.0.0.1:{servers[name].ports.metrics}",
                    {"namespace": NAMESPACE, "pod": f"triton-{name}", "rollouts_pod_template_hash": pod_hash})
                   for name, pod_hash in hashes.items()]
        targets.append((f"127.0.0.1:{monitor_http.server_address[1]}", {"namespace": NAMESPACE, "pod": "histoserve-monitor"}))
        process, prometheus_url = start_prometheus(tmp_path, targets)
        prometheus = process
        traffic = [Traffic(servers["stable"].grpc_url, images, 1, monitor_url, 0.05)]
        traffic += [Traffic(servers[name].grpc_url, 255 - images if c.inverted else images, c.clients, monitor_url, c.pause_s)
                    for name, c in CANARIES.items()]
        deadline = time.monotonic() + 90
        while any(monitor.windows.get((MODEL, str(c.version)), ()).__len__() < 100 for c in CANARIES.values()):
            assert time.monotonic() < deadline, {k: len(v) for k, v in monitor.windows.items()}
            time.sleep(1)
        # A few scrapes into every rate window. (Triton counts its warm-up requests in its latency summary,
        # whose window slides over about a minute: here they are in every server's p99, stable and canary
        # alike; Argo's first analysis comes after a 10-minute pause, long after they left it.)
        time.sleep(5)
        with ThreadPoolExecutor(len(CANARIES)) as pool:  # one AnalysisRun per canary, side by side
            runs = {name: pool.submit(analyse, objects, canary, prometheus_url) for name, canary in CANARIES.items()}
            outcomes = {name: run.result() for name, run in runs.items()}
    finally:
        for running in traffic:
            running.stop()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        monitor_http.shutdown()
        for server in servers.values():
            server.stop()

    summary = {name: {metric: (o.phase, o.measurements[-1][1]) for metric, o in found.items()} for name, found in outcomes.items()}
    assert all(o.phase == "Successful" for o in outcomes["good"].values()), summary["good"]
    for name, canary in CANARIES.items():
        if canary.expected_failure:
            assert outcomes[name][canary.expected_failure].phase == "Failed", (name, summary[name])
    for metric in ("error-ratio", "latency-p99", "latency-p99-against-stable"):  # the drifting model serves fine
        assert outcomes["drifting"][metric].phase == "Successful", summary["drifting"]
    assert outcomes["slow"]["latency-p99"].phase == "Successful", summary["slow"]  # 300 ms: under the absolute limit,
    assert outcomes["slow"]["error-ratio"].phase == "Successful", summary["slow"]  # caught only against the stable pods
