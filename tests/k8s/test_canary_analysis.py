"""The canary overlay's analyses, evaluated as Argo Rollouts would evaluate them, against a real
Prometheus scraping real Triton servers started with the overlay's own Deployment arguments over the
versions its init container stages, labelled as the ServiceMonitor labels them (namespace, and the
pod-template hash that tells stable from canary), the gateway's counts of what callers got (a real
gRPC hop in front of each canary, counting as Envoy's grpc_stats does: tests/k8s/edge.py), and the
real drift monitor fed by the clients.

One stable server (version 1) and canaries, each the kind of publish a canary exists to stop: a good
one (version 2), a failing one (version 4: its config rejects requests that queue for more than 1 ms,
which Triton counts), one that refuses callers at the door (version 6: a queue of one request; Triton
answers "Exceeds maximum queue size" and counts nothing), one whose predictions drift (version 5: a
fine model that sees data unlike its training data, the digits inverted), and a quiet one (the good
server, reached by too few calls to judge). Each scenario has its own namespace label, so its edge
cluster and pods are its own. Latency needs Triton's histogram, which 2.51 does not export for these
models: here every latency measurement is Inconclusive (never a pass on no data), and
test_canary_scenarios.py judges latency on series shaped as Triton 26.x exports them."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from histoserve.client.record_sender import MonitorSender
from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.records import records_for
from histoserve.formats.repository_layout import config_to_text, contract_of, read_config
from histoserve.monitor.service import Monitor, WriterTokens, make_server
from histoserve.serve.triton_flags import free_ports
from tests.conftest import MODEL
from tests.k8s import argo_analysis
from tests.k8s.conftest import start_manifest_server
from tests.k8s.edge import EdgeProxy
from tests.k8s.manifests import render
from tests.k8s.test_monitoring import PROMETHEUS, require
from tests.serve.published import copy_model, copy_version, republish

OVERLAY = "overlays/gpu-canary"
NAMESPACE = "histoserve"
STABLE_HASH = "5d8f9c7b6"
TOKEN = "canary-writer-token-0123456789"


def tight_queue_timeout(config):  # microseconds taken for milliseconds: a request queued over 1 ms is rejected
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = policy.REJECT
    policy.default_timeout_microseconds = 1000


def one_request_queue(config):  # a queue of one: concurrent callers are refused before the scheduler
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    config.dynamic_batching.max_queue_delay_microseconds = 0


@dataclass
class Canary:
    version: int
    hash: str
    config_change: Callable | None = None  # applied to the version's cpu.pbtxt (a ModelConfig)
    clients: int = 1
    pause_s: float = 0.05  # between a client's requests: a light load, so the machine's own noise stays out
    inverted: bool = False
    server_of: str | None = None  # another canary's server, reached through this canary's own edge
    expected: dict[str, str] = field(default_factory=dict)  # metric -> phase
    server: object = field(default=None, repr=False)


LATENCY = ("latency-p99", "latency-p99-against-stable")  # no histogram in 2.51: Inconclusive for every canary
CANARIES = {
    "good": Canary(2, "7c4b8f9d5", expected={"error-ratio": "Successful", "prediction-drift": "Successful",
                                              "estimated-accuracy": "Successful"}),
    "failing": Canary(4, "84c9d7f6b", tight_queue_timeout, clients=4, pause_s=0.0, expected={"error-ratio": "Failed"}),
    "door": Canary(6, "6d8c9f7b5", one_request_queue, clients=6, pause_s=0.0, expected={"error-ratio": "Failed"}),
    "drifting": Canary(5, "9b6c8d7f4", inverted=True, expected={"error-ratio": "Successful", "prediction-drift": "Failed"}),
    "quiet": Canary(2, "7c4b8f9d5", server_of="good", pause_s=2.0, expected={"error-ratio": "Inconclusive"}),
}


def one_thread(config):
    """Five servers share this machine's two cores: one ONNX Runtime thread each (its default spins)."""
    config.parameters["intra_op_thread_count"].string_value = "1"


def publish_versions(repository, store):
    """Version 1 as exported, and the canaries' versions: copies of it with their config changes,
    published consistently (checksums rewritten), as an export with those settings would be."""
    model_dir = copy_model(repository, MODEL, store)
    for canary in [Canary(1, STABLE_HASH), *(c for c in CANARIES.values() if c.server_of is None)]:
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


def start_prometheus(tmp_path, targets: list[tuple[str, dict]], slow: set[str] = frozenset()) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping each (address, labels) every second (addresses in `slow` every 5 s: the
    drift monitor judges its windows at each scrape); labels as the ServiceMonitors set them."""
    port = free_ports().http

    def job(i, address, labels):
        every = {"scrape_interval": "5s", "scrape_timeout": "5s"} if address in slow else {}
        return {"job_name": f"target-{i}", **every, "static_configs": [{"targets": [address], "labels": labels}]}

    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [job(i, address, labels) for i, (address, labels) in enumerate(targets)]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([require(PROMETHEUS, "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'prometheus'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def step_arguments(rollout: dict, version: int, canary_hash: str, stable_hash: str, prometheus: str,
                   namespace: str | None = None) -> tuple[list[dict], dict[str, str]]:
    """The first analysis step's templates and its arguments, resolved as the controller resolves
    them for a canary of `version`: fieldRefs from the Rollout (its annotation as the knob would set
    it; its namespace, or `namespace`), podTemplateHashValue from the ReplicaSets' hashes. Only the
    Prometheus address is this test's."""
    step = next(s["analysis"] for s in rollout["spec"]["strategy"]["canary"]["steps"] if "analysis" in s)
    annotations = {**rollout["metadata"]["annotations"], "histoserve.io/model-version": str(version)}
    values = {}
    for argument in step["args"]:
        source = argument.get("valueFrom", {})
        if "value" in argument:
            values[argument["name"]] = argument["value"]
        elif source.get("podTemplateHashValue") == "Latest":
            values[argument["name"]] = canary_hash
        elif source.get("podTemplateHashValue") == "Stable":
            values[argument["name"]] = stable_hash
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            values[argument["name"]] = namespace or rollout["metadata"]["namespace"]
        else:
            key = source["fieldRef"]["fieldPath"].split("'")[1]
            values[argument["name"]] = annotations[key]
    values["prometheus-address"] = prometheus
    return step["templates"], values


def resolved_metrics(objects: list[dict], version: int, canary_hash: str, stable_hash: str, prometheus: str,
                     namespace: str | None = None) -> list[dict]:
    """Every metric of the step's AnalysisRun, its arguments substituted."""
    rollout = next(o for o in objects if o["kind"] == "Rollout")
    references, incoming = step_arguments(rollout, version, canary_hash, stable_hash, prometheus, namespace)
    templates = [next(o for o in objects if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"] == r["templateName"])
                 for r in references]
    args = argo_analysis.resolve_args(templates, incoming)
    return [argo_analysis.resolve_metric(metric, args) for template in templates for metric in template["spec"]["metrics"]]


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


def edge_total(edge) -> int:
    return edge.counts.get("total", 0)


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
    own = {name: c for name, c in CANARIES.items() if c.server_of is None}

    servers, edges, traffic, prometheus = {}, {}, [], None
    try:
        with ThreadPoolExecutor(5) as pool:  # the pods of both ReplicaSets, started as the kubelet would
            futures = {"stable": pool.submit(start_manifest_server, tmp_path / "store", OVERLAY, version=1)}
            for name, canary in own.items():
                futures[name] = pool.submit(start_manifest_server, tmp_path / "store", OVERLAY, version=canary.version)
            servers = {name: future.result() for name, future in futures.items()}
        assert "--metrics-config=histogram_latencies=true" in servers["stable"].manifest_args  # the p99 the analysis reads
        assert not any("summary_latencies=true" in a for a in servers["stable"].manifest_args)
        for name, canary in CANARIES.items():  # the gateway's canary backend, one Envoy cluster per scenario
            server = servers[canary.server_of or name]
            edges[name] = EdgeProxy(server.grpc_url, f"grpcroute/{NAMESPACE}-{name}/triton/rule/0/backend/1").__enter__()
        edges["stable"] = EdgeProxy(servers["stable"].grpc_url,  # the stable backend, as every scenario's route sees it
                                    [f"grpcroute/{NAMESPACE}-{name}/triton/rule/0/backend/0" for name in CANARIES]).__enter__()
        targets = []
        for name, canary in CANARIES.items():  # each scenario in its own namespace: stable pods, canary pods, edge
            namespace = f"{NAMESPACE}-{name}"
            targets.append((f"127.0.0.1:{servers['stable'].ports.metrics}",
                            {"namespace": namespace, "pod": "triton-stable", "rollouts_pod_template_hash": STABLE_HASH}))
            targets.append((f"127.0.0.1:{servers[canary.server_of or name].ports.metrics}",
                            {"namespace": namespace, "pod": f"triton-{name}", "rollouts_pod_template_hash": canary.hash}))
            targets.append((edges[name].metrics_address, {"namespace": "envoy-gateway-system", "pod": f"envoy-{name}"}))
            targets.append((f"127.0.0.1:{monitor_http.server_address[1]}", {"namespace": namespace, "pod": "histoserve-monitor"}))
        targets.append((edges["stable"].metrics_address, {"namespace": "envoy-gateway-system", "pod": "envoy-stable"}))
        process, prometheus_url = start_prometheus(tmp_path, targets, slow={f"127.0.0.1:{monitor_http.server_address[1]}"})
        prometheus = process
        traffic = [Traffic(edges["stable"].grpc_url, images, 1, monitor_url, 0.05)]
        traffic += [Traffic(edges[name].grpc_url, 255 - images if c.inverted else images, c.clients, monitor_url, c.pause_s)
                    for name, c in CANARIES.items()]
        deadline = time.monotonic() + 90
        while (any(len(monitor.windows.get((MODEL, str(c.version)), ())) < 100 for c in CANARIES.values())
               or any(edge_total(edges[name]) < 200 for name in [*CANARIES, "stable"] if name != "quiet")):
            assert time.monotonic() < deadline, ({k: len(v) for k, v in monitor.windows.items()},
                                                 {k: e.counts for k, e in edges.items()})
            time.sleep(1)
        time.sleep(6)  # a few scrapes into every rate window, and the monitor's
        with ThreadPoolExecutor(len(CANARIES)) as pool:  # the metrics of each canary's AnalysisRun, side by side
            runs = {}
            for name, canary in CANARIES.items():
                for metric in resolved_metrics(objects, canary.version, canary.hash, STABLE_HASH, prometheus_url, f"{NAMESPACE}-{name}"):
                    runs[name, metric["name"]] = pool.submit(
                        argo_analysis.run_metric, metric, lambda q: argo_analysis.prometheus_query(prometheus_url, q), 1.0)
            outcomes = {}
            for (name, metric), run in runs.items():
                outcomes.setdefault(name, {})[metric] = run.result()
        triton_failures = argo_analysis.prometheus_query(
            prometheus_url, f'sum(nv_inference_request_failure{{namespace="{NAMESPACE}-door", pod="triton-door"}})')
        triton_successes = argo_analysis.prometheus_query(
            prometheus_url, f'sum(nv_inference_request_success{{namespace="{NAMESPACE}-door", pod="triton-door"}})')
    finally:
        for running in traffic:
            running.stop()
        for edge in edges.values():
            edge.__exit__()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        monitor_http.shutdown()
        for server in servers.values():
            server.stop()

    summary = {name: {metric: (o.phase, o.measurements[-1][1]) for metric, o in found.items()} for name, found in outcomes.items()}
    for name, canary in CANARIES.items():
        for metric, phase in canary.expected.items():
            assert outcomes[name][metric].phase == phase, (name, metric, summary[name])
        for metric in LATENCY:  # 2.51 exports no latency histogram: no data, never a pass
            assert outcomes[name][metric].phase == "Inconclusive", (name, summary[name])
    # The door-refusing canary: callers were refused (UNAVAILABLE, at the edge), Triton counted none of it.
    door = edges["door"].counts
    assert door.get(str(grpc.StatusCode.UNAVAILABLE.value[0]), 0) > 0.01 * door["total"], door
    assert triton_failures == [0.0] and triton_successes[0] > 0, (triton_failures, triton_successes)
    assert edges["failing"].counts.get("failure", 0) > 0.01 * edges["failing"].counts["total"]
    assert "failure" not in edges["good"].counts and edge_total(edges["quiet"]) < 100
