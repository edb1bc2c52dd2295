"""Alerts, the autoscaler's PromQL and the dashboard, checked with Prometheus' own tools, and the
Deployment's Triton arguments and probes run against the real local Triton."""

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODEL
from tests.k8s.kubelet import grpc_probe
from tests.k8s.manifests import K8S, quantity, render

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
MONITORING = K8S / "components" / "monitoring"
ADAPTER_LABELS = {"<<.LabelMatchers>>": 'namespace="test",pod="triton-0"', "<<.GroupBy>>": "pod"}


def require(tool, name):
    assert tool, f"{name} is not installed: `make test` installs Debian's prometheus package (promtool, prometheus)"
    return tool


def promtool_accepts(expressions: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool parses PromQL inside rule files: wrap each expression as a recording rule."""
    rules = {"groups": [{"name": "check", "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(expressions)]}]}
    (tmp_path / "check.rules.yaml").write_text(yaml.safe_dump(rules))
    return subprocess.run([require(PROMTOOL, "promtool"), "check", "rules", str(tmp_path / "check.rules.yaml")],
                          capture_output=True, text=True)


def adapter_queries() -> list[str]:
    values = yaml.safe_load((MONITORING / "prometheus-adapter-rules.yaml").read_text())
    queries = []
    for rule in values["rules"]["custom"]:
        query = rule["metricsQuery"]
        for placeholder, value in ADAPTER_LABELS.items():
            query = query.replace(placeholder, value)
        queries.append(query)
    return queries


def promtool_unit_tests(tmp_path: Path, overlay: str, rule_name: str, test_file: str) -> tuple[dict, set[str], set[str]]:
    """`promtool check rules` and `promtool test rules` on a rendered PrometheusRule's spec (written
    where the unit-test file's rule_files expects it); the rule, its alerts, and the alerts tested."""
    rule = next(o for o in render(overlay) if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == rule_name)
    tests = Path(__file__).parent / "promtool" / test_file
    rules_file = yaml.safe_load(tests.read_text())["rule_files"][0]
    (tmp_path / rules_file).write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(tests, tmp_path)
    check = subprocess.run([require(PROMTOOL, "promtool"), "check", "rules", rules_file], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", test_file], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    return rule, alerts, set(re.findall(r"alertname: (\w+)", tests.read_text()))


def test_alert_rules_pass_promtool_unit_tests(tmp_path):
    rule, alerts, tested = promtool_unit_tests(tmp_path, "overlays/gpu", "triton", "alerts-test.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert alerts == tested == {"TritonP99LatencyHigh", "TritonErrorRatioHigh", "TritonQueueTimeHigh", "TritonPodsNotReady",
                                "TritonScrapeFailing", "TritonMetricsAbsent", "TritonModelPublishFailed", "TritonRolloutStalled"}


def test_canary_alerts_pass_promtool_unit_tests(tmp_path):
    _, alerts, tested = promtool_unit_tests(tmp_path, "overlays/gpu-canary", "triton-canary", "canary-alerts-test.yaml")
    assert alerts == tested == {"TritonCanaryAborted", "TritonCanaryWaiting"}


def test_under_the_rollout_readiness_and_stall_alerts_watch_the_rollout(tmp_path):
    """The canary overlay's rendered rules: the two alerts that read the Deployment in the base read the
    Rollout's ReplicaSets and the Rollout, and fire on series where the Deployment reads 0 of 0."""
    rule, alerts, tested = promtool_unit_tests(tmp_path, "overlays/gpu-canary", "triton", "rollout-alerts-test.yaml")
    assert tested == {"TritonPodsNotReady", "TritonRolloutStalled"} <= alerts
    expressions = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert "kube_deployment" not in expressions
    base = next(o for o in render("overlays/gpu-gateway") if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == "triton")
    assert "kube_deployment" in " ".join(r["expr"] for g in base["spec"]["groups"] for r in g["rules"])


def test_promtool_check_fails_on_a_broken_expression(tmp_path):
    assert promtool_accepts(["sum(rate(nv_inference_count[1m])"], tmp_path).returncode != 0


def test_service_monitor_scrapes_the_metrics_port():
    objects = render("overlays/gpu")
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "triton")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "triton")
    assert any(p["name"] == "metrics" and p["port"] == 8002 for p in service["spec"]["ports"])


def test_adapter_and_dashboard_queries_parse(tmp_path):
    dashboard = json.loads((MONITORING / "triton-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("throughput", "latency", "queue", "batch size", "gpu"):
        assert wanted in titles
    expressions = [e.replace("$__rate_interval", "5m").replace("$namespace", "test").replace("$model", ".*") for e in expressions]
    result = promtool_accepts(adapter_queries() + expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    hpa = next(o for o in render("overlays/gpu") if o["kind"] == "HorizontalPodAutoscaler")
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter-rules.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in {r["name"]["as"] for r in adapter["rules"]["custom"]}


def test_deployment_args_start_the_real_triton_and_probes_answer_as_declared(manifest_server):
    """The cpu overlay's own Triton arguments (the kubelet's $(VAR) expansion done, ports and repository
    path local, TLS left out) run the real server; gRPC probes answer SERVING, and under mutual TLS the
    probes ask the golden gate's port instead; HTTP is off and metrics are served."""
    import psutil

    args, container = manifest_server.manifest_args, manifest_server.manifest_container
    running = psutil.Process(manifest_server.process.pid).cmdline()
    assert running[-len(args):] == args  # the manifest's own args come last, so they win
    assert "--allow-http=false" in args and not manifest_server.http_enabled
    local = {8001: manifest_server.ports.grpc, 8002: manifest_server.ports.metrics}
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        if "grpc" in probe:
            assert grpc_probe(f"127.0.0.1:{local[probe['grpc']['port']]}") == "SERVING", probe_name
        else:  # mutual TLS: the golden gate asks Triton (run for real in tests/k8s/test_tls.py)
            assert probe["httpGet"]["port"] == 8003 and probe["httpGet"]["path"].startswith("/triton/"), probe_name
    with socket.socket() as http, pytest.raises(ConnectionRefusedError):
        http.connect(("127.0.0.1", manifest_server.ports.http))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    with urllib.request.urlopen(f"http://127.0.0.1:{local[ports['metrics']]}/metrics", timeout=5) as response:
        assert "nv_inference_request_success" in response.read().decode()


def _send_load(url: str, seconds: float) -> int:
    import threading

    import numpy as np

    from histoserve.client.classifier import TritonClassifier

    sent, stop = [0], time.monotonic() + seconds

    def worker():
        with TritonClassifier(url, MODEL) as client:
            image = np.zeros((1, 3, client.spec.crop_size, client.spec.crop_size), np.uint8)
            while time.monotonic() < stop:
                client.infer(image)
                sent[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent[0]


def test_real_prometheus_evaluates_the_autoscaler_metric_to_a_number_under_load(manifest_server, tmp_path):
    """Prometheus scrapes the real Triton (labelled as the pod would be) and evaluates the adapter's
    query for triton_queue_duration_us_per_request, with the placeholders the adapter fills in."""
    from histoserve.serve.triton_flags import free_ports

    port = free_ports().http
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "triton", "static_configs": [{
            "targets": [f"127.0.0.1:{manifest_server.ports.metrics}"], "labels": {"namespace": "test", "pod": "triton-0"}}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen([require(PROMETHEUS, "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _send_load(manifest_server.grpc_url, 8.0) > 50
        query = adapter_queries()[0]
        value = None
        for _ in range(30):
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.loads(response.read())["data"]["result"]
            except OSError:
                result = []
            if result and result[0]["value"][1] not in ("NaN", "0"):
                value = float(result[0]["value"][1])
                break
            time.sleep(1)
        assert value is not None and value > 0, f"no value for {query}"
        assert result[0]["metric"] == {"pod": "triton-0"}
    finally:
        prometheus.terminate()
        prometheus.wait(10)


DRIFT = K8S / "components" / "drift-monitor"


def test_drift_alerts_pass_promtool_unit_tests(tmp_path):
    _, alerts, tested = promtool_unit_tests(tmp_path, "overlays/gpu", "histoserve-drift", "drift-alerts-test.yaml")
    assert alerts == tested == {"HistoserveInputDrift", "HistoservePredictionDrift", "HistoserveEstimatedAccuracyDrop",
                                "HistoserveDriftBaselineMissing", "HistoserveDriftMonitorAbsent",
                                "HistoserveDriftRecordFileFailing", "HistoserveDriftMonitorForgedWrites"}


def test_drift_alerts_and_panels_use_metrics_the_monitor_exports(tmp_path):
    """Every histoserve_* name in the alerts and the dashboard is one the real monitor serves."""
    from histoserve.monitor.service import Monitor

    exported = {metric.name for metric in Monitor(tmp_path).registry.collect()}
    exported |= {f"{name}_total" for name in exported}
    rule = next(o for o in render("overlays/gpu") if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == "histoserve-drift")
    dashboard = json.loads((DRIFT / "drift-dashboard.json").read_text())
    expressions = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    expressions += [t["expr"].replace("$namespace", "test") for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in expressions for name in re.findall(r"histoserve_\w+", e)}
    assert used and used <= exported, used - exported
    result = promtool_accepts(expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_monitor_is_scraped_and_reads_the_model_store():
    objects = render("overlays/gpu")
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "histoserve-monitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "histoserve-monitor")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    repository = container["command"][container["command"].index("--repository") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repository)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    # the store claim is the platform's (k8s/platform), the records claim the overlay's
    claims = {o["metadata"]["name"] for o in objects + render("platform") if o["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims and mount["readOnly"]
    assert deployment["spec"]["replicas"] == 1  # the windows live in one process


def test_the_drift_monitor_keeps_its_records_over_restarts():
    """The record file (replayed on start) lies on a claim the monitor can write, not in the pod; an
    RWO claim is only handed from the old pod to the new one with Recreate."""
    objects = render("overlays/gpu")
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "histoserve-monitor")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    record_file = Path(container["command"][container["command"].index("--record-file") + 1])
    mount = next(m for m in container["volumeMounts"] if record_file.is_relative_to(m["mountPath"]))
    assert not mount.get("readOnly") and spec["securityContext"]["fsGroup"] == container.get("securityContext", {}).get(
        "runAsGroup", spec["securityContext"]["runAsGroup"])
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim"
                 and o["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] != ["ReadWriteOnce"] or deployment["spec"]["strategy"]["type"] == "Recreate"
    kept = 2 * float(container["command"][container["command"].index("--record-file-max-mb") + 1]) * 2**20
    assert kept < quantity(claim["spec"]["resources"]["requests"]["storage"])  # the file and its .1 fit
